"""Plans with trained FLIP modules: hill-climbing beam search over toy-world or clip problems.

    python -m experiments.plan --config=experiments/configs/plan.py --workdir=DIR \
        --config.runs=QUICKSTART_WORKDIR [--config.num_problems=50 \
        --config.compare_no_value=True --config.beams=4 ...]
    python -m experiments.plan --config=experiments/configs/plan.py:runlocal --workdir=DIR \
        --config.runs=QUICKSTART_WORKDIR

Loads the world model (``WorldModel.from_checkpoints``), builds the problems (toy problems
rendered with the image size, history and text settings of the loaded runs, or clips of a
``build_clips`` directory), plans them in batches of ``problem_batch`` with one jitted
``hill_climb`` call each (sharded over the mesh's data axis when several devices take part)
and writes, per problem ``i``:

* ``problems/<i>/plan.json``: the instruction, per-beam values and returns, the chosen beam,
  and for toy problems the block motion fitted from the chosen plan's tracks
  (``plan_to_actions``, world frame) and whether it meets the task's success predicate; also
  the same readout of the script's own tracks of the same queries over the same chunks
  (``scripted_plan``: what a perfect world model would reach with this horizon, query layout
  and motion readout, the ceiling of the planners' rates);
* for the first ``write_media`` problems ``plan.gif`` (history, then the chosen beam's frames
  with the tracks of their planning step) and ``values.png`` (every beam's values);
  ``*_no_value`` versions for the FLIP-NV ablation;

and ``plan_summary.json``: the settings, the number of problems, plans per second and, for toy
problems, the success rates of value-guided planning (``success_rate``), of FLIP-NV on the
same problems with the same keys (``success_rate_no_value``, with ``compare_no_value``) and of
the scripted tracks (``success_rate_scripted_plan``), with counts and per-task successes.
The summary also measures the three preconditions of value guidance
(``flipjax.planning.diagnostics``): ``candidate_spread_px``, how far apart the action module's
candidates are; for toy problems, ``dynamics_*``, whether the dynamics module's clip follows
the script's own flow (PSNR against the script's next frames with the true flow, with every
track held still, and of copying the current frame; ``dynamics_change`` is 0 when the flow is
ignored); and ``value_prefers_success``, how often the value scores a problem's faithful
ending above a failed script's ending (0.5 is chance).

Toy problems query the ``query_grid`` grid plus, with ``object_window`` r > 0, every pixel of
a (2r+1)^2 window around the task block: the block's motion is read from the queries on it
(``plan_to_actions`` needs 3 per planning step), and at the toy's 32 x 32 frames a block is
3-4 px wide, under at most one query of the 8 x 8 grid the models were trained with.

Every problem's key is derived from ``seed`` and its index only, so a problem plans the same in
any batch. Reruns skip problems whose ``plan.json`` exists and recompute the summary from all
of them; a rerun with other search settings is refused (``plan_settings.json``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from absl import flags, logging
from ml_collections import config_flags

from experiments import cli

SUMMARY_FILE = "plan_summary.json"
SETTINGS_FILE = "plan_settings.json"
PROBLEMS_DIR = "problems"
# Config fields that change what a problem's plan is (a rerun must keep them).
PLAN_FIELDS = ("runs", "action_dir", "dynamics_dir", "value_dir", "codec_dir", "ema", "dtype",
               "problems", "start", "seed", "beams", "candidates", "horizon", "replace_every",
               "discount", "value_on", "sampler", "sample_steps", "eta", "guidance_scale",
               "use_value", "query_grid", "object_window", "clip_x0", "compare_no_value")
EMA_CHOICES = {"auto": None, "ema": True, "params": False}
RUN_DIRS = (("action_dir", "cvae"), ("dynamics_dir", "dit"), ("value_dir", "value"))


# ------------------------------------------------------------------------------------------
# World model and search settings
# ------------------------------------------------------------------------------------------


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


def plan_config(config: Any, schedule: Any, use_value: bool | None = None) -> Any:
    """The :class:`flipjax.planning.PlanConfig` of ``config`` (``use_value`` overrides)."""
    from flipjax.planning import PlanConfig

    return PlanConfig(
        beams=int(config.beams), candidates=int(config.candidates),
        horizon=int(config.horizon), replace_every=int(config.replace_every),
        discount=float(config.discount), value_on=str(config.value_on),
        sampler=str(config.sampler), sample_steps=sample_steps(config.sample_steps),
        eta=float(config.eta), guidance_scale=float(config.guidance_scale),
        use_value=bool(config.use_value if use_value is None else use_value),
        query_grid=int(config.query_grid),
        clip_x0=float(config.clip_x0) if config.clip_x0 else None, schedule=schedule)


def load_world_model(config: Any) -> tuple[Any, Any, Any]:
    """(world model, DiT schedule, the action run's trainer config) of ``config``'s runs."""
    from flipjax.planning import WorldModel
    from flipjax.planning.world_model import run_config

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
    import jax

    from flipjax.sharding import create_mesh

    devices = jax.devices()
    n = len(devices) if int(config.mesh.data) == -1 else int(config.mesh.data)
    if not 1 <= n <= len(devices):
        raise ValueError(f"config.mesh.data={config.mesh.data}: have {len(devices)} devices")
    return None if n == 1 else create_mesh(n, 1, 1, devices=devices[:n])


# ------------------------------------------------------------------------------------------
# Problems
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Problems:
    """The problems to plan: arrays with a leading problem axis P.

    Attributes:
      history: uint8[P Th H W 3]; text_tokens: float32[P Lt D]; text_mask: bool[P Lt].
      instructions: P strings.
      sources: per problem a JSON-able description of where it comes from.
      queries: float32[P N 2] the planner's query points of each problem.
      toy: the ``ToyProblems`` (toy problems only; they carry depth, masks and poses).
    """

    history: Any
    text_tokens: Any
    text_mask: Any
    instructions: list[str]
    sources: list[dict[str, Any]]
    queries: Any
    toy: Any = None

    def __len__(self) -> int:
        return len(self.instructions)


def _start(value: Any) -> str | int:
    text = str(value).strip()
    return int(text) if text.isdigit() else text


def object_window(mask: Any, radius: int) -> Any:
    """float32[(2r+1)^2 2]: the pixel centres of a square window around a mask's centroid.

    The window keeps its size at the image border (it slides inward), so every problem gets
    the same number of queries.

    Args:
      mask: bool[H W] the object's pixels.
      radius: r, the window's half side in pixels.

    Raises:
      ValueError: when the window is larger than the frame.
    """
    import numpy as np

    h, w = mask.shape
    if 2 * radius + 1 > min(h, w):
        raise ValueError(f"object_window={radius} does not fit a {h}x{w} frame")
    v, u = np.nonzero(mask)
    # An empty mask (the object hidden) leaves nothing to follow: the window stays central.
    cu, cv = (u.mean(), v.mean()) if len(u) else ((w - 1) / 2, (h - 1) / 2)
    cu = int(np.clip(np.round(cu), radius, w - 1 - radius))
    cv = int(np.clip(np.round(cv), radius, h - 1 - radius))
    vv, uu = np.meshgrid(np.arange(cv - radius, cv + radius + 1),
                         np.arange(cu - radius, cu + radius + 1), indexing="ij")
    return np.stack([uu.ravel(), vv.ravel()], -1).astype(np.float32)


def toy_problems(config: Any, world: Any, action_config: Any) -> Problems:
    """Toy problems at the settings the runs were trained on (frame size, history, text)."""
    import numpy as np

    from data_pipelines import toy_problems as tp
    from data_pipelines.toy_world import ToyConfig

    h, w = (int(s) for s in action_config.model.img_size)
    if h != w:
        raise ValueError(f"toy problems are square; the action run takes {h}x{w} frames")
    toy = tp.make_problems(
        int(config.num_problems), int(config.seed), image_size=h,
        history=int(world.history_frames), text_dim=int(action_config.model.language_dim),
        text_max_tokens=int(action_config.get("toy_text_max_tokens", 8)),
        start=_start(config.start),
        # The world's motion per step as the runs saw it (config.toy_speed of their clips).
        toy_config=ToyConfig(speed=float(action_config.get("toy_speed", 0.015))))
    from flipjax.planning import grid_queries

    grid = np.asarray(grid_queries(int(config.query_grid), h, w))
    radius = int(config.object_window)
    queries = np.stack([np.concatenate([grid, object_window(m, radius)]) if radius > 0
                        else grid for m in toy.object_mask]).astype(np.float32)
    cells = np.clip(np.round(queries).astype(int), 0, h - 1)
    on_block = np.stack([m[c[:, 1], c[:, 0]] for m, c in zip(toy.object_mask, cells,
                                                              strict=True)]).sum(axis=1)
    sources = []
    for i, task in enumerate(toy.tasks):
        k = task.block
        start_xy = toy.blocks[i][k, :2]
        final_xy = toy.blocks_final[i][k, :2]
        sources.append({
            "kind": "toy", "seed": toy.seed, "split": tp.SPLIT, "episode": int(toy.episodes[i]),
            "start_step": int(toy.start_steps[i]), "task": task.kind, "block": int(k),
            "target": list(task.target),
            "start_target_distance_m": float(np.linalg.norm(start_xy - np.asarray(task.target))),
            "scripted_displacement_m": float(np.linalg.norm(final_xy - start_xy)),
            "scripted_success": bool(toy.scripted_success[i]),
            "object_pixels": int(toy.object_mask[i].sum()),
            "object_queries": int(on_block[i])})
    return Problems(toy.history, toy.text_tokens, toy.text_mask, list(toy.instructions),
                    sources, queries, toy)


def clip_problems(config: Any, world: Any, action_config: Any) -> Problems:
    """``num_problems`` clips of a ``build_clips`` directory, drawn with ``seed``."""
    import numpy as np

    from data_pipelines.loader import ClipDataset
    from flipjax.planning import grid_queries

    directory = Path(config.problems)
    if not (directory / "manifest.json").exists():
        raise ValueError(f"config.problems={config.problems!r} is neither 'toy' nor a "
                         "build_clips directory (no manifest.json)")
    ds = ClipDataset(directory, history=int(world.history_frames), future=0)
    size = tuple(int(s) for s in action_config.model.img_size)
    if (ds.layout.height, ds.layout.width) != size:
        raise ValueError(f"clips in {directory} have {ds.layout.height}x{ds.layout.width} "
                         f"frames; the models take {size[0]}x{size[1]}")
    if ds.text_dim != int(action_config.model.language_dim):
        raise ValueError(f"clips in {directory} have text_dim {ds.text_dim}; the models read "
                         f"{action_config.model.language_dim}")
    n = min(int(config.num_problems), len(ds))
    picks = np.sort(np.random.default_rng(int(config.seed)).choice(len(ds), n, replace=False))
    names = json.loads((directory / ds.manifest["text"]["files"]["instructions"]).read_text())
    table = ds.index_table()
    items = [ds[int(i)] for i in picks]
    return Problems(
        np.stack([it["history"] for it in items]),
        np.stack([it["text_tokens"] for it in items]),
        np.stack([it["text_mask"] for it in items]),
        [names[int(table[i, 4])] for i in picks],
        [{"kind": "clip", "directory": str(directory), "clip": int(i),
          "episode_id": int(it["episode_id"]), "frame_index": int(it["frame_index"])}
         for i, it in zip(picks, items, strict=True)],
        np.broadcast_to(np.asarray(grid_queries(int(config.query_grid), *size)),
                        (n, int(config.query_grid) ** 2, 2)).astype(np.float32))


def build_problems(config: Any, world: Any, action_config: Any) -> Problems:
    """Toy or clip problems as ``config.problems`` says."""
    if int(config.num_problems) < 1:
        raise ValueError(f"config.num_problems must be >= 1, got {config.num_problems}")
    if config.problems == "toy":
        return toy_problems(config, world, action_config)
    return clip_problems(config, world, action_config)


# ------------------------------------------------------------------------------------------
# Planning and outcomes
# ------------------------------------------------------------------------------------------


def problem_keys(seed: int, indices: Any) -> Any:
    """PRNG keys [P]: problem ``i``'s key depends on ``seed`` and ``i`` only."""
    import jax
    import jax.numpy as jnp

    base = jax.random.key(int(seed))
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.int32))


