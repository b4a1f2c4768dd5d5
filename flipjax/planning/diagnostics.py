"""The two preconditions of value guidance, measured.

Value-guided search can only beat a random candidate (FLIP-NV) when the candidates differ and
the value ranks them. A CVAE whose decoder ignores its latent proposes the same flow A times,
and then every planner that picks among them plans the same thing
(:func:`candidate_spread`); a value that does not read the instruction picks at random among
different candidates (:func:`value_preference`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flipjax import shapes
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
