"""Back to the first frame: the inverse of a rigid warp through a depth map, and pixel supports
(one problem; ``jax.vmap`` for batches).

Used by :mod:`flipjax.planning.actions` to find which of a later frame's queries lie on the
object seen at frame 0, and where.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flipjax.geometry import camera, se3
from flipjax.typing import Array

# Newton steps of the inverse warp, its finite-difference step and step cap (pixels), and the
# reprojection error (pixels) under which it has converged.
_NEWTON_ITERATIONS = 8
_NEWTON_EPS = 0.25
_NEWTON_MAX_STEP = 4.0
_NEWTON_TOLERANCE = 0.05


def warp_to_frame0(queries: Array, T: Array, depth: Array, K: Array, guess: Array
                    ) -> tuple[Array, Array, Array]:
    """Finds where the object's surface seen at queries [N 2] now was at frame 0.

    Solves ``project(T unproject(u, depth(u))) = q`` for the frame-0 pixel u by Newton's
    method (finite-difference Jacobian of the bilinear depth), starting from ``q - guess``
    ([2], the object's mean image motion so far). One problem: T [4 4], depth [Hi Wi],
    K [3 3]. Returns (u float[N 2], X float[N 3] the surface point now, in the camera
    frame, ok bool[N]: converged onto a pixel with depth).
    """
    hi, wi = depth.shape

    def moved(u):
        z, z_ok = camera.depth_lookup(depth, u)
        X = se3.apply(T, camera.unproject(u, z, K))
        px, front = camera.project(X, K)
        return px, X, z_ok & front

    def step(u, _):
        px, _, ok = moved(u)
        du = (moved(u + jnp.array([_NEWTON_EPS, 0.0]))[0] - px) / _NEWTON_EPS
        dv = (moved(u + jnp.array([0.0, _NEWTON_EPS]))[0] - px) / _NEWTON_EPS
        r = queries - px
        det = du[:, 0] * dv[:, 1] - dv[:, 0] * du[:, 1]
        safe = jnp.where(jnp.abs(det) > 1e-6, det, 1.0)
        delta = jnp.stack([dv[:, 1] * r[:, 0] - dv[:, 0] * r[:, 1],
                           du[:, 0] * r[:, 1] - du[:, 1] * r[:, 0]], -1) / safe[:, None]
        norm = jnp.linalg.norm(delta, axis=-1, keepdims=True)
        delta = delta * jnp.minimum(1.0, _NEWTON_MAX_STEP / jnp.maximum(norm, 1e-12))
        good = ok & (jnp.abs(det) > 1e-6) & jnp.all(jnp.isfinite(delta), -1)
        u = u + jnp.where(good[:, None], delta, 0.0)
        return jnp.clip(u, -0.5, jnp.array([wi - 0.5, hi - 0.5])), None

    u, _ = jax.lax.scan(step, queries - guess, None, length=_NEWTON_ITERATIONS)
    px, X, ok = moved(u)
    ok = ok & (jnp.linalg.norm(px - queries, axis=-1) < _NEWTON_TOLERANCE)
    return u, jnp.where(ok[:, None], X, 0.0), ok


def nearest_pixel(pixels: Array, image_size: tuple[int, int]) -> tuple[Array, Array]:
    """(row, column) int32[N] of the pixels [N 2] (u, v), clipped to the image."""
    u = jnp.clip(jnp.round(pixels[:, 0]), 0, image_size[1] - 1).astype(jnp.int32)
    return jnp.clip(jnp.round(pixels[:, 1]), 0, image_size[0] - 1).astype(jnp.int32), u


def points_support(points: Array, valid: Array, image_size: tuple[int, int]) -> Array:
    """bool[Hi Wi]: pixels of points [M 2], closed (3 x 3) so one-pixel gaps are filled."""
    v, u = nearest_pixel(points, image_size)
    raster = jnp.zeros(image_size, jnp.float32).at[v, u].max(valid.astype(jnp.float32))
    window = dict(window_dimensions=(3, 3), window_strides=(1, 1), padding="SAME")
    grown = jax.lax.reduce_window(raster, 0.0, jax.lax.max, **window)
    # Erode with the border counted as inside, so only the dilation's rim goes.
    closed = jax.lax.reduce_window(grown, 1.0, jax.lax.min, **window)
    return closed > 0.5


__all__ = ["nearest_pixel", "points_support", "warp_to_frame0"]
