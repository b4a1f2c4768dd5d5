"""Planning figures: the jitted, batched ``hill_climb`` against the same search written the
official way, at equal settings, in one run.

    python -m benchmarks.planning --out planning.json [--quick] [--sizes tiny,S]

For each model size the same random-init world model (random weights are fine for timing)
plans the same P problems three ways:

* ``hill_climb``: :func:`flipjax.planning.hill_climb`, one jitted program, compiled ahead of
  time (``compile_s``, excluded from the rate) and run once to warm up;
* ``official_per_call_jit`` and ``official_eager``: :func:`benchmarks.planning_official.
  plan_official` (problems one at a time, Python loops over planning and sampler steps,
  history re-encoded at every step, conditioning recomputed and latents copied to the host at
  every sampler step, every clip decoded with its history frames), each network call jitted
  on its own, or no jit at all; a first run (compilation, per-op caches) is reported as
  ``first_run_s``.

The timed repeats then run interleaved, one of each planner per round, so that a machine load
that drifts during the run (a shared CPU) weighs on all planners alike; rates are medians.

Both planners call the same functions with the same params, sampler (ancestral DDPM by default)
and step count. Sizes:

* ``tiny``: the ``:runlocal`` CVAE, DiT and value models (32x32 frames, 8 hash-text tokens of
  width 32, 3 history frames) on the tiny KL autoencoder (8x8x4 latents);
* ``S``: CVAE-S (16 history frames), DiT-S (4 history + 15 future 16x16x4 latents, 529 query
  points), the SD-VAE-architecture codec at 128x128 and the ``value.py:clip`` model (CLIP
  ViT-B/16 towers at 224, 4-frame clips). On this CPU the SD-VAE dominates (seconds per
  128x128 frame), so S runs the smallest search that still calls every model at its S shapes.

JSON: ``machine`` (device label, CPU, load), per size a dict (``settings``, ``models``,
``hill_climb``, ``official_per_call_jit``, ``official_eager``, each with ``seconds_per_plan``,
``plans_per_s``, ``repeat_s`` and ``calls_per_plan``; ``dit_row_forwards_per_plan`` =
candidates x sampler steps x planning steps x beams (x 2 with guidance), equal for both
planners, while ``calls_per_plan.denoise`` counts DiT CALLS: one batched call per sampler step
for all P problems in ``hill_climb``, one per sampler step per problem (per beam with
``--official_beam_loop``) in the official loop; codec ``encode``/``decode`` calls and frames
likewise), and at the top level ``speedup_vs_eager`` (tiny: official eager seconds per plan /
hill_climb seconds per plan, the issue's ratio, target >= 10), ``speedup_vs_per_call_jit``,
``ddim_fewer_steps_gain`` (tiny: hill_climb with DDPM K steps vs DDIM K/5 steps, seconds per
plan and their ratio, plus the official eager DDPM time over DDIM's), ``S_speedup_vs_eager`` and
``S_speedup_vs_per_call_jit`` (null unless S ran). ``--quick``: tiny only, smallest settings.

Absolute times come from the machine that ran this (labelled in ``machine``; the CPU may be
shared, see ``load_average``); compare ratios within one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.planning_official import plan_official
from benchmarks.report import write_result
from flipjax.planning import PlanConfig, WorldModel, hill_climb
from flipjax.typing import Array

TARGETS = {"speedup_vs_eager_min": 10.0}
SIZES = ("tiny", "S")


@dataclasses.dataclass(frozen=True)
class Settings:
    """One benchmark configuration: P problems, B beams, A candidates, H steps, K sampler steps.

    hill_climb: ahead-of-time compile, a warm-up call (``warmup``), ``repeats`` timed calls;
    the official modes: a first run, then ``official_repeats`` timed runs (default
    ``repeats``). ``ddim`` also times hill_climb with DDIM at K / 5 steps.
    """

    problems: int
    beams: int
    candidates: int
    horizon: int
    sample_steps: int
    replace_every: int = 2
    query_grid: int = 8
    sampler: str = "ddpm"
    repeats: int = 2
    official_repeats: int | None = None
    warmup: bool = True
    ddim: bool = True
    note: str = ""


SETTINGS: dict[str, dict[str, Settings]] = {
    "quick": {"tiny": Settings(problems=2, beams=2, candidates=2, horizon=2, sample_steps=5,
                               replace_every=1)},
    "full": {
        "tiny": Settings(problems=4, beams=2, candidates=2, horizon=3, sample_steps=10),
        "S": Settings(problems=1, beams=1, candidates=1, horizon=1, sample_steps=5,
                      query_grid=23, official_repeats=1, warmup=False, ddim=False,
                      note="the smallest search that calls every model at its S shapes: the "
                           "SD-VAE costs seconds per 128x128 frame on this 2-core CPU, so one "
                           "problem, beam, candidate and planning step, no hill_climb warm-up "
                           "after its AOT compile and one timed official run; even so S takes "
                           "about ten minutes here, dominated by the codec"),
    },
}


def log(msg: str) -> None:
    print(f"[planning bench] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------
# World models with random weights
# ------------------------------------------------------------------------------------------


def _random_params(abstract: Any, seed: int) -> Any:
    """Parameters of the right shapes without compiling init (slow on CPU for the S models)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.02, s.shape).astype(s.dtype)),
                        nn.meta.unbox(abstract))


