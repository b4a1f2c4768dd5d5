"""The data pipeline end to end on the embedded toy world.

    python -m experiments.data_demo [--out_dir outputs/data_demo --episodes 8]

Writes the toy world as RLDS, builds tracked clips with the default LK tracker (23x23 grid,
horizon 16) and with the exact ground truth, reports LK's error against it, loads a shuffled
batch through the grain loader and draws the flows (``tracks.png``); the figures go to
``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out_dir", default="outputs/data_demo")
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import logging

    logging.set_verbosity(logging.WARNING)

    from data_pipelines import toy
    from data_pipelines.build_clips import BuildOptions, build_clips
    from data_pipelines.loader import ClipDataset, make_loader

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"[1/4] toy world: {args.episodes} + 2 episodes as RLDS ...", flush=True)
    rlds = toy.build(out / "rlds", {"train": args.episodes, "val": 2}, seed=0, progress=True)
    summary: dict = {"rlds": str(rlds)}
    builds = {}
    for step, tracker in ((2, "lk"), (3, "ground_truth")):
        print(f"[{step}/4] build_clips --tracker={tracker} ...", flush=True)
        builds[tracker] = build_clips(BuildOptions(
            rlds_dir=str(rlds), out=str(out / f"clips_{tracker}"), schema="toy",
            tracker=tracker, workers=args.workers, episodes_per_shard=4))
        c = builds[tracker]["counts"]
        summary[f"clips_{tracker}"] = {"clips": c["clips"], "episodes": c["episodes"],
                                       "skipped": c["skipped"],
                                       "kb_per_clip": builds[tracker]["bytes"]["per_clip"] / 1e3}
    lk, gt = ClipDataset(out / "clips_lk"), ClipDataset(out / "clips_ground_truth")
    errs, moving = [], []
    for i in range(0, len(lk), 7):
        a, b = lk[i], gt[i]
        vis = b["visible"][:, 1:]
        e = np.linalg.norm(a["tracks"][:, 1:] - b["tracks"][:, 1:], axis=-1)
        errs.append(e[vis])
        move = vis & (np.linalg.norm(b["tracks"][:, 1:] - b["tracks"][:, :1], axis=-1) > 2)
        moving.append(e[move])
    summary["lk_vs_ground_truth_px"] = {
        "median_visible": float(np.median(np.concatenate(errs))),
        "median_moving": float(np.median(np.concatenate(moving)))}
    print("[4/4] grain loader: one shuffled batch, flows drawn to tracks.png ...", flush=True)
    batch = next(make_loader(lk, 8, seed=0, process_index=0, process_count=1))
    summary["batch_shapes"] = {k: list(v.shape) for k, v in batch.items()}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from flipjax.viz import draw_tracks

        fig, axes = plt.subplots(2, 4, figsize=(10, 5.4))
        for ax, b in zip(axes.flat, range(8), strict=True):
            cur = batch["history"][b, -1]
            draw_tracks(ax, cur, batch["tracks"][b], batch["visible"][b], every=2,
                        min_motion=1.0, title=f"episode {batch['episode_id'][b]} "
                                              f"frame {batch['frame_index'][b]}")
        fig.tight_layout()
        fig.savefig(out / "tracks.png", dpi=110)
        plt.close(fig)
        summary["figure"] = str(out / "tracks.png")
    except ImportError:
        print("matplotlib missing (pip install -e '.[viz]'): no figure", flush=True)
    summary["seconds"] = time.perf_counter() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1), flush=True)
    return summary


if __name__ == "__main__":
    main()
