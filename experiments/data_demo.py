"""The data pipeline end to end, on the embedded toy world or on an RLDS dataset of yours.

    python -m experiments.data_demo [--out_dir outputs/data_demo --episodes 8]
    python -m experiments.data_demo --rlds_dir=DIR/bridge_dataset/1.0.0 [--schema=auto \
        --camera=image_0 --size=64 --horizon=8 --out_dir=outputs/data_demo_real]

Toy world: writes it as RLDS, builds tracked clips with the default LK tracker (23x23 grid,
horizon 16) and with the exact ground truth, reports LK's error against it, loads a shuffled
batch through the grain loader and draws the flows (``tracks.png``). ``--rlds_dir``: builds LK
clips of that dataset (its own language embedding when it has one), loads a batch and draws
the tracks of its most moving clips, one per episode (``tracks.png``). The figures go to
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
    parser.add_argument("--rlds_dir", default=None,
                        help="a prepared RLDS dataset (DIR/name/version) instead of the toy world")
    parser.add_argument("--schema", default="auto", help="with --rlds_dir: build_clips --schema")
    parser.add_argument("--camera", default=None, help="with --rlds_dir: build_clips --camera")
    parser.add_argument("--size", type=int, default=128, help="with --rlds_dir: frame side")
    parser.add_argument("--grid", type=int, default=16, help="with --rlds_dir: query grid side")
    parser.add_argument("--horizon", type=int, default=8, help="with --rlds_dir: track length")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import logging

    logging.set_verbosity(logging.WARNING)

    from data_pipelines import toy
    from data_pipelines.build_clips import BuildOptions, build_clips
    from data_pipelines.loader import ClipDataset, make_loader

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.rlds_dir:
        return _real(args, out)
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
    titles = [f"episode {e} frame {f}" for e, f in zip(batch["episode_id"],
                                                      batch["frame_index"], strict=True)]
    _figure(out, summary, [(batch["history"][b, -1], batch["tracks"][b], batch["visible"][b],
                            titles[b]) for b in range(8)], every=2, min_motion=1.0)
    summary["seconds"] = time.perf_counter() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1), flush=True)
    return summary


def _figure(out: Path, summary: dict, panels: list, every: int, min_motion: float) -> None:
    """Draws up to 8 (frame, tracks, visible, title) panels to ``out/tracks.png``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from flipjax.viz import draw_tracks
    except ImportError:
        print("matplotlib missing (pip install -e '.[viz]'): no figure", flush=True)
        return
    fig, axes = plt.subplots(2, 4, figsize=(10, 5.4))
    for ax in axes.flat:
        ax.axis("off")
    for ax, (frame, tracks, visible, title) in zip(axes.flat, panels[:8], strict=False):
        draw_tracks(ax, frame, tracks, visible, every=every, min_motion=min_motion, title=title)
    fig.tight_layout()
    fig.savefig(out / "tracks.png", dpi=110)
    plt.close(fig)
    summary["figure"] = str(out / "tracks.png")


def _real(args: argparse.Namespace, out: Path) -> dict:
    """The demo on a user's RLDS dataset: LK clips, a loader batch, the most moving clips."""
    from data_pipelines.build_clips import BuildOptions, build_clips
    from data_pipelines.loader import ClipDataset, make_loader
    from data_pipelines.rlds import feature_keys, open_builder
    from data_pipelines.schemas import get_schema, matching_schemas

    t0 = time.perf_counter()
    builder = open_builder(args.rlds_dir)
    schema = args.schema
    if schema == "auto":
        found = matching_schemas(feature_keys(builder))
        schema = found[0].name if found else schema  # build_clips names the problem otherwise
    embedding = schema in ("auto", "generic") or bool(get_schema(schema).embedding_key)
    print(f"[1/3] build_clips --schema={schema} --tracker=lk on {args.rlds_dir} ...", flush=True)
    m = build_clips(BuildOptions(
        rlds_dir=str(args.rlds_dir), out=str(out / "clips_lk"), schema=schema, camera=args.camera,
        size=(args.size, args.size), grid=args.grid, horizon=args.horizon, history=1, future=0,
        text="dataset" if embedding else "hash", workers=args.workers))
    c = m["counts"]
    summary: dict = {"rlds": str(args.rlds_dir), "schema": m["options"]["schema"],
                     "clips": c["clips"], "episodes": c["episodes"], "skipped": c["skipped"],
                     "statistics": m["statistics"], "build_seconds": m["timing"]["seconds"]}
    ds = ClipDataset(out / "clips_lk", history=1, future=0)
    print("[2/3] grain loader: one shuffled batch ...", flush=True)
    batch = next(make_loader(ds, min(8, len(ds)), seed=0, process_index=0, process_count=1))
    summary["batch_shapes"] = {k: list(v.shape) for k, v in batch.items()}
    print("[3/3] the most moving clip of each episode, tracks drawn to tracks.png ...", flush=True)
    best: dict[int, tuple[float, int]] = {}
    for i in range(len(ds)):
        clip = ds[i]
        vis = clip["visible"].all(1)
        disp = np.linalg.norm(clip["tracks"][:, -1] - clip["tracks"][:, 0], axis=-1)[vis]
        score = float(np.sort(disp)[-10:].mean()) if disp.size else 0.0
        e = int(clip["episode_id"])
        if score > best.get(e, (-1.0, 0))[0]:
            best[e] = (score, i)
    chosen = sorted(best.values(), reverse=True)[:8]
    panels = []
    for _, i in chosen:
        clip = ds[i]
        panels.append((clip["history"][-1], clip["tracks"], clip["visible"],
                       f"episode {clip['episode_id']} frame {clip['frame_index']}"))
    _figure(out, summary, panels, every=1, min_motion=0.5)
    summary["seconds"] = time.perf_counter() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1), flush=True)
    return summary


if __name__ == "__main__":
    from flipjax import console

    with console.user_errors("data_demo"):  # one line (FLIPJAX_DEBUG=1: traceback)
        main()