def toy_value_preference(world: Any, problems: Problems) -> dict[str, float]:
    """How often the value prefers each problem's faithful ending to a failed one.

    Both endings are the last ``value_frames`` frames of a script from the problem's own
    scene and instruction (``toy_problems.ending_clips``); 0.5 is chance, and a value at
    chance cannot guide the search whatever the candidates.
    """
    import numpy as np

    from data_pipelines import toy_problems as tp
    from flipjax.planning.diagnostics import value_preference

    frames = int(world.value_frames)
    good, bad = (tp.ending_clips(problems.toy, frames, failed=f).astype(np.float32) / 127.5 - 1
                 for f in (False, True))
    out = value_preference(world, good, bad, problems.text_tokens, problems.text_mask)
    return {"value_prefers_success": float(out["accuracy"]),
            "value_success_margin": float(out["margin"])}


def toy_flow_response(world: Any, problems: Problems, rows: Any, history: Any,
                      search: Any) -> dict[str, float]:
    """Whether the dynamics module follows the script's own flow on problems ``rows``.

    The true flow is the script's tracks of the problem's queries over one planning step, the
    true future its next frames (``toy_problems.scripted_tracks`` / ``future_frames``); see
    :func:`flipjax.planning.diagnostics.flow_response`.
    """
    import jax
    import numpy as np

    from data_pipelines import toy_problems as tp
    from flipjax.planning.diagnostics import flow_response

    length = int(jax.eval_shape(
        lambda h, q, t, m: world.propose(world.action_params, h, q, t, m, jax.random.key(0)),
        history[rows], problems.queries[rows], problems.text_tokens[rows],
        problems.text_mask[rows]).shape[2])
    flows = np.stack([tp.scripted_tracks(problems.toy, int(i), problems.queries[i], length, 1)[0]
                      for i in rows]).transpose(0, 2, 1, 3)
    future = tp.future_frames(problems.toy, length - 1, rows).astype(np.float32) / 127.5 - 1
    out = flow_response(world, history[rows], flows, future, problems.text_tokens[rows],
                        problems.text_mask[rows], jax.random.key(0), search)
    return {f"dynamics_{k}": float(v) for k, v in out.items()}