def _count(tree: Any) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def build_world(size: str, seed: int = 0) -> tuple[WorldModel, Any, dict[str, Any]]:
    """A random-init world model of ``size`` from the trainers' configs.

    Args:
      size: "tiny" (the ``:runlocal`` configs, tiny KL autoencoder) or "S" (CVAE-S, DiT-S,
        SD-VAE architecture, value.py:clip).
      seed: seed of the random parameters.

    Returns:
      (world model, the DiT's training schedule, info: image_size, text_tokens, text_dim,
      dit_history, latent_shape, future_frames and parameter counts per module).
    """
    from experiments.configs import cvae as cvae_configs
    from experiments.configs import dit as dit_configs
    from experiments.configs import value as value_configs
    from experiments.trainers import cvae as cvae_trainer
    from experiments.trainers import dit as dit_trainer
    from experiments.trainers import value as value_trainer
    from flipjax import builders
    from flipjax import codec as codec_lib
    from flipjax.models.autoencoder import AutoencoderConfig, AutoencoderKL
    from flipjax.planning.world_model import world_model_from_modules

    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    arg = "runlocal" if size == "tiny" else None
    suffix = f",{arg}" if arg else ""
    cc, dc, vc = (m.get_config(v + suffix) for m, v in ((cvae_configs, "S"), (dit_configs, "S"),
                                                          (value_configs, "clip")))
    image_size = tuple(int(s) for s in dc.image_size)
    text_tokens, text_dim = (8, 32) if size == "tiny" else (24, 384)
    key = jax.random.key(seed)
    ae_config = AutoencoderConfig.variant("tiny" if size == "tiny" else "sd-vae-ft-ema")
    ae_abstract = jax.eval_shape(AutoencoderKL(ae_config).init, key,
                                 jnp.zeros((1, *image_size, 3)))
    codec = codec_lib.autoencoder_codec(ae_config, _random_params(ae_abstract, seed)["params"])
    cvae = builders.build_cvae(cc)
    dit = builders.build_dit(dc, codec)
    value = builders.build_value(vc)
    params = {
        "cvae": _random_params(jax.eval_shape(cvae_trainer.make_init_fn(cvae, text_tokens),
                                              key), seed + 1),
        "dit": _random_params(jax.eval_shape(dit_trainer.make_init_fn(dit, text_tokens), key),
                              seed + 2),
        "value": _random_params(jax.eval_shape(
            value_trainer.make_init_fn(value, text_tokens, int(vc.model.language_dim)), key),
            seed + 3),
    }
    world = world_model_from_modules(
        cvae=cvae, cvae_params=params["cvae"], dit=dit, dit_params=params["dit"], codec=codec,
        value=value, value_params=params["value"], image_size=image_size,
        flow_normalization=str(dc.flow_normalization))
    info = {"image_size": image_size, "text_tokens": text_tokens, "text_dim": text_dim,
            "history_frames": world.history_frames, "dit_history": int(dit.history),
            "value_frames": world.value_frames,
            "latent_shape": codec.latent_shape(image_size),
            "future_frames": int(dit.flow_horizon) - 1,
            "params": {"cvae": _count(params["cvae"]), "dit": _count(params["dit"]),
                       "codec": _count(codec.params), "value": _count(params["value"])},
            "codec": "tiny KL autoencoder" if size == "tiny" else "SD-VAE architecture"}
    return world, builders.build_schedule(dc), info


def make_problems(info: dict[str, Any], p: int, seed: int = 0) -> tuple[Array, Array, Array]:
    """Random problems: history float[P Th H W 3] in [-1, 1], text float[P Lt D], mask bool."""
    rng = np.random.default_rng(seed)
    th, (h, w) = info["history_frames"], info["image_size"]
    history = rng.uniform(-1, 1, (p, th, h, w, 3)).astype(np.float32)
    text = rng.normal(size=(p, info["text_tokens"], info["text_dim"])).astype(np.float32)
    return jnp.asarray(history), jnp.asarray(text), jnp.ones((p, info["text_tokens"]), bool)



# ------------------------------------------------------------------------------------------
# Counting and timing
# ------------------------------------------------------------------------------------------


