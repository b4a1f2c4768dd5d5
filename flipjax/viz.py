"""Drawing: point tracks over frames (matplotlib, imported lazily; install the `viz` extra)."""

from __future__ import annotations

from typing import Any

import numpy as np


def draw_tracks(ax: Any, frame: np.ndarray, tracks: np.ndarray, visible: np.ndarray | None = None,
                *, every: int = 1, min_motion: float = 0.0, title: str | None = None) -> None:
    """Draws a frame with point tracks coloured from start (dark) to end (bright).

    Args:
      ax: a matplotlib Axes.
      frame: uint8[H W 3] (or float in [0, 1]) the frame the tracks start on.
      tracks: float[N L 2] pixel positions (u, v).
      visible: bool[N L]; invisible steps are not drawn. None draws everything.
      every: draw every ``every``-th track.
      min_motion: skip tracks whose end is closer than this (px) to their start.
      title: axes title.
    """
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    tracks = np.asarray(tracks, np.float32)
    if tracks.ndim != 3 or tracks.shape[-1] != 2:
        raise ValueError(f"tracks: expected shape [N L 2], got {list(tracks.shape)}")
    n, length, _ = tracks.shape
    vis = np.ones((n, length), bool) if visible is None else np.asarray(visible, bool)
    if vis.shape != (n, length):
        raise ValueError(f"visible: expected shape [{n} {length}], got {list(vis.shape)}")
    ax.imshow(frame)
    keep = np.arange(0, n, every)
    keep = keep[np.linalg.norm(tracks[keep, -1] - tracks[keep, 0], axis=-1) >= min_motion]
    segs, colors = [], []
    cmap = plt.get_cmap("plasma")
    for i in keep:
        for k in range(length - 1):
            if vis[i, k] and vis[i, k + 1]:
                segs.append(tracks[i, k:k + 2])
                colors.append(cmap(k / max(1, length - 2)))
    if segs:
        ax.add_collection(LineCollection(segs, colors=colors, linewidths=1.0))
    start = keep[vis[keep, 0]]
    ax.scatter(tracks[start, 0, 0], tracks[start, 0, 1], s=2, c="white", linewidths=0)
    ax.set_xlim(-0.5, frame.shape[1] - 0.5)
    ax.set_ylim(frame.shape[0] - 0.5, -0.5)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=7)


def new_figure(size: tuple[int, int], dpi: int = 100) -> Any:
    """A matplotlib Figure of ``size`` = (H, W) pixels on its own Agg canvas.

    No pyplot: the process-wide backend and figure registry are left alone, so this is safe
    in training processes and notebooks alike.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[1] / dpi, size[0] / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def figure_image(fig: Any, size: tuple[int, int] | None = None) -> np.ndarray:
    """Renders a :func:`new_figure` figure to uint8[H W 3] (checked against ``size``)."""
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    if size is not None and image.shape[:2] != tuple(size):
        raise RuntimeError(f"figure rendered at {image.shape[:2]}, not {tuple(size)}")
    return image


def value_curve_image(curves: list[np.ndarray], ends: list[np.ndarray], title: str,
                      size: tuple[int, int] = (320, 480)) -> np.ndarray:
    """Plots value curves into an image.

    Args:
      curves: per episode, float[S] values.
      ends: per episode, int[S] the frames the states end on (x axis).
      title: the plot title.
      size: (H, W) of the image in pixels.

    Returns:
      uint8[H W 3].
    """
    fig = new_figure(size)
    ax = fig.add_subplot()
    for i, (v, x) in enumerate(zip(curves, ends, strict=True)):
        ax.plot(np.asarray(x), np.asarray(v), lw=1.2, label=f"episode {i}")
    ax.set_xlabel("frame")
    ax.set_ylabel("V(clip; instruction)")
    ax.set_title(title, fontsize=9)
    if len(curves) <= 8:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_image(fig, size)


def flow_panels_image(frame: np.ndarray, panels: dict[str, np.ndarray],
                      panel_size: int = 240) -> np.ndarray:
    """Side-by-side panels of point tracks drawn over the same frame (e.g. truth vs sample).

    Args:
      frame: uint8[H W 3] (or float in [-1, 1]) the frame the tracks start on.
      panels: title -> float[N L 2] pixel tracks.
      panel_size: pixel side of each panel.

    Returns:
      uint8[panel_size len(panels)*panel_size 3].
    """
    frame = to_uint8(frame)
    size = (panel_size, panel_size * len(panels))
    fig = new_figure(size)
    for i, (title, tracks) in enumerate(panels.items()):
        ax = fig.add_axes((i / len(panels), 0.0, 1 / len(panels), 0.9))
        draw_tracks(ax, frame, tracks, title=title)
    return figure_image(fig, size)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Images in [-1, 1] (float) or uint8 -> uint8, clipped.

    Args:
      images: float[... H W C] in [-1, 1] or uint8[... H W C].

    Returns:
      uint8 array of the same shape.
    """
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    return np.clip(np.round((images.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def write_image(path: Any, image: np.ndarray) -> None:
    """Writes uint8[H W C] (C = 1 or 3) as PNG (Pillow)."""
    from PIL import Image

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] not in (1, 3) or image.dtype != np.uint8:
        raise ValueError(f"image: expected uint8[H W 1|3], got {image.dtype}{list(image.shape)}")
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)


def write_video(path: Any, frames: np.ndarray, fps: float = 4.0) -> None:
    """Writes uint8[T H W 3] as a looping GIF (Pillow)."""
    from PIL import Image

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames: expected uint8[T H W 3], got {frames.dtype}{list(frames.shape)}")
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], loop=0,
                   duration=round(1000 / fps))