def toy_outcome(problems: Problems, i: int, plan: Any, j: int, key: Any) -> dict[str, Any]:
    """Fits the task block's motion from the chosen beam of row ``j`` of ``plan`` (problem
    ``i``) and judges it with the task's success predicate."""
    import jax
    import numpy as np

    from data_pipelines import toy_problems as tp
    from flipjax.planning.actions import plan_to_actions

    toy = problems.toy
    one = jax.tree.map(lambda x: x[j:j + 1], plan)
    acts = plan_to_actions(one, toy.depth[i:i + 1], toy.K, object_mask=toy.object_mask[i:i + 1],
                           extrinsics=toy.extrinsics, queries=problems.queries[i:i + 1], key=key)
    motion_camera = np.asarray(acts.transforms[0, -1], np.float64)
    motion = tp.camera_to_world_motion(toy, motion_camera)
    task = toy.tasks[i]
    before = toy.blocks[i][task.block]
    after = tp.moved_block(toy, i, motion)
    return {
        "success": bool(tp.success_after(toy, i, motion)),
        "motion_world": np.round(motion, 6).tolist(),
        "block_displacement_m": float(np.linalg.norm(after[:2] - before[:2])),
        "block_yaw_turn_rad": float(after[3] - before[3]),
        "target_distance_m": float(np.linalg.norm(after[:2] - np.asarray(task.target))),
        "contact_valid": bool(acts.contact_valid[0]),
        "inlier_fraction": float(np.mean(acts.inlier_fraction[0, :, 1:])),
        # Chunks whose fit had too few usable tracks on the block (they add no motion).
        "degenerate_chunks": int(np.sum(np.any(acts.degenerate[0, :, 1:], axis=-1))),
    }