def hill_climb_calls(config: PlanConfig, problems: int, latent_history_frames: int,
                     future_frames: int) -> dict[str, int]:
    """Model calls of one ``hill_climb`` over P problems, from its program structure.

    The problems are vmapped and B x A candidates batched, so every call covers all rows:
    one encode of the P histories (only the ``WorldModel.latent_history_frames`` frames the
    DiT reads), then per planning step one propose, one conditioning
    encode (two with guidance), K denoise calls, one decode and one value call.
    """
    guided = config.guidance_scale != 1.0
    k = config.sampling_schedule().num_steps
    h = config.horizon
    rows = problems * config.beams * config.candidates
    windows = future_frames if config.value_on == "clip" else 1
    return {"propose": h, "encode": 1, "encode_frames": problems * latent_history_frames,
            "encode_conditions": h * (2 if guided else 1), "denoise": h * k,
            "denoise_rows": h * k * rows * (2 if guided else 1), "decode": h,
            "decode_frames": h * rows * future_frames, "value": h,
            "value_clips": h * rows * windows, "host_copies": 0}


def _per_plan(counts: dict[str, int], problems: int) -> dict[str, float]:
    return {k: v / problems for k, v in sorted(counts.items())}


def _rate(times: list[float], problems: int) -> dict[str, Any]:
    med = statistics.median(times)
    return {"repeat_s": [round(t, 4) for t in times], "seconds_per_plan": med / problems,
            "plans_per_s": problems / med}


Runner = Callable[[int], None]


def prepare_hill_climb(world: WorldModel, problems: tuple[Array, Array, Array],
                       config: PlanConfig, warmup: bool = True) -> tuple[Runner, dict[str, Any]]:
    """AOT-compiles hill_climb for these shapes (and runs it once when ``warmup``).

    Returns:
      (run(seed) -> None, blocking until the plan is ready; {"compile_s"}).
    """
    history, text, mask = problems
    fn = jax.jit(lambda w, h, t, m, k: hill_climb(w, h, t, m, k, config))
    t0 = time.perf_counter()
    compiled = fn.lower(world, history, text, mask, jax.random.key(0)).compile()
    compile_s = time.perf_counter() - t0

    def run(seed: int) -> None:
        jax.block_until_ready(compiled(world, history, text, mask, jax.random.key(seed)))

    if warmup:
        run(1)
    return run, {"compile_s": round(compile_s, 2)}


def prepare_official(world: WorldModel, problems: tuple[Array, Array, Array],
                     config: PlanConfig, mode: str, encode_frames: int,
                     beam_loop: bool) -> tuple[Runner, dict[str, Any]]:
    """Runs the official-structure planner once (compilation or per-op caches included).

    Returns:
      (run(seed) -> None; {"first_run_s", "calls_per_plan"}).
    """
    history, text, mask = problems

    def run(seed: int) -> dict[str, int]:
        return plan_official(world, history, text, mask, jax.random.key(seed), config,
                             mode=mode, encode_frames=encode_frames, beam_loop=beam_loop)[1]

    t0 = time.perf_counter()
    counts = run(1)
    first = time.perf_counter() - t0
    return run, {"first_run_s": round(first, 2),
                 "calls_per_plan": _per_plan(counts, history.shape[0])}


