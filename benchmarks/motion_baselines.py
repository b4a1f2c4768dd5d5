"""Hand-written motion predictors on a clip directory: the baselines the action module must beat.

  python -m benchmarks.motion_baselines --clips DIR --out FILE.json [--radius 2] [--quick]

Reads a ``build_clips`` directory whose clips start at consecutive frames (as the toy world's
do) and scores, on the steps that move more than 1 px (``flipjax.metrics.moving_steps``, the
CVAE trainer's ``*_moving`` mask) and on every step, the ADE of

* ``still``: no motion, every point stays where it is;
* ``constant_velocity``: each point of clip (episode, t) takes the mean one-frame displacement
  of the clip (episode, t-1) tracks that landed within ``--radius`` px of it at frame t, and
  keeps moving at that velocity (points nothing landed near stay still). It reads only the
  history, as the CVAE's prior must.

A clip whose previous frame has no clip is skipped. ``ratio`` is constant_velocity / still on
moving steps: what a motion model gets from extrapolating the history alone.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from benchmarks.report import write_result
from flipjax import metrics


def constant_velocity(tracks: np.ndarray, previous: np.ndarray, radius: float) -> np.ndarray:
    """The constant-velocity prediction of one clip's tracks.

    Args:
      tracks: float[N L 2] the clip's tracks (only the start, ``tracks[:, 0]``, is read).
      previous: float[M L 2] the tracks of the clip one frame earlier.
      radius: pixels around a start within which a previous track's frame-t position counts.

    Returns:
      float[N L 2] start + velocity * step.
    """
    if tracks.ndim != 3 or previous.ndim != 3 or tracks.shape[1:] != previous.shape[1:]:
        raise ValueError(f"tracks [N L 2] and previous [M L 2] must share L, got {tracks.shape} "
                         f"and {previous.shape}")
    start, landed = tracks[:, 0], previous[:, 1]
    near = np.linalg.norm(start[:, None] - landed[None], axis=-1) < radius      # N M
    count = near.sum(1, keepdims=True)
    velocity = near.astype(np.float64) @ (previous[:, 1] - previous[:, 0]) / np.maximum(count, 1)
    steps = np.arange(tracks.shape[1], dtype=np.float64)
    return start[:, None] + velocity[:, None] * steps[None, :, None]


def score(clips: dict[tuple[int, int], np.ndarray], radius: float) -> dict[str, Any]:
    """ADE of still and constant velocity over clips keyed by (episode, first frame)."""
    dist = {"still": [], "constant_velocity": []}
    moving = []
    for (episode, frame), tracks in sorted(clips.items()):
        prev = clips.get((episode, frame - 1))
        if prev is None:
            continue
        tracks = tracks.astype(np.float64)
        preds = {"still": np.repeat(tracks[:, :1], tracks.shape[1], axis=1),
                 "constant_velocity": constant_velocity(tracks, prev.astype(np.float64), radius)}
        gt = tracks[None].astype(np.float32)
        for k, p in preds.items():
            dist[k].append(np.asarray(metrics.step_distances(p[None].astype(np.float32),
                                                             gt)).ravel())
        moving.append(np.asarray(metrics.moving_steps(gt)).ravel())
    if not moving:
        raise ValueError("no clip has a clip one frame earlier in the same episode; these "
                         "baselines need clips at consecutive frames")
    mask = np.concatenate(moving)
    out: dict[str, Any] = {"clips_scored": len(moving), "moving_steps": int(mask.sum()),
                           "radius_px": radius}
    for k, v in dist.items():
        d = np.concatenate(v)
        out[f"{k}_ade_moving"] = float(d[mask].mean()) if mask.any() else float("nan")
        out[f"{k}_ade_all"] = float(d.mean())
    out["ratio"] = out["constant_velocity_ade_moving"] / out["still_ade_moving"]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", required=True, help="A build_clips directory.")
    p.add_argument("--out", required=True, help="JSON file to write.")
    p.add_argument("--radius", type=float, default=2.0,
                   help="Pixels within which a previous track counts as the same object.")
    p.add_argument("--quick", action="store_true", help="The first 200 clips only.")
    a = p.parse_args(argv)
    if a.radius <= 0:
        raise ValueError(f"--radius must be positive, got {a.radius}")
    from data_pipelines.loader import ClipDataset

    ds = ClipDataset(a.clips, history=1, future=0)
    n = min(len(ds), 200) if a.quick else len(ds)
    clips = {}
    for i in range(n):
        x = ds[i]
        clips[(int(x["episode_id"]), int(x["frame_index"]))] = np.asarray(x["tracks"])
    result = score(clips, a.radius)
    result["targets_met"] = {}
    for k in ("still_ade_moving", "constant_velocity_ade_moving", "ratio"):
        print(f"  {k}: {result[k]:.3f}", flush=True)
    write_result(a.out, result)
    return result


if __name__ == "__main__":
    from flipjax import console

    with console.user_errors("benchmarks.motion_baselines"):
        main()
