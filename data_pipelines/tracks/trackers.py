"""Point tracks for FLIP's flow targets: a window of ``horizon`` frames starting at every frame.

For an episode of T frames and N query points, every tracker here returns

* ``tracks`` float32[T N L 2]: pixel positions (u, v) of query n of the window that starts at
  frame t, at frame t + k (k = 0 .. L-1); ``tracks[t, :, 0]`` equals the queries exactly;
* ``visible`` bool[T N L]: whether the point is seen (tracked reliably / not occluded) there;
  ``visible[t, :, 0]`` is True unless the query lies outside the image. Where a point is not
  visible, the image trackers hold its last reliable position and the ground truth gives its
  true (occluded or out-of-image) projection.

Frames past the end of the episode are the last frame repeated, so a window that runs off the
end keeps the position and visibility it had at the last real frame.

Backends:

* :func:`track_lk`: pyramidal Lucas-Kanade (OpenCV) frame to frame with a forward-backward
  check; all windows active at a frame pair are tracked in one OpenCV call per direction.
* :func:`track_dense_flow`: DIS dense optical flow (OpenCV) computed once per frame pair
  (forward and backward) and sampled at every window's points, with the same
  forward-backward check. Its cost barely depends on the number of points, so it is the
  backend to use when many hundreds of frames per second are needed (LK pays per point).
Exact tracks from depth, segmentation and poses are in ``ground_truth_tracks``; tracks
computed elsewhere (CoTracker, TAPIR) and their file layout in ``track_files``.

Conventions: pixels (u, v) = (column, row) with pixel centres at integers, so an image of
size (H, W) covers u in [-0.5, W - 0.5) and v in [-0.5, H - 0.5); camera frame x right,
y down, z forward, metres; 4x4 transforms act on column vectors. Frames are uint8[T H W 3] RGB.

Threads: OpenCV parallelises one LK call over its points (and DIS over image stripes) using
its global thread pool, all cores by default. The trackers take ``num_threads``: None leaves
OpenCV's setting alone; an int sets it for the duration of the call and restores it after.
Pass 1 in each worker of a multi-process converter so that workers do not oversubscribe cores.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import cv2
import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["grid_queries", "track_dense_flow", "track_errors", "track_lk"]

MIN_DEPTH = 1e-6  # metres; points closer than this are not in front of the camera
DIS_PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}

# step(j, points float32[M 2]) -> (points at frame j + 1 float32[M 2], reliable bool[M]).
_StepFn = Callable[[int, NDArray[np.float32]], tuple[NDArray[np.float32], NDArray[np.bool_]]]


# --------------------------------------------------------------------------------------------
# Queries and small helpers
# --------------------------------------------------------------------------------------------


def grid_queries(grid: int, height: int, width: int) -> NDArray[np.float32]:
    """Centres of a ``grid`` x ``grid`` tiling of an image, as query points.

    Args:
      grid: cells per side (FLIP uses 23).
      height: image height H in pixels.
      width: image width W in pixels.

    Returns:
      float32[N 2] with N = grid * grid, (u, v) = ((i + 0.5) W / grid - 0.5,
      (j + 0.5) H / grid - 0.5), row-major: v is the outer loop, u the inner one.
    """
    grid = _positive_int(grid, "grid")
    height = _positive_int(height, "height")
    width = _positive_int(width, "width")
    cells = np.arange(grid, dtype=np.float64) + 0.5
    u = cells * (width / grid) - 0.5
    v = cells * (height / grid) - 0.5
    uu, vv = np.meshgrid(u, v)  # [grid(v) grid(u)]
    return np.stack([uu, vv], axis=-1).reshape(-1, 2).astype(np.float32)


def _positive_int(x: object, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int | np.integer) or x < 1:
        raise ValueError(f"{name}: expected a positive int, got {x!r}")
    return int(x)


def _in_image(points: NDArray, height: int, width: int) -> NDArray[np.bool_]:
    """bool[...] whether points float[... 2] lie in [-0.5, W-0.5) x [-0.5, H-0.5); NaN -> False."""
    u, v = points[..., 0], points[..., 1]
    return (u >= -0.5) & (u < width - 0.5) & (v >= -0.5) & (v < height - 0.5)


def _nearest_pixel(
    points: NDArray, height: int, width: int
) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """(rows, cols) of the pixels nearest to points float[... 2], clamped into the image."""
    # Clamp as floats first so that huge or non-finite values cannot overflow the int cast.
    pts = np.nan_to_num(points, nan=0.0, posinf=0.0, neginf=0.0)
    cols = np.clip(np.floor(pts[..., 0] + 0.5), 0, width - 1).astype(np.intp)
    rows = np.clip(np.floor(pts[..., 1] + 0.5), 0, height - 1).astype(np.intp)
    return rows, cols


def _check_frames(frames: ArrayLike) -> NDArray[np.uint8]:
    """Returns grayscale uint8[T H W] from RGB uint8[T H W 3] (or already gray uint8[T H W])."""
    frames = np.asarray(frames)
    is_rgb = frames.ndim == 4 and frames.shape[-1] == 3
    if frames.dtype != np.uint8 or not (is_rgb or frames.ndim == 3) or 0 in frames.shape:
        raise ValueError(
            "frames: expected non-empty uint8[T H W 3] (RGB) or uint8[T H W], got shape "
            f"{list(frames.shape)} dtype {frames.dtype}"
        )
    if not is_rgb:
        return np.ascontiguousarray(frames)
    return np.stack([cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in frames])


def _check_queries(queries: ArrayLike, num_frames: int) -> NDArray[np.float32]:
    """Returns queries as float32[T N 2] from float[N 2] (same for every frame) or float[T N 2]."""
    q = np.asarray(queries)
    ok_shape = (q.ndim == 2 and q.shape[1] == 2) or (
        q.ndim == 3 and q.shape[0] == num_frames and q.shape[2] == 2
    )
    numeric = np.issubdtype(q.dtype, np.floating) or np.issubdtype(q.dtype, np.integer)
    if not ok_shape or not numeric:
        raise ValueError(
            f"queries: expected float[N 2] or float[T N 2] with T={num_frames}, got shape "
            f"{list(q.shape)} dtype {q.dtype}"
        )
    if not np.all(np.isfinite(q)):
        raise ValueError("queries: contains non-finite values")
    if q.ndim == 2:
        q = np.broadcast_to(q[None], (num_frames, *q.shape))
    return q.astype(np.float32)


@contextlib.contextmanager
def _opencv_threads(num_threads: int | None) -> Iterator[None]:
    """Sets OpenCV's (process-global) thread count inside the block, restoring it after."""
    if num_threads is None:
        yield
        return
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads: expected a positive int or None, got {num_threads!r}")
    previous = cv2.getNumThreads()
    cv2.setNumThreads(num_threads)
    try:
        yield
    finally:
        cv2.setNumThreads(previous)


