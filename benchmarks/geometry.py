"""Accuracy and throughput of the rigid fit on seeded synthetic box sequences.

    python -m benchmarks.geometry --out geometry.json [--quick]

Cases (flipjax.geometry.synthetic defaults): boxes 0.7 to 1.3 m from a 128x128 camera with a
60 deg field of view, 500 points, 8 frames, 0.5 px noise, 20% outlier tracks moved 5 to 30 px,
1 to 8 deg and 0.5 to 3 cm of motion per step.

Figures: per-step errors of the fitted T_t against the truth for every frame t >= 1 (rotation in
degrees, translation in mm; median and 90th percentile), for the default direct fit and for
AVDC-style chaining; throughput in sequences per second at batch 1, 64 and 1024 with compile
time reported apart; and the AVDC-style NumPy/SciPy reference fit
(flipjax/geometry/avdc_reference.py) as the baseline on a few sequences of the same run, with
the speed and accuracy ratios against it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np

from benchmarks.report import write_result
from flipjax import geometry
from flipjax.geometry import se3, synthetic

TARGETS = {"rot_err_deg_median_max": 0.3, "rot_err_deg_p90_max": 1.0,
           "seq_per_s_at_1024_min": 1000.0}


def _errors(transforms, truth) -> dict:
    rot = np.asarray(se3.rotation_error_deg(transforms, truth))[:, 1:]
    trans = 1000.0 * np.asarray(se3.translation_error(transforms, truth))[:, 1:]
    return {"rot_err_deg_median": float(np.median(rot)),
            "rot_err_deg_p90": float(np.percentile(rot, 90)),
            "trans_err_mm_median": float(np.median(trans)),
            "trans_err_mm_p90": float(np.percentile(trans, 90)),
            "num_steps": int(rot.size)}


def _fit(scene, cfg, config=geometry.FitConfig()):
    return geometry.fit_rigid_sequence(scene.points3d, scene.tracks, scene.K,
                                       visible=scene.visible, image_size=cfg.image_size,
                                       config=config)


def _throughput(batch: int, repeats: int, cfg) -> dict:
    scene = synthetic.make_box_scenes(jax.random.PRNGKey(1000 + batch), batch, cfg)
    start = time.perf_counter()
    jax.block_until_ready(_fit(scene, cfg))
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(_fit(scene, cfg))
        times.append(time.perf_counter() - start)
    best, median = min(times), float(np.median(times))
    return {"batch": batch, "compile_s": max(first - median, 0.0), "first_call_s": first,
            "run_s_median": median, "run_s_best": best, "repeats": repeats,
            "seq_per_s": batch / median, "seq_per_s_best": batch / best}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--quick", action="store_true", help="small run (CI smoke)")
    parser.add_argument("--avdc_sequences", type=int, default=None)
    args = parser.parse_args(argv)
    cfg = synthetic.BoxSceneConfig()
    acc_batch = 64 if args.quick else 1024
    batches = (1, 64) if args.quick else (1, 64, 1024)
    repeats = 2 if args.quick else 5
    avdc_n = args.avdc_sequences if args.avdc_sequences is not None else (1 if args.quick else 4)
    avdc_restarts = 5 if args.quick else 50

    result = {"benchmark": "geometry", "quick": args.quick, "scene": vars(cfg) | {},
              "fit_config": vars(geometry.FitConfig()),
              "environment": {"jax": jax.__version__, "backend": jax.default_backend(),
                              "devices": [str(d) for d in jax.devices()],
                              "cpu_count": os.cpu_count(), "platform": platform.platform()},
              "targets": TARGETS}
    scene = synthetic.make_box_scenes(jax.random.PRNGKey(0), acc_batch, cfg)
    print(f"accuracy on {acc_batch} sequences ...", flush=True)
    result["accuracy"] = {"direct": _errors(_fit(scene, cfg).transforms, scene.transforms),
                          "chained": _errors(_fit(scene, cfg, geometry.FitConfig(chain=True))
                                             .transforms, scene.transforms)}
    print(json.dumps(result["accuracy"], indent=1), flush=True)

    result["throughput"] = []
    for b in batches:
        print(f"throughput at batch {b} ...", flush=True)
        result["throughput"].append(_throughput(b, repeats, cfg))
        print(json.dumps(result["throughput"][-1]), flush=True)

    if avdc_n > 0:
        from flipjax.geometry import avdc_reference

        print(f"AVDC-style baseline on {avdc_n} sequences ({avdc_restarts} restarts) ...",
              flush=True)
        K = np.asarray(scene.K, np.float64)
        ests, secs = [], []
        for i in range(avdc_n):
            start = time.perf_counter()
            ests.append(avdc_reference.fit_sequence(
                np.asarray(scene.points3d[i]), np.asarray(scene.tracks[i]), K,
                np.asarray(scene.visible[i]), restarts=avdc_restarts, seed=i))
            secs.append(time.perf_counter() - start)
            print(f"  sequence {i}: {secs[-1]:.1f} s", flush=True)
        avdc_err = _errors(np.stack(ests).astype(np.float32), scene.transforms[:avdc_n])
        ours_err = _errors(np.asarray(_fit(scene, cfg).transforms)[:avdc_n],
                           scene.transforms[:avdc_n])
        batch1 = next(t for t in result["throughput"] if t["batch"] == 1)
        best = max(result["throughput"], key=lambda t: t["seq_per_s"])
        result["avdc_baseline"] = {
            "sequences": avdc_n, "restarts": avdc_restarts,
            "s_per_sequence_median": float(np.median(secs)),
            "avdc": avdc_err, "flipjax_same_sequences": ours_err,
            "speedup_batch1_latency": float(np.median(secs)) / batch1["run_s_median"],
            "speedup_best_throughput": float(np.median(secs)) * best["seq_per_s"],
            "rot_err_median_ratio_avdc_over_flipjax":
                avdc_err["rot_err_deg_median"] / max(ours_err["rot_err_deg_median"], 1e-12)}
        print(json.dumps(result["avdc_baseline"], indent=1), flush=True)

    acc = result["accuracy"]["direct"]
    big = [t for t in result["throughput"] if t["batch"] == 1024]
    result["targets_met"] = {
        "rot_err_deg_median": acc["rot_err_deg_median"] <= TARGETS["rot_err_deg_median_max"],
        "rot_err_deg_p90": acc["rot_err_deg_p90"] <= TARGETS["rot_err_deg_p90_max"],
        "seq_per_s_at_1024": (big[0]["seq_per_s"] >= TARGETS["seq_per_s_at_1024_min"]
                              if big else None),
    }
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    from flipjax import console

    with console.user_errors("benchmarks.geometry"):
        main()
