"""Training figures: steps/s, input-wait fraction and peak memory of the real trainers; DiT
throughput, FLOPs and MFU of the train step.

    python -m benchmarks.train --out train.json [--quick] [--accelerator]

Two parts:

* ``trainers``: each trainer runs as ``python -m experiments.train`` in its own process on
  toy clips built once by this script (tiny ``:runlocal`` configs at 32x32 and, without
  ``--quick``, the S configs at 128x128), exactly as a user would run it. Figures come from the
  run's ``metrics.jsonl``: ``steps_per_s`` of the last logging window (compilation excluded),
  ``input_wait_fraction`` (share of that window spent blocked on the data loader) and the
  process's peak resident memory (``ru_maxrss`` of the child). The DiT runs on the ``pixels``
  codec here, so the figures are the DiT's, not an autoencoder's.
* ``dit_step``: the DiT train step alone (IDDPM loss, AdamW, EMA; synthetic latents already on
  the device, so no input pipeline) compiled once; FLOPs per step from XLA's cost analysis,
  steps/s, examples/s, peak device memory where the backend reports it, and MFU =
  per-device FLOPs x steps/s / peak FLOP/s for accelerators in :data:`PEAK_FLOPS` (XLA
  reports the cost of one device's partition of the SPMD program). On CPU
  (tiny and S, float32) MFU is null: there is no meaningful peak to divide by. With
  ``--accelerator`` (a GPU or TPU host) it runs DiT-B and DiT-L in bfloat16 at the paper's
  shapes (4 history + 15 future 16x16x4 latents, 529 flow points), the issue's target being
  MFU >= 40% for DiT-L on an H100.

Absolute times are only meaningful on the machine that produced them; compare ratios within
one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.report import write_result

ROOT = Path(__file__).resolve().parents[1]
# bf16 dense peak FLOP/s per device (vendor datasheets).
PEAK_FLOPS = {
    "H100": 989.4e12, "H200": 989.4e12, "A100": 312e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}
TARGETS = {"dit_l_mfu_min": 0.40}


def peak_flops(device: Any) -> float | None:
    """The bf16 peak of ``device`` from :data:`PEAK_FLOPS`, or None when unknown (CPU)."""
    kind = getattr(device, "device_kind", "")
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return None


# ------------------------------------------------------------------------------------------
# Part 1: the trainers as users run them
# ------------------------------------------------------------------------------------------


def build_data(root: Path, image_size: int, horizon: int, history: int, text_dim: int,
               episodes: int) -> Path:
    """Toy clips for the trainers (built once per layout)."""
    import ml_collections

    from experiments.configs.common import base_config
    from experiments.training import clips

    out = root / f"toy_{image_size}"
    if (out / "manifest.json").exists():
        return out
    c: ml_collections.ConfigDict = base_config()
    c.toy_episodes = episodes
    c.toy_grid = 8 if image_size <= 32 else 23
    spec = clips.ClipSpec(image_size=(image_size, image_size), horizon=horizon,
                          history=history, future=0, text_dim=text_dim)
    clips.build_toy_clips(c, "train", out, spec)
    return out


# Runs experiments.train in this child and reports the child's own peak RSS when it exits
# (absl exits through sys.exit, which runs atexit handlers).
_PEAK_WRAPPER = (
    "import atexit, resource, runpy, sys\n"
    "atexit.register(lambda: print('PEAK_RSS_KB', "
    "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr))\n"
    "sys.argv = ['experiments.train', *sys.argv[1:]]\n"
    "runpy.run_module('experiments.train', run_name='__main__', alter_sys=True)\n")


def run_trainer(name: str, config: str, data_dir: Path, workdir: Path, steps: int,
                overrides: dict[str, Any]) -> dict[str, Any]:
    """Runs one trainer in a child process and reads its figures back."""
    log_every = max(steps // 2, 1)
    flags = {"total_steps": steps, "log_every": log_every, "checkpoint_every": 10 * steps,
             "eval_every": 0, "data_dir": str(data_dir), "eval_data_dir": str(data_dir),
             "async_checkpointing": False, **overrides}
    args = [f"--config={config}", f"--workdir={workdir}",
            *[f"--config.{k}={v}" for k, v in flags.items()]]
    cmd = [sys.executable, "-c", _PEAK_WRAPPER, *args]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{name} failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    peaks = [int(line.split()[1]) for line in proc.stderr.splitlines()
             if line.startswith("PEAK_RSS_KB ")]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    last = train[-1]
    return {
        "config": config, "overrides": overrides, "steps": steps,
        "batch_size": overrides.get("batch_size"),
        "steps_per_s": last["steps_per_s"], "examples_per_s": last["examples_per_s"],
        "input_wait_fraction": last.get("input_wait_fraction"),
        "final_loss": last["loss"],
        "peak_host_memory_mb": round(peaks[-1] / 1024, 1) if peaks else None,
        "wall_s_including_compile": round(wall, 1),
    }


def trainer_figures(root: Path, quick: bool, only: list[str] | None = None) -> dict[str, Any]:
    tiny = build_data(root, 32, horizon=4, history=2, text_dim=32, episodes=6)
    steps = 12 if quick else 40
    runs: dict[str, Any] = {}
    small = {"batch_size": 8}
    # Evaluation off: these are training figures (the loop would still evaluate the last step).
    no_eval = {"eval_batches": 0}
    for name, config, extra in [
        ("cvae_tiny", "experiments/configs/cvae.py:S,runlocal", no_eval),
        ("dit_tiny", "experiments/configs/dit.py:S,runlocal",
         {"codec.kind": "pixels", **no_eval}),
        ("autoencoder_tiny", "experiments/configs/autoencoder.py:sd,runlocal", no_eval),
        ("value_tiny", "experiments/configs/value.py:clip,runlocal", {"eval_episodes": 0}),
    ]:
        if only and name not in only:
            continue
        print(f"[train bench] {name}", flush=True)
        runs[name] = run_trainer(name, config, tiny, root / name, steps, {**small, **extra})
    if not quick and (not only or {"cvae_S", "dit_S"} & set(only)):
        big = build_data(root, 128, horizon=16, history=16, text_dim=384, episodes=4)
        for name, config, extra in [
            ("cvae_S", "experiments/configs/cvae.py:S", no_eval),
            ("dit_S", "experiments/configs/dit.py:S",
             {"codec.kind": "pixels", "codec.factor": 8, **no_eval}),
        ]:
            if only and name not in only:
                continue
            print(f"[train bench] {name}", flush=True)
            runs[name] = run_trainer(name, config, big, root / name, 6,
                                     {"batch_size": 2, "ema_decay": 0.9999, **extra})
    return runs


# ------------------------------------------------------------------------------------------
# Part 2: the DiT train step alone (FLOPs, MFU)
# ------------------------------------------------------------------------------------------


def dit_step_figures(size: str, batch: int, dtype: str, steps: int, *, remat: bool = False,
                     points: int = 529, latent: int = 16, history: int = 4, horizon: int = 16,
                     text_tokens: int = 24, text_dim: int = 384) -> dict[str, Any]:
    """Compiles and times the DiT train step on synthetic latents over all local devices."""
    from experiments.training import common
    from flipjax.models import diffusion
    from flipjax.models.video_dit import VideoDiT
    from flipjax.sharding import create_mesh

    compute = jnp.bfloat16 if dtype == "bfloat16" else None
    model = VideoDiT.variant(size, latent_size=(latent, latent), flow_horizon=horizon,
                           history=history, text_dim=text_dim, remat=remat,
                           dtype=compute or jnp.float32)
    frames = model.num_frames
    schedule = diffusion.linear_schedule(1000)
    mesh = create_mesh()
    batch = batch - batch % mesh.devices.size or mesh.devices.size

    def init_fn(rng):
        x = jnp.zeros((1, frames, latent, latent, model.in_channels))
        return model.init(rng, x, jnp.zeros((1,), jnp.int32), jnp.zeros((1, 1, horizon, 2)),
                          jnp.zeros((1, 1, text_dim)), jnp.ones((1, 1), bool))["params"]

    def loss_fn(params, b, rng):
        t_rng, n_rng = jax.random.split(rng)
        x0 = b["latents"]
        t = jax.random.randint(t_rng, (x0.shape[0],), 0, schedule.num_steps)
        noise = jax.random.normal(n_rng, x0.shape)
        cond = model.apply({"params": params}, b["flow"], b["text"], b["mask"],
                           method=type(model).encode_conditions)

        def model_fn(x_t, tt):
            return model.apply({"params": params}, x_t, tt, cond, method=type(model).denoise)

        terms = diffusion.model_losses(model_fn, schedule, x0, t, noise, history=history)
        return jnp.mean(terms["loss"]), {}

    config = {"learning_rate": 1e-4, "weight_decay": 0.0, "total_steps": 1000,
              "grad_clip_norm": 1.0, "schedule": "constant", "warmup_steps": 0}
    tx = common.make_optimizer(config)
    state, shardings = common.create_train_state(init_fn, tx, jax.random.key(0), mesh=mesh,
                                                 ema_decay=0.9999)
    step = common.make_train_step(loss_fn, tx, shardings, mesh, ema_decay=0.9999,
                                  compute_dtype=compute)
    rng = np.random.default_rng(0)
    host = {
        "latents": rng.normal(size=(batch, frames, latent, latent, model.in_channels)
                              ).astype(np.float32),
        "flow": rng.uniform(0, 128, size=(batch, points, horizon, 2)).astype(np.float32),
        "text": rng.normal(size=(batch, text_tokens, text_dim)).astype(np.float32),
        "mask": np.ones((batch, text_tokens), bool),
    }
    from flipjax.sharding import batch_sharding

    data = jax.device_put(host, batch_sharding(mesh))
    t0 = time.perf_counter()
    compiled = step.lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    # XLA's cost analysis of an SPMD program counts one device's partition.
    flops_device = float(cost.get("flops", float("nan"))) if cost else float("nan")
    state, m = compiled(state, data)  # warm-up
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = compiled(state, data)
    jax.block_until_ready((state, m))
    secs = (time.perf_counter() - t0) / steps
    devices = mesh.devices.size
    peak = peak_flops(jax.devices()[0])
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "size": size, "batch_size": batch, "compute_dtype": dtype, "remat": remat,
        "devices": devices, "device_kind": jax.devices()[0].device_kind,
        "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params))),
        "compile_s": round(compile_s, 1), "step_s": secs, "steps_per_s": 1 / secs,
        "examples_per_s": batch / secs, "flops_per_step": flops_device * devices,
        "flops_per_step_per_device": flops_device,
        "achieved_tflops_per_device": flops_device / secs / 1e12,
        "mfu": None if peak is None else flops_device / secs / peak,
        "peak_device_memory_gb": (stats["peak_bytes_in_use"] / 2**30
                                  if "peak_bytes_in_use" in stats else None),
        "final_loss": float(m["loss"]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="tiny configs only, few steps")
    parser.add_argument("--accelerator", action="store_true",
                        help="also DiT-B/L in bf16 at the paper's shapes (GPU/TPU hosts)")
    parser.add_argument("--skip_trainers", action="store_true",
                        help="only the DiT step figures (e.g. on an accelerator host)")
    parser.add_argument("--accelerator_batch", type=int, default=32)
    parser.add_argument("--only", default="",
                        help="comma-separated trainer runs (cvae_tiny,dit_tiny,autoencoder_tiny,"
                             "value_tiny,cvae_S,dit_S); default all")
    args = parser.parse_args(argv)
    only = [x for x in args.only.split(",") if x] or None

    result: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "backend": jax.default_backend(),
                    "device_kind": jax.devices()[0].device_kind,
                    "devices": jax.device_count()},
        "quick": args.quick,
    }
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_trainers:
            result["trainers"] = trainer_figures(Path(tmp), args.quick, only)
    dit = {"tiny_fp32": dit_step_figures("tiny", 8, "float32", 3, latent=8, points=64,
                                         text_dim=32)}
    if not args.quick:
        dit["S_fp32"] = dit_step_figures("S", 2, "float32", 2)
    if args.accelerator:
        for size in ("B", "L"):
            dit[f"{size}_bf16"] = dit_step_figures(size, args.accelerator_batch, "bfloat16", 10)
    result["dit_step"] = dit
    met: dict[str, Any] = {}
    if "L_bf16" in dit and dit["L_bf16"]["mfu"] is not None:
        met["dit_l_mfu"] = dit["L_bf16"]["mfu"] >= TARGETS["dit_l_mfu_min"]
    result["targets"] = TARGETS
    result["targets_met"] = met or "not measured: DiT-L MFU needs an accelerator (--accelerator)"
    write_result(args.out, result)


if __name__ == "__main__":
    from flipjax import console

    with console.user_errors("benchmarks.train"):
        main()
