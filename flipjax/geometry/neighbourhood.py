"""Scattered point samples and their k nearest neighbours: robust local affine consistency of
track displacements and inverse-distance interpolation (one problem; ``jax.vmap`` for batches).

Used by :mod:`flipjax.planning.actions` to drop tracks that disagree with their neighbours and
to carry depth from one planning chunk to the next.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from flipjax.typing import Array

# IRLS of the neighbourhood consensus: Cauchy scale (pixels) and iterations.
_CONSENSUS_SCALE = 1.0
_CONSENSUS_ITERATIONS = 4


class Neighbours(NamedTuple):
    idx: Array  # int[M k] indices of the nearest valid samples
    rel: Array  # float[M k 2] their offsets from the target, in units of the neighbourhood
    w: Array    # float[M k] inverse-distance weights (0 for missing neighbours)
    ok: Array   # bool[M k] the neighbour exists


def neighbours(positions: Array, valid: Array, targets: Array, k: int) -> Neighbours:
    """The k nearest valid samples (positions [N 2], valid [N]) of each target [M 2]."""
    valid = valid & jnp.all(jnp.isfinite(positions), -1)
    positions = jnp.where(valid[:, None], positions, 0.0)
    d2 = jnp.sum((targets[:, None] - positions[None]) ** 2, -1)
    neg, idx = jax.lax.top_k(jnp.where(valid[None], -d2, -jnp.inf), k)
    ok = jnp.isfinite(neg)
    d2k = jnp.where(ok, -neg, 0.0)
    # Offsets and distances in units of the neighbourhood's size keep the normal equations
    # scale-free; the 1e-6 floor makes a target on a sample return (almost) that sample.
    scale2 = jnp.sum(d2k, -1, keepdims=True) / jnp.maximum(jnp.sum(ok, -1, keepdims=True), 1)
    scale2 = scale2 + 1e-12
    rel = jnp.where(ok[..., None], positions[idx] - targets[:, None], 0.0)
    rel = rel / jnp.sqrt(scale2)[..., None]
    w = jnp.where(ok, 1.0 / (d2k / scale2 + 1e-6), 0.0)
    return Neighbours(idx, rel, w, ok)


def affine_solve(w: Array, rel: Array, v: Array) -> Array:
    """Weighted least squares coef [M 3 C] of v [M k C] ~ [1 rel] coef, weights w [M k]."""
    A = jnp.concatenate([jnp.ones_like(rel[..., :1]), rel], -1)
    G = jnp.einsum("mk,mki,mkj->mij", w, A, A)
    # A small ridge on the slope keeps collinear or single neighbours solvable: along a
    # direction the neighbours do not span the slope goes to zero (a weighted mean there).
    ridge = 1e-4 * jnp.sum(w, -1)[:, None, None] * jnp.diag(jnp.array([0.0, 1.0, 1.0]))
    b = jnp.einsum("mk,mki,mkc->mic", w, A, v)
    return jnp.linalg.solve(G + ridge + 1e-30 * jnp.eye(3), b)


def interpolate_idw(positions: Array, values: Array, valid: Array, targets: Array, k: int
                     ) -> tuple[Array, Array]:
    """Inverse-distance blend of values [N C] at targets [M 2]: a convex combination, so it
    never extrapolates. Returns (values float[M C], ok bool[M]: some valid neighbour)."""
    valid = valid & jnp.all(jnp.isfinite(values), -1)
    nb = neighbours(positions, valid, targets, k)
    v = jnp.where(nb.ok[..., None], values[nb.idx], 0.0)
    out = jnp.sum(nb.w[..., None] * v, 1) / jnp.maximum(jnp.sum(nb.w, -1, keepdims=True), 1e-30)
    return out, jnp.any(nb.ok, -1)


def consistent(positions: Array, tracks: Array, valid: Array, k: int, threshold: float
                ) -> Array:
    """bool[N]: valid queries whose displacement agrees with their neighbours'.

    Each query's displacement over the chunk (tracks [L N 2] minus step 0, all steps at once)
    is predicted by a robust (Cauchy IRLS) affine fit of its k nearest other valid queries with
    equal weights, and the query is kept when it misses the prediction by less than
    ``threshold`` pixels. A smooth motion field is affine to well below that over a
    neighbourhood; a wrong track, or a query across a motion boundary, is not. Queries with
    fewer than 5 neighbours cannot be judged (a bad one among them would condemn the query)
    and are kept for the robust fit.
    """
    n = positions.shape[0]
    disp = jnp.swapaxes(tracks - tracks[:1], 0, 1).reshape(n, -1)
    valid = valid & jnp.all(jnp.isfinite(disp), -1)
    nb = neighbours(positions, valid, positions, min(k + 1, n))
    others = nb.ok & (nb.idx != jnp.arange(n)[:, None])
    v = jnp.where(others[..., None], disp[nb.idx], 0.0)
    r = others.astype(disp.dtype)
    for _ in range(_CONSENSUS_ITERATIONS):
        coef = affine_solve(r, nb.rel, v)
        pred = coef[:, :1] + jnp.einsum("mkj,mjc->mkc", nb.rel, coef[:, 1:])
        err = jnp.linalg.norm(v - pred, axis=-1)
        r = others / (1.0 + (err / _CONSENSUS_SCALE) ** 2)
    # The prediction at the query itself (offset 0) is the affine fit's constant term.
    miss = jnp.linalg.norm(jnp.where(valid[:, None], disp, 0.0) - coef[:, 0], axis=-1)
    judged = jnp.sum(others, -1) >= 5
    return valid & (~judged | (miss < threshold))


__all__ = ["Neighbours", "affine_solve", "consistent", "interpolate_idw", "neighbours"]