# --------------------------------------------------------------------------------------------
# Image trackers: windows at every frame, advanced together frame pair by frame pair
# --------------------------------------------------------------------------------------------


def _track_windows(
    queries: NDArray[np.float32], horizon: int, height: int, width: int, step: _StepFn
) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """Tracks the windows starting at every frame, one ``step`` call per frame pair.

    Window t covers frames t .. t+L-1, so at the pair (j, j+1) the windows t in
    [j-L+2, j] are active, window t at its step j - t. Their still-visible points go through a
    single ``step`` call; because ``step`` treats points independently the result equals
    tracking each window on its own. A point that fails stays at its last reliable position
    and is not visible for the rest of its window.

    Args:
      queries: float32[T N 2] query points of the window starting at each frame.
      horizon: L, steps per window including the start frame.
      height: image height H.
      width: image width W.
      step: moves points float32[M 2] from frame j to j + 1; returns them and bool[M] reliable.

    Returns:
      tracks float32[T N L 2], visible bool[T N L].
    """
    num_frames, num_points, _ = queries.shape
    tracks = np.empty((num_frames, num_points, horizon, 2), np.float32)
    visible = np.zeros((num_frames, num_points, horizon), bool)
    tracks[:, :, 0] = queries
    visible[:, :, 0] = _in_image(queries, height, width)

    for j in range(num_frames - 1):
        starts = np.arange(max(0, j - horizon + 2), j + 1)  # active windows
        if starts.size == 0:
            continue
        steps = j - starts
        # Advanced indices split by a slice put the window axis first: [A N 2] and [A N].
        pos = tracks[starts, :, steps]
        vis = visible[starts, :, steps]
        new_pos = pos.copy()
        new_vis = np.zeros_like(vis)
        if vis.any():
            live = pos[vis]
            moved, ok = step(j, live)
            ok = ok & np.all(np.isfinite(moved), axis=-1) & _in_image(moved, height, width)
            new_pos[vis] = np.where(ok[:, None], moved, live)
            new_vis[vis] = ok
        tracks[starts, :, steps + 1] = new_pos
        visible[starts, :, steps + 1] = new_vis

    # Windows running past the end see the last frame repeated: nothing moves any more.
    for t in range(max(0, num_frames - horizon + 1), num_frames):
        last = num_frames - 1 - t
        tracks[t, :, last + 1 :] = tracks[t, :, last : last + 1]
        visible[t, :, last + 1 :] = visible[t, :, last : last + 1]
    return tracks, visible


