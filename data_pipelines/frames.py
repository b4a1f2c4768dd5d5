"""Frame preparation: undo the storage orientation, fix the aspect ratio (crop or pad), resize.

The same transform maps pixel positions, so tracks computed on the original frames (ground
truth, CoTracker files) land exactly on the resized frames. Positions follow the project
convention: (u, v) = (column, row) with pixel centres at integers, so a point maps as
``u' = (u + 0.5) * scale_u - 0.5 + offset_u``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipelines.schemas import check_orientation

ASPECT_MODES = ("crop", "pad")


@dataclasses.dataclass(frozen=True)
class FrameTransform:
    """How raw frames of one size become model frames of another.

    Attributes:
      in_size: (H, W) of the stored frames.
      out_size: (H', W') of the prepared frames.
      aspect: ``crop`` (centre crop to the output aspect) or ``pad`` (letterbox with black).
      orientation: how stored frames differ from the camera view
        (``data_pipelines.schemas.ORIENTATIONS``); undone before cropping.
      box: (top, left, height, width) of the crop in the re-oriented input (the full frame for
        pad).
      resized: (h, w) the crop is resized to before padding (== out_size for crop).
      pad: (top, left) padding in the output.
    """

    in_size: tuple[int, int]
    out_size: tuple[int, int]
    aspect: str
    orientation: str
    box: tuple[int, int, int, int]
    resized: tuple[int, int]
    pad: tuple[int, int]

    @property
    def flips(self) -> tuple[bool, bool]:
        """(columns reversed, rows reversed) when undoing the orientation."""
        return (self.orientation in ("rotate_180", "mirror_lr"),
                self.orientation in ("rotate_180", "flip_ud"))

    @property
    def scale(self) -> tuple[float, float]:
        """(scale_u, scale_v) of the point map, including the flips' signs."""
        fu, fv = self.flips
        return ((-1.0 if fu else 1.0) * self.resized[1] / self.box[3],
                (-1.0 if fv else 1.0) * self.resized[0] / self.box[2])

    @property
    def offset(self) -> tuple[float, float]:
        """(offset_u, offset_v) of the point map ``u' = (u + 0.5) * s - 0.5 + o``."""
        h, w = self.in_size
        top, left, bh, bw = self.box
        su, sv = self.resized[1] / bw, self.resized[0] / bh
        fu, fv = self.flips
        # A flip is the affine u -> (u + 0.5) * -1 - 0.5 + W; compose it with the crop.
        ou = (w if fu else 0.0) * su - left * su + self.pad[1]
        ov = (h if fv else 0.0) * sv - top * sv + self.pad[0]
        return (ou, ov)

    def points(self, uv: np.ndarray) -> np.ndarray:
        """Maps pixel positions ``float[... 2]`` of the stored frames to the prepared frames."""
        uv = np.asarray(uv, np.float32)
        if uv.shape[-1:] != (2,):
            raise ValueError(f"uv: expected shape [... 2], got {list(uv.shape)}")
        s = np.asarray(self.scale, np.float32)
        o = np.asarray(self.offset, np.float32)
        return (uv + 0.5) * s - 0.5 + o

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """Prepares frames.

        Args:
          frames: uint8[T H W C] (or [H W C]) as stored.

        Returns:
          uint8[T H' W' C] (or [H' W' C]).
        """
        import cv2

        frames = np.asarray(frames)
        single = frames.ndim == 3
        if single:
            frames = frames[None]
        if frames.ndim != 4 or tuple(frames.shape[1:3]) != self.in_size:
            raise ValueError(f"frames: expected shape [T {self.in_size[0]} {self.in_size[1]} C], "
                             f"got {list(frames.shape)}")
        fu, fv = self.flips
        if fu:
            frames = frames[:, :, ::-1]
        if fv:
            frames = frames[:, ::-1]
        top, left, bh, bw = self.box
        frames = frames[:, top:top + bh, left:left + bw]
        rh, rw = self.resized
        if (rh, rw) != (bh, bw):
            # Area averaging when shrinking avoids aliasing that would confuse the tracker.
            interp = cv2.INTER_AREA if rh * rw < bh * bw else cv2.INTER_LINEAR
            frames = np.stack([cv2.resize(np.ascontiguousarray(f), (rw, rh),
                                          interpolation=interp).reshape(rh, rw, -1)
                               for f in frames])
        if self.pad != (0, 0) or (rh, rw) != self.out_size:
            out = np.zeros((len(frames), *self.out_size, frames.shape[-1]), frames.dtype)
            out[:, self.pad[0]:self.pad[0] + rh, self.pad[1]:self.pad[1] + rw] = frames
            frames = out
        frames = np.ascontiguousarray(frames)
        return frames[0] if single else frames


def plan_frames(in_size: tuple[int, int], out_size: tuple[int, int], aspect: str = "crop",
                orientation: str = "none") -> FrameTransform:
    """Plans the transform from stored frames of ``in_size`` to ``out_size``.

    Args:
      in_size: (H, W) of the stored frames.
      out_size: (H', W') wanted.
      aspect: ``crop`` keeps the centre at the output aspect ratio; ``pad`` keeps the whole frame
        and letterboxes it.
      orientation: how the stored frames differ from the camera view
        (``data_pipelines.schemas.ORIENTATIONS``; LIBERO's RLDS: ``mirror_lr``).

    Returns:
      The FrameTransform.
    """
    if aspect not in ASPECT_MODES:
        raise ValueError(f"aspect must be one of {ASPECT_MODES}, got {aspect!r}")
    check_orientation(orientation)
    (h, w), (oh, ow) = in_size, out_size
    if min(h, w, oh, ow) <= 0:
        raise ValueError(f"sizes must be positive, got in_size={in_size} out_size={out_size}")
    if aspect == "crop":
        if w * oh > h * ow:  # too wide: crop columns
            bw, bh = max(1, round(h * ow / oh)), h
        else:
            bw, bh = w, max(1, round(w * oh / ow))
        box = ((h - bh) // 2, (w - bw) // 2, bh, bw)
        return FrameTransform(tuple(in_size), tuple(out_size), aspect, orientation, box,
                              (oh, ow), (0, 0))
    s = min(oh / h, ow / w)
    rh, rw = min(oh, max(1, round(h * s))), min(ow, max(1, round(w * s)))
    return FrameTransform(tuple(in_size), tuple(out_size), aspect, orientation, (0, 0, h, w),
                          (rh, rw), ((oh - rh) // 2, (ow - rw) // 2))