def oracle_outcome(problems: Problems, i: int, plan: Any, key: Any) -> dict[str, Any]:
    """``toy_outcome`` of the script's own tracks of problem ``i``'s queries over the plan's
    chunks (``toy_problems.scripted_tracks``): what a perfect world model would score with this
    horizon, query grid and motion readout. Laid out like ``plan`` (every beam the same), so
    ``plan_to_actions`` runs the program it already compiled."""
    import numpy as np

    from data_pipelines import toy_problems as tp
    from flipjax.planning import Plan

    _, b, hz, ll, _, _ = plan.flows.shape
    flows = tp.scripted_tracks(problems.toy, i, problems.queries[i], ll, hz)
    oracle = Plan(flows=np.broadcast_to(flows, (1, b, *flows.shape)), latents=None,
                  videos=None, values=None, returns=None, best=np.zeros(1, np.int32))
    return toy_outcome(problems, i, oracle, 0, key)


def _beams(plan: Any, j: int) -> dict[str, Any]:
    import numpy as np

    best = int(plan.best[j])
    return {"best": best, "best_return": float(plan.returns[j, best]),
            "values": np.asarray(plan.values[j]).round(6).tolist(),
            "returns": np.asarray(plan.returns[j]).round(6).tolist()}


def write_media(folder: Path, problems: Problems, i: int, plan: Any, j: int, suffix: str,
                fps: float) -> list[str]:
    """``plan<suffix>.gif`` and ``values<suffix>.png`` of problem ``i`` (row ``j``)."""
    from flipjax import viz

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
    from flipjax.settings_record import record_or_check

    mine = {k: config[k] for k in PLAN_FIELDS}
    record_or_check(workdir / SETTINGS_FILE, mine,
                    refusal=f"--workdir {workdir} holds plans made with other settings",
                    remedy="use a new --workdir")
    return mine