def interleaved(runners: dict[str, tuple[Runner, int]]) -> dict[str, list[float]]:
    """Times ``repeats`` runs of each runner in rounds (one run of each per round), so that a
    load that changes during the benchmark (a shared machine) affects all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(max(n for _, n in runners.values())):
        for name, (run, n) in runners.items():
            if r < n:
                t0 = time.perf_counter()
                run(2 + r)
                times[name].append(time.perf_counter() - t0)
    return times


def bench_size(size: str, s: Settings, beam_loop: bool) -> dict[str, Any]:
    """All figures of one model size."""
    log(f"{size}: building random-init models")
    world, schedule, info = build_world(size)
    problems = make_problems(info, s.problems)
    config = PlanConfig(beams=s.beams, candidates=s.candidates, horizon=s.horizon,
                        replace_every=s.replace_every, value_on="last", sampler=s.sampler,
                        sample_steps=s.sample_steps, query_grid=s.query_grid,
                        schedule=schedule)
    k = config.sampling_schedule().num_steps
    official_repeats = s.repeats if s.official_repeats is None else s.official_repeats
    out: dict[str, Any] = {
        "settings": {**dataclasses.asdict(s), "sampler_steps": k, "guidance_scale": 1.0,
                     "query_points": s.query_grid ** 2, "official_beam_loop": beam_loop,
                     "official_encode_frames": info["dit_history"],
                     "timing": "compile / first runs first, then the timed repeats of all "
                               "planners interleaved in rounds; medians"},
        "models": info,
        "dit_row_forwards_per_plan": s.candidates * k * s.horizon * s.beams,
    }
    runners: dict[str, tuple[Runner, int]] = {}
    log(f"{size}: compiling hill_climb" + " and a warm-up run" * s.warmup)
    run, out["hill_climb"] = prepare_hill_climb(world, problems, config, s.warmup)
    out["hill_climb"]["calls_per_plan"] = _per_plan(hill_climb_calls(
        config, s.problems, world.latent_history_frames or info["history_frames"],
        info["future_frames"]), s.problems)
    runners["hill_climb"] = (run, s.repeats)
    for mode in ("per_call_jit", "eager"):
        log(f"{size}: official {mode}: first run")
        run, out[f"official_{mode}"] = prepare_official(world, problems, config, mode,
                                                        info["dit_history"], beam_loop)
        runners[f"official_{mode}"] = (run, official_repeats)
    ddim_steps = max(k // 5, 1)
    if s.ddim:
        log(f"{size}: compiling hill_climb with DDIM {ddim_steps} steps")
        run, out["hill_climb_ddim"] = prepare_hill_climb(world, problems, dataclasses.replace(
            config, sampler="ddim", sample_steps=ddim_steps), s.warmup)
        runners["hill_climb_ddim"] = (run, s.repeats)
    log(f"{size}: timing {', '.join(f'{n} x{r}' for n, (_, r) in runners.items())}")
    for name, times in interleaved(runners).items():
        out[name].update(_rate(times, s.problems))
        log(f"{size}: {name} {out[name]['seconds_per_plan']:.4f} s/plan")
    rows = out["official_eager"]["calls_per_plan"]["denoise_rows"]
    if rows != out["dit_row_forwards_per_plan"]:
        raise RuntimeError(f"the official planner ran {rows} DiT rows per plan, expected "
                           f"{out['dit_row_forwards_per_plan']}")
    sec = out["hill_climb"]["seconds_per_plan"]
    out["speedup_vs_eager"] = out["official_eager"]["seconds_per_plan"] / sec
    out["speedup_vs_per_call_jit"] = out["official_per_call_jit"]["seconds_per_plan"] / sec
    if s.ddim:
        ddim = out.pop("hill_climb_ddim")
        out["ddim_fewer_steps"] = {
            "ddpm_steps": k, "ddim_steps": ddim_steps, "ddpm_seconds_per_plan": sec,
            "ddim_seconds_per_plan": ddim["seconds_per_plan"], "ddim_compile_s":
            ddim["compile_s"], "ddim_repeat_s": ddim["repeat_s"],
            "ratio": sec / ddim["seconds_per_plan"],
            "official_eager_ddpm_over_hill_climb_ddim":
            out["official_eager"]["seconds_per_plan"] / ddim["seconds_per_plan"]}
    return out


def machine() -> dict[str, Any]:
    dev = jax.devices()[0]
    return {"device": f"{jax.default_backend()} ({dev.device_kind}) on "
                      f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "backend": jax.default_backend(), "device_kind": dev.device_kind,
            "devices": jax.device_count(), "jax": jax.__version__,
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true",
                        help="tiny models only, smallest settings (seconds after compiling)")
    parser.add_argument("--sizes", default="",
                        help="comma-separated sizes (tiny,S); default all, tiny with --quick")
    parser.add_argument("--official_beam_loop", action="store_true",
                        help="the official planner loops over beams (one call per beam)")
    args = parser.parse_args(argv)
    table = SETTINGS["quick" if args.quick else "full"]
    sizes = [x for x in args.sizes.split(",") if x] or list(table)
    unknown = [x for x in sizes if x not in table]
    if unknown:
        raise ValueError(f"--sizes {unknown} not available {'with --quick ' * args.quick}"
                         f"(choose from {sorted(table)})")
    t0 = time.perf_counter()
    result: dict[str, Any] = {"machine": machine(), "quick": args.quick,
                              "note": "absolute times are from this machine only; the "
                                      "ratios compare planners measured in the same run"}
    for size in sizes:
        result[size] = bench_size(size, table[size], args.official_beam_loop)
    tiny, big = result.get("tiny"), result.get("S")
    result["speedup_vs_eager"] = tiny["speedup_vs_eager"] if tiny else None
    result["speedup_vs_per_call_jit"] = tiny["speedup_vs_per_call_jit"] if tiny else None
    result["ddim_fewer_steps_gain"] = tiny.get("ddim_fewer_steps") if tiny else None
    result["S_speedup_vs_eager"] = big["speedup_vs_eager"] if big else None
    result["S_speedup_vs_per_call_jit"] = big["speedup_vs_per_call_jit"] if big else None
    result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["targets"] = TARGETS
    result["targets_met"] = (
        {"speedup_vs_eager": result["speedup_vs_eager"] >= TARGETS["speedup_vs_eager_min"]}
        if tiny else "not measured: the target is on the tiny models")
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    from flipjax import console

    with console.user_errors("benchmarks.planning"):
        main()
