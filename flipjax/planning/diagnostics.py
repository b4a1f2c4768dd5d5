"""The three preconditions of value guidance, measured.

Value-guided search can only beat a random candidate (FLIP-NV) when the candidates differ, the
dynamics module shows the difference and the value ranks what it shows. A CVAE whose decoder
ignores its latent proposes the same flow A times, and then every planner that picks among them
plans the same thing (:func:`candidate_spread`); a dynamics model that ignores its flow
condition renders every candidate alike (:func:`flow_response`); a value that does not read the
instruction picks at random among different clips (:func:`value_preference`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flipjax import shapes
from flipjax.planning.beam_search import PlanConfig, rollout_candidates
from flipjax.planning.world_model import WorldModel
from flipjax.typing import Array, ArrayLike, PRNGKey


def candidate_spread(wm: WorldModel, history: ArrayLike, queries: ArrayLike,
                     text_tokens: ArrayLike, text_mask: ArrayLike, key: PRNGKey,
                     candidates: int = 4) -> dict[str, Array]:
    """Mean pairwise distance between ``candidates`` prior samples of the action module.

    Args:
      wm: the world model (its ``propose``).
      history: float[P Th H W 3] frames in [-1, 1] (Th = ``wm.history_frames``).
      queries: float[P N 2] query pixels.
      text_tokens: float[P Lt D]; text_mask: bool[P Lt].
      key: PRNG key; candidate a uses ``fold_in(key, a)``.
      candidates: A >= 2 samples per problem.

    Returns:
      {"spread_px": float[] mean over problems, queries, steps and candidate pairs of the
       distance between two candidates' tracks; "displacement_px": float[] mean distance a
       query moves from step 0 to the last step, for scale}.
    """
    dims = shapes.check(jnp.asarray(history), "history", "P T H W 3", dtype="float")
    shapes.check(jnp.asarray(queries), "queries", "P N 2", dims, dtype="float")
    if candidates < 2:
        raise ValueError(f"candidates must be >= 2 to compare them, got {candidates}")
    flows = jnp.stack([wm.propose(wm.action_params, history, queries, text_tokens, text_mask,
                                  jax.random.fold_in(key, a)) for a in range(candidates)])
    pairs = [(i, j) for i in range(candidates) for j in range(i + 1, candidates)]
    spread = jnp.mean(jnp.stack([jnp.linalg.norm(flows[i] - flows[j], axis=-1).mean()
                                 for i, j in pairs]))
    displacement = jnp.linalg.norm(flows[..., -1, :] - flows[..., 0, :], axis=-1).mean()
    return {"spread_px": spread, "displacement_px": displacement}


def value_preference(wm: WorldModel, preferred: ArrayLike, other: ArrayLike,
                     text_tokens: ArrayLike, text_mask: ArrayLike) -> dict[str, Array]:
    """How often the value scores ``preferred`` clips above ``other`` clips, row by row.

    Args:
      wm: the world model (its ``value``).
      preferred: float[P Tv H W 3] clips in [-1, 1] that should score higher (e.g. the end of
        a faithful script); Tv = ``wm.value_frames``.
      other: float[P Tv H W 3] clips that should score lower (e.g. the end of a failed script
        from the same scene and instruction).
      text_tokens: float[P Lt D]; text_mask: bool[P Lt].

    Returns:
      {"accuracy": float[] fraction of rows with V(preferred) > V(other) (0.5: chance),
       "margin": float[] mean V(preferred) - V(other)}.
    """
    dims = shapes.check(jnp.asarray(preferred), "preferred", f"P {wm.value_frames} H W 3",
                        dtype="float")
    shapes.check(jnp.asarray(other), "other", f"P {wm.value_frames} H W 3", dims, dtype="float")
    shapes.check(jnp.asarray(text_tokens), "text_tokens", "P Lt D", dims, dtype="float")
    good = wm.value(wm.value_params, jnp.asarray(preferred), jnp.asarray(text_tokens),
                    jnp.asarray(text_mask))
    bad = wm.value(wm.value_params, jnp.asarray(other), jnp.asarray(text_tokens),
                   jnp.asarray(text_mask))
    return {"accuracy": jnp.mean(good > bad), "margin": jnp.mean(good - bad)}


_rollout = jax.jit(rollout_candidates, static_argnames="config")


def flow_response(wm: WorldModel, history: ArrayLike, flows: ArrayLike, future: ArrayLike,
                  text_tokens: ArrayLike, text_mask: ArrayLike, key: PRNGKey,
                  config: PlanConfig = PlanConfig()) -> dict[str, Array]:
    """Whether the dynamics module's clip follows the flow it is given.

    Generates the next clip of each row twice with the same noise, once conditioned on the true
    flow and once on "nothing moves" (every track held at its query point), and scores both
    against the true future frames.

    Args:
      wm: the world model (its codec and dynamics; the value is evaluated but not reported).
      history: float[P Th H W 3] frames in [-1, 1] (Th >= ``wm.history_frames``).
      flows: float[P N L 2] the true tracks, step 0 the current frame.
      future: float[P F H W 3] the true next F = L - 1 frames, in [-1, 1].
      text_tokens: float[P Lt D]; text_mask: bool[P Lt].
      key: PRNG key of the sampler (shared by both generations).
      config: the sampler settings (``sampler``, ``sample_steps``, ``clip_x0``, ...).

    Returns:
      {"psnr_true_flow", "psnr_still_flow": float[] PSNR (dB, [-1, 1] pixels, MSE pooled over
       all frames) of the generated frames against ``future``; "change": float[] mean
       absolute pixel difference between the two generated clips (0: the flow is ignored);
       "future_change": float[] the same between the true future and the current frame
       repeated, for scale; "psnr_copy": float[] PSNR of that repeated current frame, the
       no-model reference}.
    """
    history, flows, future = (jnp.asarray(x, jnp.float32) for x in (history, flows, future))
    dims = shapes.check(history, "history", "P T H W 3", dtype="float")
    dims = shapes.check(flows, "flows", "P N L 2", dims, dtype="float")
    shapes.check(future, "future", f"P {dims['L'] - 1} H W 3", dims, dtype="float")
    text_tokens = jnp.asarray(text_tokens, jnp.float32)
    shapes.check(text_tokens, "text_tokens", "P Lt D", dims, dtype="float")
    th = dims["T"]
    tl = th if wm.latent_history_frames is None else min(th, int(wm.latent_history_frames))
    p = dims["P"]
    latents = wm.encode(wm.codec_params, history[:, th - tl:].reshape(p * tl, *history.shape[2:]))
    latents = latents.reshape(p, tl, *latents.shape[1:])
    still = jnp.broadcast_to(flows[:, :, :1], flows.shape)
    text_mask = jnp.asarray(text_mask)
    # Same shapes and key: row i starts from the same noise in both calls.
    true_flow, still_flow = (
        jnp.clip(_rollout(wm, latents, history, f, text_tokens, text_mask, key, config)[1],
                 -1.0, 1.0) for f in (flows, still))
    copy = jnp.broadcast_to(history[:, -1:], future.shape)
    return {"psnr_true_flow": _pooled_psnr(true_flow, future),
            "psnr_still_flow": _pooled_psnr(still_flow, future),
            "change": jnp.mean(jnp.abs(true_flow - still_flow)),
            "future_change": jnp.mean(jnp.abs(future - history[:, -1:])),
            "psnr_copy": _pooled_psnr(copy, future)}


def _pooled_psnr(pred: Array, target: Array) -> Array:
    # One PSNR of the MSE pooled over every frame: a static clip copied exactly has an infinite
    # PSNR of its own, which would swamp a per-frame mean.
    return 10.0 * jnp.log10(4.0 / jnp.maximum(jnp.mean((pred - target) ** 2), 1e-12))