def _check_tracker_args(horizon: int, fb_threshold: float) -> int:
    horizon = _positive_int(horizon, "horizon")
    if not (np.isfinite(fb_threshold) and fb_threshold > 0):
        raise ValueError(f"fb_threshold: expected a positive number of pixels, got {fb_threshold}")
    return horizon


def track_lk(
    frames: ArrayLike,
    queries: ArrayLike,
    horizon: int,
    *,
    fb_threshold: float = 1.0,
    window: int = 15,
    levels: int = 3,
    max_iterations: int = 30,
    epsilon: float = 0.01,
    min_eig_threshold: float = 1e-4,
    max_patch_error: float | None = None,
    num_threads: int | None = None,
) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """Tracks query points with pyramidal Lucas-Kanade and a forward-backward check.

    Every frame starts a window of ``horizon`` frames. Points are tracked frame to frame on
    grayscale images with ``cv2.calcOpticalFlowPyrLK``; at each frame pair the points of all
    active windows (up to L * N) go through one forward and one backward call. A point is lost
    for the rest of its window (not visible, held at its last reliable position) when either
    call reports failure, when tracking it back lands more than ``fb_threshold`` px from where
    it started, or when it leaves the image. The forward-backward check cannot see a point
    slide onto an occluder that is textured and static (LK then tracks the occluder
    consistently both ways); ``max_patch_error`` adds a photometric test for that case.

    Cost is per point: about 6-9 us per point and direction with the defaults on one core
    (128x128 frames), i.e. 0.1-0.2 s per frame for 16 windows of 529 points. Use
    :func:`track_dense_flow` when throughput matters more than LK's per-point accuracy.
    OpenCV's Python binding cannot take the pyramids of ``cv2.buildOpticalFlowPyramid``
    (opencv/opencv#4777), so each call rebuilds them; on small frames that is a negligible
    part of the cost.

    Args:
      frames: uint8[T H W 3] RGB (or uint8[T H W] gray) frames of one episode.
      queries: float[N 2] pixel (u, v) queries used at every start frame, or float[T N 2].
      horizon: L, frames per window including the start frame (FLIP: 16).
      fb_threshold: largest forward-backward error in pixels of a reliable step.
      window: LK window side in pixels at every pyramid level.
      levels: pyramid levels above the full-resolution one (OpenCV's ``maxLevel``).
      max_iterations: LK iterations per level at most.
      epsilon: LK stops when an update is smaller than this (pixels).
      min_eig_threshold: OpenCV's minimum-eigenvalue test for textureless windows.
      max_patch_error: when set, a step also fails if OpenCV's forward patch error (mean
        absolute grey-level difference over the window, 0-255 scale) exceeds it; about 10
        separates occluders from true matches on clean frames, but lighting changes and
        blur raise the error of true matches, so it is off by default.
      num_threads: OpenCV threads during the call; None leaves the global setting alone.

    Returns:
      tracks float32[T N L 2] and visible bool[T N L] (see the module docstring).
    """
    gray = _check_frames(frames)
    num_frames, height, width = gray.shape
    q = _check_queries(queries, num_frames)
    horizon = _check_tracker_args(horizon, fb_threshold)
    window = _positive_int(window, "window")
    if window < 3:
        raise ValueError(f"window: expected at least 3 pixels, got {window}")
    if isinstance(levels, bool) or not isinstance(levels, int | np.integer) or levels < 0:
        raise ValueError(f"levels: expected a non-negative int, got {levels!r}")
    max_iterations = _positive_int(max_iterations, "max_iterations")
    if max_patch_error is not None and not max_patch_error > 0:
        raise ValueError(
            f"max_patch_error: expected a positive number or None, got {max_patch_error}"
        )
    lk_params = {
        "winSize": (window, window),
        "maxLevel": int(levels),
        "criteria": (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, max_iterations, epsilon),
        "minEigThreshold": min_eig_threshold,
    }

    def step(j: int, pts: NDArray[np.float32]) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
        p0 = np.ascontiguousarray(pts.reshape(-1, 1, 2))
        p1, ok_fwd, err = cv2.calcOpticalFlowPyrLK(gray[j], gray[j + 1], p0, None, **lk_params)
        back, ok_bwd, _ = cv2.calcOpticalFlowPyrLK(gray[j + 1], gray[j], p1, None, **lk_params)
        fb_error = np.linalg.norm(back[:, 0] - p0[:, 0], axis=-1)
        ok = ok_fwd[:, 0].astype(bool) & ok_bwd[:, 0].astype(bool) & (fb_error <= fb_threshold)
        if max_patch_error is not None:
            ok &= err[:, 0] <= max_patch_error
        return p1[:, 0], ok

    with _opencv_threads(num_threads):
        return _track_windows(q, horizon, height, width, step)


