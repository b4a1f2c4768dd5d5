"""Tracks computed elsewhere (CoTracker, TAPIR, ...): the file layout, and the resize map.

One ``.npz`` file per episode, named ``{episode_index:08d}.npz`` (see :func:`track_file_path`)
inside a tracks directory, holding

* ``tracks``: float[T N L 2], pixel positions (u, v) in the ORIGINAL frames of the episode
  (before any resize or crop), window layout as in ``tracking`` (``tracks[t, :, 0]`` are the
  queries of the window starting at frame t; build_clips expects its G x G grid there);
* ``visible``: bool[T N L] (integer 0/1 is accepted too);
* ``image_size`` (optional): int[2] = (H, W) of the frames the tracks were computed on.

:func:`save_track_file` writes this layout; :func:`transform_tracks` maps tracks into resized
frames with the same scale and offset as the frames (``frames.FrameTransform``).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike, NDArray

from data_pipelines.tracks.trackers import _in_image, _positive_int

# --------------------------------------------------------------------------------------------
# Tracks computed elsewhere: file backend
# --------------------------------------------------------------------------------------------


def track_file_path(tracks_dir: str | Path, episode_index: int) -> Path:
    """Path of an episode's track file: ``tracks_dir / f"{episode_index:08d}.npz"``.

    Args:
      tracks_dir: directory holding one track file per episode.
      episode_index: non-negative episode index.

    Returns:
      The file path (which need not exist).
    """
    if (
        isinstance(episode_index, bool)
        or not isinstance(episode_index, int | np.integer)
        or episode_index < 0
    ):
        raise ValueError(f"episode_index: expected a non-negative int, got {episode_index!r}")
    return Path(tracks_dir) / f"{int(episode_index):08d}.npz"


def _validate_track_arrays(
    tracks: NDArray, visible: NDArray, where: str
) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    if tracks.ndim != 4 or tracks.shape[-1] != 2 or not np.issubdtype(tracks.dtype, np.floating):
        raise ValueError(
            f"{where}: tracks: expected float[T N L 2], got shape {list(tracks.shape)} "
            f"dtype {tracks.dtype}"
        )
    if visible.shape != tracks.shape[:-1]:
        raise ValueError(
            f"{where}: visible: expected shape {list(tracks.shape[:-1])} to match tracks "
            f"{list(tracks.shape)}, got {list(visible.shape)}"
        )
    if visible.dtype != np.bool_:
        if not np.issubdtype(visible.dtype, np.integer) or not np.isin(visible, (0, 1)).all():
            raise ValueError(
                f"{where}: visible: expected bool (or integer 0/1), got dtype {visible.dtype}"
            )
        visible = visible.astype(bool)
    if not np.all(np.isfinite(tracks)):
        bad = int(np.count_nonzero(~np.isfinite(tracks)))
        raise ValueError(f"{where}: tracks: contains {bad} non-finite values")
    return tracks.astype(np.float32), visible


def _validate_image_size(image_size: ArrayLike, where: str) -> tuple[int, int]:
    size = np.asarray(image_size)
    if size.shape != (2,) or not np.issubdtype(size.dtype, np.integer) or np.any(size < 1):
        raise ValueError(
            f"{where}: image_size: expected positive int[2] = (H, W), got {size.tolist()!r}"
        )
    return int(size[0]), int(size[1])


def save_track_file(
    path: str | Path,
    tracks: ArrayLike,
    visible: ArrayLike,
    image_size: tuple[int, int] | None = None,
) -> None:
    """Writes tracks in the layout :func:`load_track_file` reads (see the module docstring).

    Args:
      path: destination ``.npz`` file; missing parent directories are created.
      tracks: float[T N L 2] pixel positions in the original frames.
      visible: bool[T N L].
      image_size: (H, W) of the frames the tracks were computed on, stored when given.
    """
    path = Path(path)
    tracks, visible = _validate_track_arrays(np.asarray(tracks), np.asarray(visible), str(path))
    arrays: dict[str, NDArray] = {"tracks": tracks, "visible": visible}
    if image_size is not None:
        arrays["image_size"] = np.asarray(_validate_image_size(image_size, str(path)), np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:  # an open file keeps np.savez from appending another ".npz"
        np.savez(f, **arrays)


def load_track_file(
    path: str | Path,
    num_frames: int,
    *,
    image_size: tuple[int, int] | None = None,
) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """Loads and validates an episode's precomputed tracks (layout in the module docstring).

    Args:
      path: the episode's ``.npz`` file (see :func:`track_file_path`).
      num_frames: T, frames of the episode the tracks must cover.
      image_size: (H, W) of the episode's original frames; when given and the file stores
        ``image_size``, the two must agree.

    Returns:
      tracks float32[T N L 2] in pixels of the original frames, visible bool[T N L].

    Raises:
      ValueError: naming the file and the problem (missing file or key, unreadable file,
        wrong shapes or dtypes, T != num_frames, non-finite positions, image size mismatch).
    """
    path = Path(path)
    num_frames = _positive_int(num_frames, "num_frames")
    if not path.is_file():
        raise ValueError(f"{path}: track file not found")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        with data:
            contents = {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: cannot read track file: {e}") from e
    for key in ("tracks", "visible"):
        if key not in contents:
            raise ValueError(f"{path}: missing key {key!r} (has {sorted(contents)})")
    tracks, visible = _validate_track_arrays(contents["tracks"], contents["visible"], str(path))
    if tracks.shape[0] != num_frames:
        raise ValueError(
            f"{path}: tracks cover T={tracks.shape[0]} frames but the episode has "
            f"num_frames={num_frames}"
        )
    if "image_size" in contents:
        stored = _validate_image_size(contents["image_size"], str(path))
        if image_size is not None and stored != tuple(int(s) for s in image_size):
            raise ValueError(
                f"{path}: tracks were computed on frames of size {stored}, but the episode's "
                f"frames are {tuple(image_size)}"
            )
    return tracks, visible


# --------------------------------------------------------------------------------------------
# Resizing and evaluation
# --------------------------------------------------------------------------------------------


def _float_pair(x: object, name: str, nonzero: bool = False) -> NDArray[np.float64]:
    try:
        pair = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: expected two numbers (x, y), got {x!r}") from e
    # A negative scale is a flip (LIBERO's 180-degree storage rotation); zero collapses points.
    if pair.shape != (2,) or not np.all(np.isfinite(pair)) or (nonzero and np.any(pair == 0)):
        kind = "non-zero finite" if nonzero else "finite"
        raise ValueError(f"{name}: expected two {kind} numbers (x, y), got {x!r}")
    return pair


def transform_tracks(
    tracks: ArrayLike,
    scale: tuple[float, float],
    offset: tuple[float, float],
    out_size: tuple[int, int],
    visible: ArrayLike,
) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """Maps track positions through the resize-and-shift applied to the frames.

    u' = (u + 0.5) * sx - 0.5 + ox and v' = (v + 0.5) * sy - 0.5 + oy, i.e. pixel edges
    scale and the result shifts by the (crop or pad) offset. Points landing outside the
    output image [-0.5, W' - 0.5) x [-0.5, H' - 0.5) become not visible; their positions are
    kept as mapped, not clipped.

    Args:
      tracks: float[... 2] pixel positions (u, v), e.g. float[T N L 2].
      scale: (sx, sy), positive scale factors along u and v.
      offset: (ox, oy), pixel shift along u and v after scaling.
      out_size: (H', W') of the output frames.
      visible: bool[...] matching ``tracks`` without its last axis.

    Returns:
      tracks float32[... 2] in output pixels and visible bool[...].
    """
    tracks = np.asarray(tracks)
    if tracks.ndim < 1 or tracks.shape[-1] != 2 or not np.issubdtype(tracks.dtype, np.floating):
        raise ValueError(
            f"tracks: expected float[... 2], got shape {list(tracks.shape)} dtype {tracks.dtype}"
        )
    visible = np.asarray(visible)
    if visible.shape != tracks.shape[:-1] or visible.dtype != np.bool_:
        raise ValueError(
            f"visible: expected bool{list(tracks.shape[:-1])} to match tracks "
            f"{list(tracks.shape)}, got shape {list(visible.shape)} dtype {visible.dtype}"
        )
    s = _float_pair(scale, "scale", nonzero=True)
    o = _float_pair(offset, "offset")
    try:
        out_h, out_w = (int(x) for x in out_size)
    except (TypeError, ValueError) as e:
        raise ValueError(f"out_size: expected (H, W), got {out_size!r}") from e
    if out_h < 1 or out_w < 1:
        raise ValueError(f"out_size: expected positive (H, W), got {out_size!r}")
    mapped = (tracks.astype(np.float64) + 0.5) * s - 0.5 + o
    return mapped.astype(np.float32), visible & _in_image(mapped, out_h, out_w)