def plan_video_frames(history: np.ndarray, videos: np.ndarray, flows: np.ndarray, *,
                      values: np.ndarray | None = None, title: str = "",
                      size: int = 256) -> np.ndarray:
    """Frames of a video plan: the observed history, then each generated frame with the
    tracks of its planning step drawn up to that frame.

    Args:
      history: uint8[Th H W 3] (or float in [-1, 1]) observed frames, the last one current.
      videos: float[Hz F H W 3] in [-1, 1] (or uint8) the plan's generated frames, F = L - 1
        per planning step.
      flows: float[Hz L N 2] pixel tracks of each planning step (step 0 on the frame before
        the step's first generated frame), as ``Plan.flows[p, b]``.
      values: float[Hz] value of each planning step, shown in the titles (optional).
      title: text put before every frame's own caption (e.g. the instruction).
      size: pixel side of the square output frames.

    Returns:
      uint8[Th + Hz*F size size 3].

    Raises:
      ValueError: naming the argument whose shape does not fit.
    """
    history, videos = to_uint8(history), to_uint8(videos)
    flows = np.asarray(flows, np.float32)
    if history.ndim != 4 or history.shape[-1] != 3:
        raise ValueError(f"history: expected [Th H W 3], got {list(history.shape)}")
    if videos.ndim != 5 or videos.shape[2:] != history.shape[1:]:
        raise ValueError(f"videos: expected [Hz F {history.shape[1]} {history.shape[2]} 3], "
                         f"got {list(videos.shape)}")
    hz, f = videos.shape[:2]
    if flows.ndim != 4 or flows.shape[0] != hz or flows.shape[1] != f + 1 \
            or flows.shape[-1] != 2:
        raise ValueError(f"flows: expected [{hz} {f + 1} N 2] to match videos "
                         f"{list(videos.shape)}, got {list(flows.shape)}")
    if values is not None and np.shape(values) != (hz,):
        raise ValueError(f"values: expected [{hz}], got {list(np.shape(values))}")
    prefix = f"{title}\n" if title else ""

    def frame(image: np.ndarray, caption: str, tracks: np.ndarray | None) -> np.ndarray:
        fig = new_figure((size, size))
        ax = fig.add_axes((0.0, 0.0, 1.0, 0.86))
        if tracks is None:
            ax.imshow(image)
            ax.set_axis_off()
        else:
            draw_tracks(ax, image, tracks)
        fig.suptitle(prefix + caption, fontsize=7, y=0.995, va="top")
        return figure_image(fig, (size, size))

    th = len(history)
    out = [frame(img, f"observed t={k - th + 1}", None) for k, img in enumerate(history)]
    for h in range(hz):
        tracks = np.swapaxes(flows[h], 0, 1)  # N L 2
        value = "" if values is None else f", value {float(values[h]):.3f}"
        for k in range(f):
            out.append(frame(videos[h, k], f"plan step {h + 1}/{hz}, frame {k + 1}/{f}{value}",
                             tracks[:, :k + 2]))
    return np.stack(out)


def beam_values_image(values: np.ndarray, best: int, *, returns: np.ndarray | None = None,
                      title: str = "", size: tuple[int, int] = (320, 480)) -> np.ndarray:
    """Plots the value of every beam over the planning steps, the chosen beam highlighted.

    Args:
      values: float[B Hz] value of each beam's kept candidate at each planning step.
      best: index of the chosen beam (drawn thick, in colour, on top).
      returns: float[B] the beams' returns, shown in the legend (optional).
      title: the plot title.
      size: (H, W) of the image in pixels.

    Returns:
      uint8[H W 3].

    Raises:
      ValueError: for values that are not [B Hz], returns that are not [B], or a best beam
        out of range.
    """
    values = np.asarray(values, np.float32)
    if values.ndim != 2:
        raise ValueError(f"values: expected [B Hz], got {list(values.shape)}")
    b, hz = values.shape
    if not 0 <= int(best) < b:
        raise ValueError(f"best={best} is not one of the {b} beams")
    if returns is not None and np.shape(returns) != (b,):
        raise ValueError(f"returns: expected [{b}], got {list(np.shape(returns))}")
    fig = new_figure(size)
    ax = fig.add_subplot()
    steps = np.arange(1, hz + 1)
    for i in range(b):
        if i != int(best):
            label = f"beam {i}" + ("" if returns is None else f" (return {returns[i]:.3f})")
            ax.plot(steps, values[i], color="0.6", lw=1.0, marker=".", label=label)
    label = f"best: beam {int(best)}" + (
        "" if returns is None else f" (return {returns[int(best)]:.3f})")
    ax.plot(steps, values[int(best)], color="tab:red", lw=2.4, marker="o", label=label,
            zorder=3)
    ax.set_xlabel("planning step")
    ax.set_ylabel("value of the kept candidate")
    ax.set_xticks(steps)
    ax.set_title(title, fontsize=8)
    if b <= 8:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_image(fig, size)
