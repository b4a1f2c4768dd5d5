"""Flow-prediction metrics of FLIP: average distance error (ADE) and the less-than-delta ratio.

Both compare predicted and ground-truth trajectories float[B N L 2] (pixels) on steps
1..L-1 (step 0 is the shared query point). The official evaluation keeps only the steps where
the ground truth moves more than 1 px (:func:`moving_steps`); pass that as ``valid``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp

from flipjax import shapes
from flipjax.typing import Array


def step_distances(pred_flow: Array, gt_flow: Array) -> Array:
    """float[B N L-1] Euclidean distance between prediction and truth at steps 1..L-1."""
    dims = shapes.check(pred_flow, "pred_flow", "B N L 2", dtype="float")
    shapes.check(gt_flow, "gt_flow", "B N L 2", dims, dtype="float")
    return jnp.linalg.norm(pred_flow[:, :, 1:] - gt_flow[:, :, 1:], axis=-1)


def moving_steps(gt_flow: Array, threshold: float = 1.0) -> Array:
    """bool[B N L-1]: steps whose ground-truth move into point i+1 is longer than
    ``threshold`` pixels (the official evaluation mask)."""
    shapes.check(gt_flow, "gt_flow", "B N L 2", dtype="float")
    return jnp.linalg.norm(gt_flow[:, :, 1:] - gt_flow[:, :, :-1], axis=-1) > threshold


def _masked_mean(x: Array, valid: Array | None) -> Array:
    if valid is None:
        return jnp.mean(x)
    shapes.check(valid, "valid", " ".join(f"{s}" for s in x.shape), dtype="bool")
    # An empty selection gives 0 rather than NaN so batch averages stay finite.
    return jnp.sum(jnp.where(valid, x, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def ade(pred_flow: Array, gt_flow: Array, valid: Array | None = None) -> Array:
    """Average distance error.

    Args:
      pred_flow: float[B N L 2] prediction.
      gt_flow: float[B N L 2] ground truth.
      valid: optional bool[B N L-1] steps to average over (e.g. :func:`moving_steps`).

    Returns:
      float[] mean distance in pixels.
    """
    return _masked_mean(step_distances(pred_flow, gt_flow), valid)


def less_than_delta_ratio(pred_flow: Array, gt_flow: Array,
                          deltas: Sequence[float] = (2.0, 4.0, 8.0),
                          valid: Array | None = None) -> Array:
    """LTDR: for each delta the fraction of steps within ``delta`` pixels (<=), averaged over
    the deltas (official ``less_than_delta``).

    Args:
      pred_flow: float[B N L 2] prediction.
      gt_flow: float[B N L 2] ground truth.
      deltas: pixel thresholds.
      valid: optional bool[B N L-1] steps to count.

    Returns:
      float[] ratio in [0, 1].
    """
    if not deltas:
        raise ValueError("deltas must not be empty")
    dist = step_distances(pred_flow, gt_flow)
    ratios = [_masked_mean((dist <= d).astype(jnp.float32), valid) for d in deltas]
    return jnp.mean(jnp.stack(ratios))


# ------------------------------------------------------------------------------------------
# Value curves (value module)
# ------------------------------------------------------------------------------------------


def _average_ranks(x: Array) -> Array:
    """float32[B S] 0-based ranks along the last axis, ties sharing their average rank."""
    less = jnp.sum(x[:, None, :] < x[:, :, None], axis=-1)
    equal = jnp.sum(x[:, None, :] == x[:, :, None], axis=-1)
    return (less + 0.5 * (equal - 1)).astype(jnp.float32)


def value_curve_monotonicity(values: Array, *, atol: float = 0.0) -> tuple[Array, Array]:
    """How steadily value curves rise along their videos.

    Args:
      values: float[B S] values of successive states of B videos (S >= 2), e.g. the value
        model applied to ``flipjax.models.value.clip_states``.
      atol: a step counts as non-decreasing when v[s+1] >= v[s] - atol.

    Returns:
      (fraction float32[B] of the S-1 steps that are non-decreasing,
       Spearman rank correlation float32[B] of the values with time, in [-1, 1]; ties get
       average ranks, and a constant curve scores 0).
    """
    dims = shapes.check(values, "values", "B S", dtype="float")
    if dims["S"] < 2:
        raise ValueError(f"values: need at least 2 states per curve, got {dims['S']}")
    v = jnp.asarray(values, jnp.float32)
    frac = jnp.mean((jnp.diff(v, axis=1) >= -atol).astype(jnp.float32), axis=1)
    # O(S^2) ranks: curves are at most a few hundred states long.
    rv = _average_ranks(v)
    rv = rv - jnp.mean(rv, axis=1, keepdims=True)
    rt = jnp.arange(dims["S"], dtype=jnp.float32)
    rt = rt - jnp.mean(rt)
    denom = jnp.sqrt(jnp.sum(rv**2, axis=1) * jnp.sum(rt**2))
    rho = jnp.where(denom > 0, jnp.sum(rv * rt, axis=1) / jnp.where(denom > 0, denom, 1.0), 0.0)
    return frac, rho