def summarize(workdir: Path, num_problems: int) -> dict[str, Any]:
    """Aggregates ``problems/<i>/plan.json`` for i < num_problems: counts, mean best returns
    and, for toy problems, success rates (overall and per task kind)."""
    import numpy as np

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
    import jax
    import numpy as np

    from flipjax.planning import hill_climb

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
                                                   jax.random.fold_in(fit_key, i))
                record[name] = entry
                if problems.toy is not None and "scripted_plan" not in record:
                    record["scripted_plan"] = {"outcome": oracle_outcome(
                        problems, i, plan, jax.random.fold_in(fit_key, i))}
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
    from flipjax.planning.diagnostics import candidate_spread

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


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------


def define_flags() -> tuple[Any, Any]:
    """Defines ``--config`` and ``--workdir`` (only when run as a program: the training CLI,
    imported next to this module by tests and notebooks, defines flags of the same names)."""
    config = config_flags.DEFINE_config_file(
        "config", None, "Planning config file, optionally with an argument: "
        "path.py[:runlocal].", lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, "Output directory (plans, media, summary).")
    return config, workdir


def main(argv: list[str], flag_holders: tuple[Any, Any]) -> None:
    config, workdir = cli.config_and_workdir(argv, *flag_holders)
    logging.info("config:\n%s", config)
    run(config, workdir)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _flags = define_flags()
    cli.run(lambda argv: main(argv, _flags), "plan")
