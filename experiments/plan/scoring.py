"""What a plan achieved: toy-task success from the plan's tracks, the scripted ceiling, and the
three preconditions of value guidance (value preference, flow response)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines.toy import problems as tp
from experiments.plan.problems import Problems
from flipjax.geometry.rigid_fit import FitConfig
from flipjax.planning import Plan, WorldModel
from flipjax.planning.actions import plan_to_actions
from flipjax.planning.diagnostics import flow_response, value_preference


def problem_keys(seed: int, indices: Any) -> Any:
    """PRNG keys [P]: problem ``i``'s key depends on ``seed`` and ``i`` only."""
    base = jax.random.key(int(seed))
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.int32))


def toy_value_preference(world: WorldModel, problems: Problems) -> dict[str, float]:
    """How often the value prefers each problem's faithful ending to a failed one.

    Both endings are the last ``value_frames`` frames of a script from the problem's own
    scene and instruction (``toy_problems.ending_clips``); 0.5 is chance, and a value at
    chance cannot guide the search whatever the candidates.
    """
    frames = int(world.value_frames)
    good, bad = (tp.ending_clips(problems.toy, frames, failed=f).astype(np.float32) / 127.5 - 1
                 for f in (False, True))
    out = value_preference(world, good, bad, problems.text_tokens, problems.text_mask)
    return {"value_prefers_success": float(out["accuracy"]),
            "value_success_margin": float(out["margin"])}


def toy_flow_response(world: WorldModel, problems: Problems, rows: Any, history: Any,
                      search: Any) -> dict[str, float]:
    """Whether the dynamics module follows the script's own flow on problems ``rows``.

    The true flow is the script's tracks of the problem's queries over one planning step, the
    true future its next frames (``toy_problems.scripted_tracks`` / ``future_frames``); see
    :func:`flipjax.planning.diagnostics.flow_response`.
    """
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


def fit_config(config: Any) -> FitConfig:
    """The readout's FitConfig of a plan config (its ``fit_prior_*`` fields; absent: 0)."""
    return FitConfig(prior_translation=float(config.get("fit_prior_translation", 0.0)),
                     prior_rotation=float(config.get("fit_prior_rotation", 0.0)))


def toy_outcome(problems: Problems, i: int, plan: Any, j: int, key: Any,
                follow: bool = False, fit: FitConfig = FitConfig()) -> dict[str, Any]:
    """Fits the task block's motion from the chosen beam of row ``j`` of ``plan`` (problem
    ``i``) and judges it with the task's success predicate. ``follow``: the plan was searched
    with ``follow_queries``, so each chunk's tracks start at its own query points (the
    previous chunk's ends) rather than at ``problems.queries``. ``fit``: the readout's
    robust-fit settings (:func:`fit_config`)."""
    toy = problems.toy
    one = jax.tree.map(lambda x: x[j:j + 1], plan)
    acts = plan_to_actions(one, toy.depth[i:i + 1], toy.K, object_mask=toy.object_mask[i:i + 1],
                           extrinsics=toy.extrinsics,
                           queries=None if follow else problems.queries[i:i + 1], key=key,
                           fit_config=fit)
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


def oracle_outcome(problems: Problems, i: int, plan: Any, key: Any,
                   follow: bool = False, fit: FitConfig = FitConfig()) -> dict[str, Any]:
    """``toy_outcome`` of the script's own tracks of problem ``i``'s queries over the plan's
    chunks (``toy_problems.scripted_tracks``, following its queries with ``follow``): what a
    perfect world model would score with this horizon, query layout and motion readout. Laid
    out like ``plan`` (every beam the same), so ``plan_to_actions`` runs the program it
    already compiled."""
    _, b, hz, ll, _, _ = plan.flows.shape
    flows = tp.scripted_tracks(problems.toy, i, problems.queries[i], ll, hz, follow=follow)
    oracle = Plan(flows=np.broadcast_to(flows, (1, b, *flows.shape)), latents=None,
                  videos=None, values=None, returns=None, best=np.zeros(1, np.int32))
    return toy_outcome(problems, i, oracle, 0, key, follow=follow, fit=fit)