def _sample(field: NDArray[np.float32], points: NDArray[np.float32]) -> NDArray[np.float32]:
    """Bilinearly samples field float32[H W 2] at points float32[M 2] (u, v), edges clamped."""
    # cv2.remap is ~30x faster than numpy gathers; its 1/32 px weight quantisation is far below
    # flow accuracy. Maps are laid out in rows because remap limits each side to < 32767.
    cols = 1024
    m = points.shape[0]
    rows = -(-m // cols)
    maps = np.zeros((rows * cols, 2), np.float32)
    maps[:m] = points
    out = cv2.remap(
        field,
        maps[:, 0].reshape(rows, cols),
        maps[:, 1].reshape(rows, cols),
        cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )
    return out.reshape(-1, 2)[:m]


def track_dense_flow(
    frames: ArrayLike,
    queries: ArrayLike,
    horizon: int,
    *,
    fb_threshold: float = 1.0,
    preset: str = "medium",
    num_threads: int | None = None,
) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """Tracks query points through DIS dense optical flow with a forward-backward check.

    Per frame pair, forward and backward DIS flow (``cv2.DISOpticalFlow``) are computed once
    and bilinearly sampled at the points of every active window, so the cost is about two
    flow computations per frame whatever the number of windows and points. The
    forward-backward check and the lost-point rule are those of :func:`track_lk`.

    Args:
      frames: uint8[T H W 3] RGB (or uint8[T H W] gray) frames of one episode.
      queries: float[N 2] pixel (u, v) queries used at every start frame, or float[T N 2].
      horizon: L, frames per window including the start frame.
      fb_threshold: largest forward-backward error in pixels of a reliable step.
      preset: DIS preset, "ultrafast", "fast" or "medium" (slower, more accurate).
        Frames must be at least 12 px on each side with an aspect ratio of at most 2.5.
      num_threads: OpenCV threads during the call; None leaves the global setting alone.

    Returns:
      tracks float32[T N L 2] and visible bool[T N L] (see the module docstring).
    """
    gray = _check_frames(frames)
    num_frames, height, width = gray.shape
    q = _check_queries(queries, num_frames)
    horizon = _check_tracker_args(horizon, fb_threshold)
    if preset not in DIS_PRESETS:
        raise ValueError(f"preset: expected one of {sorted(DIS_PRESETS)}, got {preset!r}")
    # OpenCV's DIS rejects frames under 12 px and segfaults on some thin ones (e.g. 24x94,
    # aspect >= 3); aspects up to 2.5 ran safely for short sides of 12 to 300 px.
    short, long = sorted((height, width))
    if short < 12 or long > 2.5 * short:
        raise ValueError(
            f"frames: dense flow needs both sides >= 12 px and an aspect ratio <= 2.5, got "
            f"H={height} W={width}; use track_lk for such frames"
        )
    dis = cv2.DISOpticalFlow_create(DIS_PRESETS[preset])

    def step(j: int, pts: NDArray[np.float32]) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
        forward = dis.calc(gray[j], gray[j + 1], None)  # [H W 2] (du, dv)
        backward = dis.calc(gray[j + 1], gray[j], None)
        moved = pts + _sample(forward, pts)
        back = moved + _sample(backward, moved)
        return moved, np.linalg.norm(back - pts, axis=-1) <= fb_threshold

    with _opencv_threads(num_threads):
        return _track_windows(q, horizon, height, width, step)


def track_errors(
    pred_tracks: ArrayLike,
    gt_tracks: ArrayLike,
    gt_visible: ArrayLike,
    pred_visible: ArrayLike | None = None,
) -> dict[str, float]:
    """Pixel errors of predicted tracks over ground-truth-visible points at steps >= 1.

    Step 0 is left out: it is the query itself, exact by construction. Predicted positions of
    points the prediction has lost still count (trackers hold their last position).

    Args:
      pred_tracks: float[... L 2] predicted positions, e.g. float[T N L 2].
      gt_tracks: float[... L 2] true positions.
      gt_visible: bool[... L] true visibility.
      pred_visible: bool[... L] predicted visibility, for the visibility scores.

    Returns:
      dict with "median", "mean", "p90" (pixel error), "within_1px" (fraction of errors
      <= 1 px), "num_points" (GT-visible points counted), "visible_recall" (fraction of them
      predicted visible) and "visible_precision" (fraction of predicted-visible points,
      steps >= 1, that are GT-visible). Values without data, or the visibility scores when
      ``pred_visible`` is None, are NaN.
    """
    pred = np.asarray(pred_tracks, dtype=np.float64)
    gt = np.asarray(gt_tracks, dtype=np.float64)
    gt_vis = np.asarray(gt_visible)
    if gt.ndim < 2 or gt.shape[-1] != 2 or pred.shape != gt.shape:
        raise ValueError(
            f"pred_tracks, gt_tracks: expected the same shape float[... L 2], got "
            f"{list(pred.shape)} and {list(gt.shape)}"
        )
    if gt_vis.shape != gt.shape[:-1] or gt_vis.dtype != np.bool_:
        raise ValueError(
            f"gt_visible: expected bool{list(gt.shape[:-1])}, got shape {list(gt_vis.shape)} "
            f"dtype {gt_vis.dtype}"
        )
    counted = gt_vis[..., 1:]
    errors = np.linalg.norm(pred[..., 1:, :] - gt[..., 1:, :], axis=-1)[counted]
    nan = float("nan")
    result = {
        "median": float(np.median(errors)) if errors.size else nan,
        "mean": float(np.mean(errors)) if errors.size else nan,
        "p90": float(np.percentile(errors, 90)) if errors.size else nan,
        "within_1px": float(np.mean(errors <= 1.0)) if errors.size else nan,
        "num_points": float(errors.size),
        "visible_recall": nan,
        "visible_precision": nan,
    }
    if pred_visible is not None:
        pred_vis = np.asarray(pred_visible)
        if pred_vis.shape != gt_vis.shape or pred_vis.dtype != np.bool_:
            raise ValueError(
                f"pred_visible: expected bool{list(gt_vis.shape)}, got shape "
                f"{list(pred_vis.shape)} dtype {pred_vis.dtype}"
            )
        said_visible = pred_vis[..., 1:]
        if counted.any():
            result["visible_recall"] = float(np.mean(said_visible[counted]))
        if said_visible.any():
            result["visible_precision"] = float(np.mean(counted[said_visible]))
    return result
