"""Closed-loop Meta-World evaluation: plan object motion, infer actions, execute, count successes.

    python -m experiments.metaworld --mode=oracle --tasks=all --cameras=all --seeds=0-4 \\
        --out=results.json

AVDC's protocol: every episode starts from ``make_env(task, seed)``; the planner sees the
current frame from one of the ``corner`` cameras (with its depth and the target object's mask),
``experiments.metaworld.policy.ClosedLoopPolicy`` executes the plan with a position controller
and replans from the current frame after 15 steps without hand motion (at most 5 replans); an
episode succeeds if any step reports ``info["success"]`` within Meta-World's 500 steps.

Modes (``experiments.metaworld.planners``): ``oracle`` (the simulator's own future object motion,
flipjax's fit, grasp test and controller: geometry + controller, the upper bound), ``avdc`` (the
same motion through AVDC's own pipeline: its depth sampling, chained fit, grasp test and
controller constants), ``model`` (a flipjax world model plans flows from the frame and the
instruction; give ``--runs`` as for ``experiments.plan``).

Writes ``--out`` (JSON: ``overall_success_rate``, per task, per camera and per task/camera
rates, settings, wall time), a Markdown table next to it (``.md``), per-episode records
(``.episodes.jsonl``, which also makes an interrupted run resume where it stopped) and GIFs of
the first ``--videos`` episodes of each task (``<out stem>_videos/``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import app, flags

from data_pipelines.metaworld import sim as ms
from experiments import cli
from flipjax.settings_record import describe_changes

MODES = ("oracle", "avdc", "model")


def parse_list(value: str, allowed: Sequence[str], what: str) -> list[str]:
    """Comma-separated names, or "all"; ValueError naming an unknown one and the choices."""
    if value.strip() == "all":
        return list(allowed)
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ValueError(f"--{what}: unknown {bad or value!r}; choose from {list(allowed)} "
                         "or 'all'")
    return names


def parse_seeds(value: str) -> list[int]:
    """Seeds like "0-4,7" -> [0, 1, 2, 3, 4, 7] (ValueError naming --seeds when bad)."""
    try:
        seeds = ms.parse_range(value)
    except ValueError as e:
        raise ValueError(f"--seeds: {e}") from None
    if not seeds or min(seeds) < 0:
        raise ValueError(f"--seeds: expected non-negative seeds like '0-4,7', got {value!r}")
    return sorted(set(seeds))


def run_episode(task: str, camera: str, seed: int, planner_factory: Any, *,
                image_size: int = 128, max_replans: int = 5, plan_timeout: int = 15,
                video_every: int = 0, avdc_controller: bool = False
                ) -> tuple[dict[str, Any], list[np.ndarray]]:
    """One closed-loop episode.

    Args:
      task, camera, seed: what to evaluate.
      planner_factory: ``factory(scene) -> planner`` (``planner() -> MotionPlan``).
      image_size: square frame size the planner sees (model mode: the models' size).
      max_replans, plan_timeout: AVDC's replanning rule.
      video_every: keep a frame every this many steps (0: no video).
      avdc_controller: AVDC's controller constants instead of flipjax's
        (``ControlConfig.avdc()``).

    Returns:
      (record: success, steps, first_success_step, replans, is_grasp, plan diagnostics and
       seconds; frames: uint8[H W 3] list, empty without video).
    """
    from experiments.metaworld.planners import Scene
    from experiments.metaworld.policy import ClosedLoopPolicy, ControlConfig, PlanUnavailable

    start = time.perf_counter()
    env = ms.make_env(task, seed)
    renderer = ms.Renderer(env.model, image_size, image_size)
    scene = Scene(task, camera, seed, env, renderer, twin=None)
    frames: list[np.ndarray] = []
    try:
        scene.twin = ms.make_env(task, seed)
        try:
            make = ControlConfig.avdc if avdc_controller else ControlConfig
            policy = ClosedLoopPolicy(planner_factory(scene), make(
                plan_timeout=plan_timeout, max_replans=max_replans))
        except PlanUnavailable as e:  # no first plan: the episode fails without moving
            return ({"task": task, "camera": camera, "seed": seed, "success": False,
                     "first_success_step": None, "steps": 0, "replans": 0, "is_grasp": None,
                     "seconds": time.perf_counter() - start, "plans": [],
                     "plan_error": str(e)}, frames)
        obs, success_step, step = env.last_obs, None, 0
        for step in range(ms.MAX_STEPS):
            if video_every and step % video_every == 0:
                frames.append(renderer.render(env.data, camera, depth=False,
                                              segmentation=False)["image"])
            obs, _, _, truncated, info = env.step(policy.act(obs))
            env.last_obs = obs
            if info["success"]:
                success_step = step + 1
                break
            if truncated:
                break
        if video_every:
            frames.append(renderer.render(env.data, camera, depth=False,
                                          segmentation=False)["image"])
    finally:
        renderer.close()
    first = policy.plans[0]
    record = {
        "task": task, "camera": camera, "seed": seed, "success": success_step is not None,
        "first_success_step": success_step, "steps": step + 1, "replans": policy.replans,
        "is_grasp": bool(first.is_grasp), "seconds": time.perf_counter() - start,
        "plans": [dict(p.info, is_grasp=bool(p.is_grasp)) for p in policy.plans],
        "failed_replans": policy.failed_replans,
    }
    return record, frames


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Success rates overall, per task, per camera and per task/camera."""
    def rate(rs: list[dict[str, Any]]) -> dict[str, Any]:
        n = len(rs)
        k = sum(r["success"] for r in rs)
        return {"success_rate": k / n if n else None, "successes": k, "episodes": n}

    tasks = sorted({r["task"] for r in records}, key=ms.TASKS.index)
    cameras = sorted({r["camera"] for r in records}, key=ms.CAMERAS.index)
    overall = rate(records)
    return {
        "overall_success_rate": overall["success_rate"],
        "successes": overall["successes"], "episodes": overall["episodes"],
        "per_task": {t: rate([r for r in records if r["task"] == t]) for t in tasks},
        "per_camera": {c: rate([r for r in records if r["camera"] == c]) for c in cameras},
        "per_task_camera": {t: {c: rate([r for r in records if r["task"] == t
                                         and r["camera"] == c]) for c in cameras}
                            for t in tasks},
        "mean_replans": float(np.mean([r["replans"] for r in records])) if records else None,
    }


def markdown_table(summary: dict[str, Any], title: str) -> str:
    """The per task x camera success table (percent, successes/episodes)."""
    cams = list(summary["per_camera"])
    lines = [f"## {title}", "", "| task | " + " | ".join(cams) + " | all |",
             "|---|" + "---|" * (len(cams) + 1)]

    def cell(r: dict[str, Any]) -> str:
        return f"{100 * r['success_rate']:.0f}% ({r['successes']}/{r['episodes']})"

    for task, row in summary["per_task_camera"].items():
        lines.append(f"| {task} | " + " | ".join(cell(row[c]) for c in cams)
                     + f" | {cell(summary['per_task'][task])} |")
    lines.append("| **all** | " + " | ".join(cell(summary["per_camera"][c]) for c in cams)
                 + f" | **{100 * summary['overall_success_rate']:.1f}%** "
                 f"({summary['successes']}/{summary['episodes']}) |")
    return "\n".join(lines) + "\n"


def planner_factory(mode: str, *, frames: int = 8, num_points: int = 500,
                    model_options: dict[str, Any] | None = None) -> tuple[Any, int | None]:
    """(``factory(scene) -> planner``, the frame size the planner needs or None) for ``mode``
    (see the module docstring)."""
    from experiments.metaworld import planners as mp

    if mode in ("oracle", "avdc"):
        method = "flipjax" if mode == "oracle" else "avdc"
        return (lambda scene: mp.oracle_planner(scene, method=method, frames=frames,
                                                num_points=num_points)), None
    if mode == "model":
        from experiments.metaworld.model import ModelPlanner

        shared = ModelPlanner(**(model_options or {}))
        return shared.for_scene, shared.image_size
    raise ValueError(f"--mode must be one of {list(MODES)}, got {mode!r}")


def evaluate(mode: str, tasks: Sequence[str], cameras: Sequence[str], seeds: Sequence[int],
             out: str | Path, *, videos: int = 1, image_size: int = 128, frames: int = 8,
             num_points: int = 500, max_replans: int = 5, plan_timeout: int = 15,
             model_options: dict[str, Any] | None = None, progress: bool = True
             ) -> dict[str, Any]:
    """Runs every (task, camera, seed) episode and writes the results (module docstring).

    Returns:
      The JSON written to ``out``.
    """
    from tqdm import tqdm

    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    factory, needed_size = planner_factory(mode, frames=frames, num_points=num_points,
                                           model_options=model_options)
    # The models see frames of their own size; depth, mask and K follow the frames.
    image_size = needed_size or image_size
    settings = {"mode": mode, "tasks": list(tasks), "cameras": list(cameras),
                "seeds": list(seeds), "image_size": image_size, "frames": frames,
                "num_points": num_points, "max_replans": max_replans,
                "plan_timeout": plan_timeout, "model": model_options or {}}
    log = out.with_suffix(".episodes.jsonl")
    done: dict[tuple[str, str, int], dict[str, Any]] = {}
    if log.exists():
        lines = log.read_text().splitlines()
        head = json.loads(lines[0]) if lines else {}
        # A rerun may add or drop tasks, cameras and seeds: the log is per episode.
        changes = describe_changes(head.get("settings", {}), json.loads(json.dumps(settings)),
                                   ignore=("tasks", "cameras", "seeds"))
        if changes:
            raise ValueError(f"{log} holds episodes run with other settings ({changes}); use "
                             "another --out or delete it")
        for number, line in enumerate(lines[1:], start=2):
            try:
                r = json.loads(line)
                done[(r["task"], r["camera"], r["seed"])] = r
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                if number == len(lines):  # cut short by an interruption: drop, run again
                    log.write_text("\n".join(lines[:-1]) + "\n")
                    continue
                raise ValueError(f"{log}, line {number}: not an episode record ({e}); "
                                 "fix or delete the file") from None
    else:
        log.write_text(json.dumps({"settings": settings}) + "\n")
    video_dir = out.parent / f"{out.stem}_videos"
    jobs = [(t, c, s) for t in tasks for c in cameras for s in seeds]
    start = time.perf_counter()
    records = []
    bar = tqdm(jobs, desc=f"meta-world {mode}", unit="ep", disable=not progress)
    for task, camera, seed in bar:
        if (task, camera, seed) in done:
            records.append(done[(task, camera, seed)])
            continue
        filmed = sum(1 for r in records if r["task"] == task and r.get("video"))
        record, film = run_episode(task, camera, seed, factory, image_size=image_size,
                                   max_replans=max_replans, plan_timeout=plan_timeout,
                                   video_every=2 if filmed < videos else 0,
                                   avdc_controller=mode == "avdc")
        if film:
            import imageio.v2 as imageio

            video_dir.mkdir(exist_ok=True)
            path = video_dir / f"{task}_{camera}_{seed}.gif"
            imageio.mimsave(path, film, duration=0.1, loop=0)
            record["video"] = str(path)
        records.append(record)
        with log.open("a") as f:
            f.write(json.dumps(record) + "\n")
        bar.set_postfix(success=f"{np.mean([r['success'] for r in records]):.2f}")
    summary = summarize(records)
    result = {**summary, "settings": settings,
              "wall_seconds_this_run": time.perf_counter() - start,
              "episode_seconds_total": float(sum(r["seconds"] for r in records)),
              "episodes_log": str(log)}
    out.write_text(json.dumps(result, indent=1) + "\n")
    title = f"Meta-World, mode {mode}: success per task and camera (seeds {list(seeds)})"
    out.with_suffix(".md").write_text(markdown_table(summary, title))
    return result


def define_flags() -> None:
    """The CLI's flags (defined only when run as a program: tests import this module)."""
    flags.DEFINE_enum("mode", "oracle", list(MODES), "Where the object's motion comes from.")
    flags.DEFINE_string("tasks", "all", "Comma-separated tasks or 'all' (AVDC's 11).")
    flags.DEFINE_string("cameras", "all", "Comma-separated cameras or 'all' (corner, corner2, "
                        "corner3).")
    flags.DEFINE_string("seeds", "0-4", "Seeds, e.g. '0-4,7'.")
    flags.DEFINE_string("out", None, "Results JSON (also .md, .episodes.jsonl, _videos/).")
    flags.DEFINE_integer("videos", 1, "GIFs of the first N episodes of each task.")
    flags.DEFINE_integer("image_size", 128, "Square frame size the planner sees.")
    flags.DEFINE_integer("frames", 8, "Oracle/avdc: frames of the predicted motion.")
    flags.DEFINE_integer("points", 500, "Oracle/avdc: object samples tracked (AVDC: 500).")
    flags.DEFINE_integer("max_replans", 5, "Replans allowed after the first plan.")
    flags.DEFINE_integer("plan_timeout", 15, "Still steps that trigger a replan.")
    flags.DEFINE_string("runs", None, "Model mode: a quickstart-style directory with "
                        "cvae/, dit/, value/ (and autoencoder/ when the DiT needs it).")
    flags.DEFINE_string("text", "hash", "Model mode: text encoder of the runs (hash|minilm).")
    flags.DEFINE_string("text_model_dir", None, "Model mode, --text=minilm: model directory.")
    flags.DEFINE_integer("text_max_tokens", 16, "Model mode: tokens per instruction "
                         "(build_clips' --text_max_tokens of the runs' clips).")
    flags.DEFINE_string("plan_overrides", "", "Model mode: PlanConfig fields, e.g. "
                        "'beams=2,candidates=4,horizon=2,sample_steps=10'.")


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    if not f.out:
        raise app.UsageError("--out is required (the results JSON)")
    tasks = parse_list(f.tasks, ms.TASKS, "tasks")
    cameras = parse_list(f.cameras, ms.CAMERAS, "cameras")
    model_options = None
    if f.mode == "model":
        if not f.runs:
            raise app.UsageError("--mode=model needs --runs (the trained modules' directory)")
        model_options = {"runs": f.runs, "text": f.text, "text_model_dir": f.text_model_dir,
                         "text_max_tokens": f.text_max_tokens,
                         "plan_overrides": f.plan_overrides}
    result = evaluate(f.mode, tasks, cameras, parse_seeds(f.seeds), f.out, videos=f.videos,
                      image_size=f.image_size, frames=f.frames, num_points=f.points,
                      max_replans=f.max_replans, plan_timeout=f.plan_timeout,
                      model_options=model_options)
    print(Path(f.out).with_suffix(".md").read_text())
    print(f"overall success rate {result['overall_success_rate']:.3f} "
          f"({result['successes']}/{result['episodes']}); results in {f.out}")


def run_cli() -> None:
    """``python -m experiments.metaworld``: defines the flags, then runs :func:`main`."""
    define_flags()
    cli.run(main, "eval_metaworld")
