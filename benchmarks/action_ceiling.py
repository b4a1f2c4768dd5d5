"""How far the action module alone can take the planner: toy problems planned with the TRUE
frames at every planning step (a perfect dynamics model) and, where it chooses, the candidate
closest to the script's own tracks (a perfect value).

  python -m benchmarks.action_ceiling --runs DIR --out FILE.json [--problems N]
      [--candidates K] [--seed S] [--query_grid G] [--object_window R]
      [--follow_queries {0,1}] [--quick]

``--runs`` is a quickstart or ``benchmarks.world_model`` workdir (``cvae/``, ``dit/``,
``value/``); the problems, queries, horizon and motion readout are the ones
``benchmarks.world_model`` plans with (``toy_world_model.py``'s ``plan``). Per problem and
planning step the action module sees the script's true frames at that step and proposes the
flow of that chunk (at the plan's queries, or with ``follow_queries`` where this mode's own
previous chunk ended); the chunks are read out into the task block's motion and judged as the
planner's chosen plan is (``experiments.plan.scoring.toy_outcome``). Success rates of:

* ``scripted``: the script's own tracks (the readout's ceiling; the world-model benchmark's
  ``plan_success_scripted``);
* ``posterior``: the action module's posterior given those tracks, decoded at its mean (how
  precisely its latent and decoder can reproduce the motion at all);
* ``best_of_k``: of K prior samples per step, the one closest to the script's tracks (a
  perfect value choosing among the proposals);
* ``one_sample``: one prior sample per step (FLIP-NV with perfect dynamics);
* ``prior_mean``: the flow decoded at the prior's mean (N(0, I): z = 0).

Beside each success rate: ``target_distance_m_<mode>`` (the block's final distance to its
target) and ``displacement_ratio_<mode>`` (median over problems of the block's displacement
over the script's: below 1, the flows fall short). ``targets_met`` says which of them reach
issue 18's planning target (70%).

A planner with this action module cannot beat ``best_of_k`` by choosing better, and cannot
beat ``posterior`` whatever its prior.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np

from benchmarks.report import write_result

MODES = ("scripted", "posterior", "best_of_k", "one_sample", "prior_mean")
# Issue 18's planning target: with perfect dynamics and a perfect value, the action module's
# proposals have to reach it before any planner can.
TARGETS = {"plan_success_min": 0.7}


def _proposer(cvae: Any, params: Any, candidates: int) -> Any:
    """``(history, text, mask, queries, script chunk, key, modes) -> {mode: flow float[N L
    2]}`` for one problem's planning step: the posterior, the K prior samples (best-of-K and
    one-sample choose among the same ones) and the prior's mean, each computed only when one
    of ``modes`` needs it (followed queries differ per mode)."""
    import jax

    from flipjax.models.flow_cvae import FlowCVAE

    def apply(*args: Any, **kw: Any) -> Any:
        return cvae.apply({"params": params}, *args, **kw)

    @jax.jit
    def posterior(hist, text, mask, gt):
        post = apply(gt, hist, text, mask, method=FlowCVAE.encode)
        return apply(gt[:, :, 0], hist, text, mask, apply(post, method=FlowCVAE.latent_mode),
                     method=FlowCVAE.decode)["flow"][0]

    @jax.jit
    def samples(hist, text, mask, queries, key):
        return jax.vmap(lambda k: apply(queries, hist, text, mask, rngs={"latent": k},
                                        method=FlowCVAE.sample)["flow"][0])(
            jax.random.split(key, candidates))                                  # K N L 2

    @jax.jit
    def prior_mean(hist, text, mask, queries):
        mode = apply(apply(queries, hist, text, mask, method=FlowCVAE.prior),
                     method=FlowCVAE.latent_mode)
        return apply(queries, hist, text, mask, mode, method=FlowCVAE.decode)["flow"][0]

    def propose(hist, text, mask, queries, gt, key, modes) -> dict[str, np.ndarray]:
        out = {}
        if "posterior" in modes:
            out["posterior"] = np.asarray(posterior(hist, text, mask, gt))
        if {"best_of_k", "one_sample"} & set(modes):
            k = np.asarray(samples(hist, text, mask, queries, key))
            err = np.linalg.norm(k - gt[0][None], axis=-1).mean(axis=(1, 2))
            out["best_of_k"], out["one_sample"] = k[int(np.argmin(err))], k[0]
        if "prior_mean" in modes:
            out["prior_mean"] = np.asarray(prior_mean(hist, text, mask, queries))
        return out

    return propose


def run(runs: str, num_problems: int, candidates: int, seed: int, quick: bool,
        queries: dict[str, int] | None = None) -> dict[str, Any]:
    """Plans ``num_problems`` toy problems per mode (see the module docstring); ``queries``
    overrides the plan's ``query_grid`` / ``object_window`` / ``follow_queries``.

    Returns:
      ``success_<mode>``, ``target_distance_m_<mode>`` and ``displacement_ratio_<mode>``
      (median over problems of the block's displacement over the script's) per mode,
      ``per_problem`` (the successes), ``problems``, ``candidates``, ``horizon``,
      ``flow_horizon``, the query settings.

    Raises:
      ValueError: a missing run, bad sizes.
    """
    import jax

    from data_pipelines.toy import problems as tp
    from experiments.configs import plan as plan_configs
    from experiments.configs import toy_world_model
    from experiments.plan.problems import build_problems
    from experiments.plan.runner import load_world_model
    from experiments.plan.scoring import fit_config, toy_outcome
    from experiments.trainers.quickstart import apply_overrides
    from flipjax import builders
    from flipjax.checkpoints import load_params
    from flipjax.planning import Plan
    from flipjax.planning.world_model import run_config

    if num_problems < 1 or candidates < 1:
        raise ValueError(f"--problems and --candidates must be >= 1, got {num_problems}, "
                         f"{candidates}")
    pc = plan_configs.get_config()
    apply_overrides(pc, toy_world_model.get_config("quick" if quick else None).plan.to_dict(),
                    "config.plan", source="experiments/configs/plan.py")
    pc.runs, pc.seed, pc.num_problems = str(runs), int(seed), int(num_problems)
    for k, v in (queries or {}).items():
        pc[k] = (bool(v) if k == "follow_queries" else float(v) if k.startswith("fit_prior")
                 else int(v))
    follow = bool(pc.follow_queries)
    fit = fit_config(pc)
    world, _, action_config = load_world_model(pc)
    problems = build_problems(pc, world, action_config)
    cvae_dir = str(os.path.join(runs, "cvae"))
    cvae = builders.build_cvae(run_config(cvae_dir))
    propose = _proposer(cvae, load_params(cvae_dir, ema=False), candidates)
    chunks, length = int(pc.horizon), int(cvae.config.flow_horizon)
    hist_len = int(cvae.config.history)
    step = length - 1
    key = jax.random.key(int(seed))
    outcomes: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    t0 = time.perf_counter()
    for i in range(len(problems)):
        script = tp.scripted_tracks(problems.toy, i, problems.queries[i], length, chunks,
                                    follow=follow)                             # H L N 2
        queries = {m: problems.queries[i] for m in MODES}
        future = tp.future_frames(problems.toy, chunks * step, [i])[0]
        frames = np.concatenate([problems.history[i][-hist_len:], future]).astype(
            np.float32) / 127.5 - 1.0
        text, mask = problems.text_tokens[i:i + 1], problems.text_mask[i:i + 1]
        flows: dict[str, list[np.ndarray]] = {m: [] for m in MODES}
        flows["scripted"] = list(script)
        for h in range(chunks):
            hist = frames[h * step: h * step + hist_len][None]
            key, sub = jax.random.split(key)
            if not follow:   # every mode queries the same points: one call serves them all
                gt = script[h].transpose(1, 0, 2)[None]                        # 1 N L 2
                chosen = propose(hist, text, mask, queries["scripted"][None], gt, sub,
                                 MODES[1:])
            for mode in MODES[1:]:
                if follow:   # this mode's own queries and the script's tracks of them
                    gt = tp.chunk_tracks(problems.toy, i, queries[mode], length, h)
                    chosen = propose(hist, text, mask, queries[mode][None],
                                     gt.transpose(1, 0, 2)[None], sub, (mode,))
                flows[mode].append(chosen[mode].transpose(1, 0, 2))          # N L 2 -> L N 2
                if follow:
                    queries[mode] = np.clip(flows[mode][-1][-1], 0.0, frames.shape[2] - 1.0)
        for mode in MODES:
            plan = Plan(flows=np.stack(flows[mode])[None, None], latents=None, videos=None,
                        values=None, returns=None, best=np.zeros(1, np.int32))
            outcomes[mode].append(toy_outcome(problems, i, plan, 0,
                                              jax.random.fold_in(jax.random.key(seed + 1), i),
                                              follow=follow, fit=fit))
        print(f"action ceiling: problem {i + 1}/{len(problems)} "
              f"({time.perf_counter() - t0:.0f}s): " + ", ".join(
                  f"{m} {int(outcomes[m][-1]['success'])}" for m in MODES), flush=True)
    out: dict[str, Any] = {"problems": len(problems), "candidates": candidates,
                           "horizon": chunks, "flow_horizon": length, "seed": seed,
                           "runs": str(runs), "quick": quick,
                           "query_grid": int(pc.query_grid),
                           "object_window": int(pc.object_window), "follow_queries": follow,
                           "fit_prior_translation": fit.prior_translation,
                           "fit_prior_rotation": fit.prior_rotation}
    for mode in MODES:
        out[f"success_{mode}"] = float(np.mean([o["success"] for o in outcomes[mode]]))
        out[f"target_distance_m_{mode}"] = float(np.mean(
            [o["target_distance_m"] for o in outcomes[mode]]))
        # A readout that only fails by a fraction of the needed motion shows up here: the
        # block's displacement per problem over the script's (1: as far as the script).
        out[f"displacement_ratio_{mode}"] = float(np.median(
            [o["block_displacement_m"] / max(s["block_displacement_m"], 1e-6)
             for o, s in zip(outcomes[mode], outcomes["scripted"], strict=True)]))
    out["per_problem"] = {m: [bool(o["success"]) for o in outcomes[m]] for m in MODES}
    out["targets"] = TARGETS
    out["targets_met"] = {f"{m}_allows_the_planning_target": out[f"success_{m}"]
                          >= TARGETS["plan_success_min"] for m in MODES}
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark (see the module docstring); returns the result written to --out."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", required=True, help="Workdir with cvae/, dit/, value/ runs.")
    p.add_argument("--out", required=True, help="JSON file to write.")
    p.add_argument("--problems", type=int, default=None,
                   help="Held-out toy problems (default 100; 4 with --quick).")
    p.add_argument("--candidates", type=int, default=8, help="Prior samples per step (K).")
    p.add_argument("--seed", type=int, default=0, help="The planning problems' seed.")
    p.add_argument("--quick", action="store_true",
                   help="The world-model benchmark's quick plan settings, 4 problems.")
    p.add_argument("--query_grid", type=int, default=None,
                   help="The planner's G x G query grid (default: the benchmark's plan).")
    p.add_argument("--object_window", type=int, default=None,
                   help="Half side of the query window on the task block (0: none).")
    p.add_argument("--follow_queries", type=int, choices=(0, 1), default=None,
                   help="1: each chunk queries where the previous one ended (default: the "
                        "benchmark's plan).")
    p.add_argument("--fit_prior_translation", type=float, default=None,
                   help="The readout's motion prior, metres (default: the benchmark's plan).")
    p.add_argument("--fit_prior_rotation", type=float, default=None,
                   help="The readout's motion prior, radians (default: the benchmark's plan).")
    a = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not os.path.isdir(os.path.join(a.runs, "cvae")):
        raise ValueError(f"--runs {a.runs}: no cvae/ run there (a benchmarks.world_model or "
                         "quickstart workdir)")
    n = a.problems if a.problems is not None else (4 if a.quick else 100)
    overrides = {k: getattr(a, k) for k in ("query_grid", "object_window", "follow_queries",
                                             "fit_prior_translation", "fit_prior_rotation")
                 if getattr(a, k) is not None}
    result = run(a.runs, n, a.candidates, a.seed, a.quick, overrides)
    for mode in MODES:
        print(f"  success_{mode}: {result[f'success_{mode}']:.3f}", flush=True)
    write_result(a.out, result)
    return result


if __name__ == "__main__":
    from flipjax import console

    with console.user_errors("benchmarks.action_ceiling"):
        main()
