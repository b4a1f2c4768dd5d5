"""Robust losses on squared residual norms, for iteratively reweighted least squares.

Each loss is given as ``rho(s)`` on the squared norm ``s = |r|^2`` of a residual vector, scaled
so that ``rho(s) ~ s / 2`` near zero, and its IRLS weight ``w(s) = 2 rho'(s)`` (1 for inliers
near zero). Minimising ``sum rho(s_i)`` by Gauss-Newton with weights ``w(s_i)`` is IRLS.
"""

from __future__ import annotations

import jax.numpy as jnp

from flipjax.typing import Array, ArrayLike

LOSSES = ("l2", "huber", "cauchy")


def _check(loss: str, scale: float) -> None:
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
    if not scale > 0:
        raise ValueError(f"loss scale must be positive, got {scale}")


def cost(sq_residual: ArrayLike, loss: str, scale: float) -> Array:
    """Robust cost ``rho(s)``.

    Args:
      sq_residual: float[...] squared residual norms s (pixels^2).
      loss: "l2", "huber" (quadratic up to ``scale``, then linear) or "cauchy"
        (``scale^2/2 log(1 + s/scale^2)``, redescending influence).
      scale: transition residual norm c (pixels).

    Returns:
      float[...] costs.
    """
    _check(loss, scale)
    s = jnp.asarray(sq_residual)
    c2 = scale * scale
    if loss == "l2":
        return 0.5 * s
    if loss == "huber":
        norm = jnp.sqrt(jnp.maximum(s, 0.0))
        return jnp.where(norm <= scale, 0.5 * s, scale * (norm - 0.5 * scale))
    return 0.5 * c2 * jnp.log1p(s / c2)


def weight(sq_residual: ArrayLike, loss: str, scale: float) -> Array:
    """IRLS weight ``2 rho'(s)`` for the loss of :func:`cost` (same arguments)."""
    _check(loss, scale)
    s = jnp.asarray(sq_residual)
    if loss == "l2":
        return jnp.ones_like(s)
    if loss == "huber":
        norm = jnp.sqrt(jnp.maximum(s, 0.0))
        return jnp.where(norm <= scale, 1.0, scale / jnp.maximum(norm, scale))
    return 1.0 / (1.0 + s / (scale * scale))
