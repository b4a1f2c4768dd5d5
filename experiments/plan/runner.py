"""The planning run of ``experiments.plan``: world model and search settings from the config,
batched and sharded ``hill_climb`` calls, per-problem outputs, the summary, resumable reruns."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from experiments.plan.problems import Problems, build_problems
from experiments.plan.scoring import (
    fit_config,
    oracle_outcome,
    problem_keys,
    toy_flow_response,
    toy_outcome,
    toy_value_preference,
)
from flipjax import viz
from flipjax.planning import PlanConfig, WorldModel, hill_climb
from flipjax.planning.diagnostics import candidate_spread
from flipjax.planning.world_model import run_config
from flipjax.settings_record import record_or_check
from flipjax.sharding import create_mesh

Config = ml_collections.ConfigDict

SUMMARY_FILE = "plan_summary.json"
SETTINGS_FILE = "plan_settings.json"
PROBLEMS_DIR = "problems"
# Config fields that change what a problem's plan is (a rerun must keep them).
PLAN_FIELDS = ("runs", "action_dir", "dynamics_dir", "value_dir", "codec_dir", "ema", "dtype",
               "problems", "start", "seed", "beams", "candidates", "horizon", "replace_every",
               "discount", "value_on", "sampler", "sample_steps", "eta", "guidance_scale",
               "use_value", "query_grid", "object_window", "follow_queries", "clip_x0",
               "compare_no_value")
EMA_CHOICES = {"auto": None, "ema": True, "params": False}
RUN_DIRS = (("action_dir", "cvae"), ("dynamics_dir", "dit"), ("value_dir", "value"))


def run_dirs(config: Any) -> tuple[Path, Path, Path]:
    """(action, dynamics, value) run directories: the explicit ones, else ``runs/<module>``.

    Raises:
      ValueError: naming a run directory that is not given or does not exist.
    """
    dirs = []
    for field, sub in RUN_DIRS:
        explicit = str(config[field])
        if explicit:
            path = Path(explicit)
        elif config.runs:
            path = Path(config.runs) / sub
        else:
            raise ValueError(f"no {sub} run: set config.runs (a quickstart workdir with "
                             f"cvae/, dit/, value/) or config.{field}")
        if not path.is_dir():
            source = f"config.{field}" if explicit else f"config.runs={config.runs}"
            raise ValueError(f"run directory {path} does not exist ({source})")
        dirs.append(path)
    return dirs[0], dirs[1], dirs[2]


def sample_steps(value: Any) -> int | str:
    """``config.sample_steps`` as PlanConfig takes it: digits -> int, else the spec string."""
    text = str(value).strip()
    return int(text) if text.isdigit() else text


def plan_config(config: Config, schedule: Any, use_value: bool | None = None) -> PlanConfig:
    """The :class:`flipjax.planning.PlanConfig` of ``config`` (``use_value`` overrides)."""
    return PlanConfig(
        beams=int(config.beams), candidates=int(config.candidates),
        horizon=int(config.horizon), replace_every=int(config.replace_every),
        discount=float(config.discount), value_on=str(config.value_on),
        sampler=str(config.sampler), sample_steps=sample_steps(config.sample_steps),
        eta=float(config.eta), guidance_scale=float(config.guidance_scale),
        use_value=bool(config.use_value if use_value is None else use_value),
        query_grid=int(config.query_grid), follow_queries=bool(config.follow_queries),
        clip_x0=float(config.clip_x0) if config.clip_x0 else None, schedule=schedule)


def load_world_model(config: Config) -> tuple[WorldModel, Any, Config]:
    """(world model, DiT schedule, the action run's trainer config) of ``config``'s runs."""
    if config.ema not in EMA_CHOICES:
        raise ValueError(f"config.ema must be one of {sorted(EMA_CHOICES)}, got {config.ema!r}")
    action, dynamics, value = run_dirs(config)
    codec = None
    if config.codec_dir:
        codec = Path(config.codec_dir)
        if not codec.is_dir():
            raise ValueError(f"codec run directory {codec} does not exist (config.codec_dir)")
    world, schedule = WorldModel.from_checkpoints(action, dynamics, value, codec=codec,
                                                  ema=EMA_CHOICES[config.ema],
                                                  dtype=str(config.dtype))
    return world, schedule, run_config(action)


def make_mesh(config: Any) -> Any:
    """The 1-D data mesh over ``config.mesh.data`` devices (-1: all), None for one device."""
    devices = jax.devices()
    n = len(devices) if int(config.mesh.data) == -1 else int(config.mesh.data)
    if not 1 <= n <= len(devices):
        raise ValueError(f"config.mesh.data={config.mesh.data}: have {len(devices)} devices")
    return None if n == 1 else create_mesh(n, 1, 1, devices=devices[:n])


def _beams(plan: Any, j: int) -> dict[str, Any]:
    best = int(plan.best[j])
    return {"best": best, "best_return": float(plan.returns[j, best]),
            "values": np.asarray(plan.values[j]).round(6).tolist(),
            "returns": np.asarray(plan.returns[j]).round(6).tolist()}


def write_media(folder: Path, problems: Problems, i: int, plan: Any, j: int, suffix: str,
                fps: float) -> list[str]:
    """``plan<suffix>.gif`` and ``values<suffix>.png`` of problem ``i`` (row ``j``)."""
    best = int(plan.best[j])
    frames = viz.plan_video_frames(problems.history[i], plan.videos[j, best],
                                   plan.flows[j, best], values=plan.values[j, best],
                                   title=problems.instructions[i])
    gif, png = folder / f"plan{suffix}.gif", folder / f"values{suffix}.png"
    viz.write_video(gif, frames, fps=fps)
    label = "FLIP-NV" if suffix else "value-guided"
    viz.write_image(png, viz.beam_values_image(
        plan.values[j], best, returns=plan.returns[j],
        title=f"problem {i} ({label}): {problems.instructions[i]}"))
    return [gif.name, png.name]


def _write_json(path: Path, data: Any) -> None:
    # Written whole, then renamed: a plan.json that exists is complete (reruns skip it).
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _padded(n: int, batch: int, shards: int) -> int:
    return int(math.ceil(max(batch, 1) / shards) * shards) if n else 0


def check_settings(config: Any, workdir: Path) -> dict[str, Any]:
    """Records the plan-defining settings in the workdir, or checks a rerun keeps them.

    Raises:
      ValueError: naming the fields a rerun changed.
    """
    mine = {k: config[k] for k in PLAN_FIELDS}
    record_or_check(workdir / SETTINGS_FILE, mine,
                    refusal=f"--workdir {workdir} holds plans made with other settings",
                    remedy="use a new --workdir")
    return mine


def summarize(workdir: Path, num_problems: int) -> dict[str, Any]:
    """Aggregates ``problems/<i>/plan.json`` for i < num_problems: counts, mean best returns
    and, for toy problems, success rates (overall and per task kind)."""
    records = []
    for i in range(num_problems):
        path = workdir / PROBLEMS_DIR / str(i) / "plan.json"
        if path.exists():
            records.append(json.loads(path.read_text()))
    out: dict[str, Any] = {"num_problems": num_problems, "planned": len(records)}
    for name, suffix in (("value_guided", ""), ("no_value", "_no_value"),
                         ("scripted_plan", "_scripted_plan")):
        rows = [r[name] for r in records if name in r]
        if not rows:
            continue
        if "best_return" in rows[0]:
            out[f"mean_best_return{suffix}"] = float(np.mean([r["best_return"] for r in rows]))
        judged = [r for r in rows if "outcome" in r]
        if judged:
            wins = sum(r["outcome"]["success"] for r in judged)
            out[f"success_rate{suffix}"] = wins / len(judged)
            out[f"success_count{suffix}"] = int(wins)
            out[f"evaluated{suffix}"] = len(judged)
            out[f"mean_target_distance_m{suffix}"] = float(np.mean(
                [r["outcome"]["target_distance_m"] for r in judged]))
            out[f"mean_block_displacement_m{suffix}"] = float(np.mean(
                [r["outcome"]["block_displacement_m"] for r in judged]))
            out[f"mean_degenerate_chunks{suffix}"] = float(np.mean(
                [r["outcome"].get("degenerate_chunks", 0) for r in judged]))
    by_task: dict[str, dict[str, Any]] = {}
    for r in records:
        task = r["source"].get("task")
        if task is None:
            continue
        entry = by_task.setdefault(task, {"count": 0})
        entry["count"] += 1
        for name in ("value_guided", "no_value", "scripted_plan"):
            if name in r and "outcome" in r[name]:
                entry[name] = entry.get(name, 0) + int(r[name]["outcome"]["success"])
    if by_task:
        out["successes_by_task"] = by_task
        out["scripted_success_rate"] = float(np.mean(
            [r["source"]["scripted_success"] for r in records]))
    return out


def run(config: Any, workdir: str | Path) -> dict[str, Any]:
    """Plans every problem of ``config`` not yet planned in ``workdir``; writes the summary.

    Returns:
      The summary written to ``<workdir>/plan_summary.json``.

    Raises:
      ValueError: a missing run directory, problems that do not fit the models, a bad
        setting, or a rerun with other settings.
    """
    workdir = Path(workdir)
    run_dirs(config)  # a missing run fails before anything is imported or written
    workdir.mkdir(parents=True, exist_ok=True)
    settings = check_settings(config, workdir)
    t_load = time.perf_counter()
    world, schedule, action_config = load_world_model(config)
    searches = {"value_guided": plan_config(config, schedule)}
    if config.compare_no_value:
        searches["no_value"] = plan_config(config, schedule, use_value=False)
    problems = build_problems(config, world, action_config)
    n = len(problems)
    logging.info("world model and %d %s problems ready in %.1fs", n,
                 "toy" if problems.toy is not None else "clip", time.perf_counter() - t_load)
    todo = [i for i in range(n)
            if not (workdir / PROBLEMS_DIR / str(i) / "plan.json").exists()]
    if len(todo) < n:
        logging.info("%d of %d problems already planned in %s; planning the other %d",
                     n - len(todo), n, workdir, len(todo))
    mesh = make_mesh(config)
    shards = 1 if mesh is None else mesh.devices.size
    size = _padded(len(todo), int(config.problem_batch), shards)
    history = problems.history.astype(np.float32) / 127.5 - 1.0
    # Per search: (seconds, problems) of each call.
    timings: dict[str, list[tuple[float, int]]] = {name: [] for name in searches}
    fit_key = jax.random.key(int(config.seed) + 1)
    fit = fit_config(config)
    done = 0
    for start in range(0, len(todo), max(size, 1)):
        idx = todo[start:start + size]
        # Padding repeats the last problem, so every call has the same shape (one program).
        rows = np.asarray(idx + [idx[-1]] * (size - len(idx)))
        keys = problem_keys(int(config.seed), rows)
        plans = {}
        for name, search in searches.items():
            t0 = time.perf_counter()
            plan = hill_climb(world, history[rows], problems.text_tokens[rows],
                              problems.text_mask[rows], keys, search,
                              queries=problems.queries[rows], mesh=mesh)
            plans[name] = jax.device_get(plan)
            timings[name].append((time.perf_counter() - t0, len(idx)))
        for j, i in enumerate(idx):
            folder = workdir / PROBLEMS_DIR / str(i)
            folder.mkdir(parents=True, exist_ok=True)
            record: dict[str, Any] = {"problem": i, "instruction": problems.instructions[i],
                                      "source": problems.sources[i], "media": []}
            for name, plan in plans.items():
                entry = _beams(plan, j)
                if problems.toy is not None:
                    entry["outcome"] = toy_outcome(problems, i, plan, j,
                                                   jax.random.fold_in(fit_key, i),
                                                   follow=bool(config.follow_queries),
                                                   fit=fit)
                record[name] = entry
                if problems.toy is not None and "scripted_plan" not in record:
                    record["scripted_plan"] = {"outcome": oracle_outcome(
                        problems, i, plan, jax.random.fold_in(fit_key, i),
                        follow=bool(config.follow_queries), fit=fit)}
                if i < int(config.write_media):
                    suffix = "" if name == "value_guided" else "_no_value"
                    record["media"] += write_media(folder, problems, i, plan, j, suffix,
                                                   float(config.fps))
            _write_json(folder / "plan.json", record)
        done += len(idx)
        secs = sum(t[-1][0] for t in timings.values())
        logging.info("problem %d/%d planned (%d this run), %.2f plans/s in the last batch "
                     "(%d problems x %d searches in %.1fs)", n - len(todo) + done, n, done,
                     len(idx) * len(searches) / secs, len(idx), len(searches), secs)
    summary = summarize(workdir, n)
    rows = np.arange(min(n, int(config.problem_batch)))  # value guidance needs them to differ
    spread = candidate_spread(world, history[rows], problems.queries[rows],
                              problems.text_tokens[rows], problems.text_mask[rows],
                              jax.random.PRNGKey(int(config.seed)), int(config.candidates))
    summary.update({f"candidate_{k}": float(v) for k, v in spread.items()})
    if problems.toy is not None:
        summary.update(toy_value_preference(world, problems))
        summary.update(toy_flow_response(world, problems, rows, history,
                                         searches["value_guided"]))
    calls = [t for ts in timings.values() for t in ts]
    # The first call of each search compiles it; later calls show the steady-state rate.
    steady = [t for ts in timings.values() for t in ts[1:]]

    def rate(ts: list[tuple[float, int]]) -> float | None:
        return sum(c for _, c in ts) / sum(s for s, _ in ts) if ts else None

    summary.update({
        "settings": settings, "problem_batch": size, "devices": shards,
        "planned_this_run": len(todo),
        "search_seconds": round(sum(s for s, _ in calls), 2),
        "wall_seconds": round(time.perf_counter() - t_load, 1),
        "plans_per_second_with_compile": rate(calls),
        "plans_per_second": rate(steady),
    })
    _write_json(workdir / SUMMARY_FILE, summary)
    for suffix, label in (("", "value-guided"), ("_no_value", "FLIP-NV"),
                          ("_scripted_plan", "scripted tracks (oracle readout)")):
        if f"success_rate{suffix}" in summary:
            logging.info("%s success rate %.3f (%d/%d)", label, summary[f"success_rate{suffix}"],
                         summary[f"success_count{suffix}"], summary[f"evaluated{suffix}"])
    logging.info("summary: %s", workdir / SUMMARY_FILE)
    return summary
