"""Rigid motion of a whole track sequence: the batched public entry point of the geometry.

``fit_rigid_sequence`` fits every frame of every sequence in one jitted call: ``vmap`` over
sequences, ``lax.scan`` over frames. By default every frame is fitted directly against frame 0
(the 3D points are only known there), warm-started from the previous frame's transform, so an
error at one frame does not propagate to the next. ``FitConfig(chain=True)`` reproduces AVDC's
frame-to-frame chaining instead: frame t is fitted against the points moved by the estimate of
frame t-1 and a point that is an outlier once is dropped for good, which is how AVDC loses
points frame after frame.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from flipjax import shapes
from flipjax.geometry import camera, rigid_fit, se3
from flipjax.geometry.rigid_fit import FitConfig
from flipjax.typing import Array, ArrayLike, PRNGKey


class SequenceFit(NamedTuple):
    """Result of :func:`fit_rigid_sequence`.

    Attributes:
      transforms: float[B T 4 4]. Object mode: X_t = T_t X_0 in camera coordinates. Camera
        mode: the pose of camera t in camera 0's frame (X_0 = T_t X_t). ``transforms[:, 0]``
        is the identity.
      inliers: bool[B T N], usable points within ``inlier_threshold`` pixels of the fit.
      rms: float[B T], inlier reprojection RMS in pixels (0 where there are no inliers).
      converged: bool[B T], the refinement converged and the frame is not degenerate.
      degenerate: bool[B T], too few usable points/inliers or collinear points; the frame then
        repeats the previous frame's transform.
      num_inliers: int32[B T].
    """

    transforms: Array
    inliers: Array
    rms: Array
    converged: Array
    degenerate: Array
    num_inliers: Array


def _fit_one(X: Array, tracks: Array, K: Array, visible: Array, key: PRNGKey,
             image_size: tuple[int, int] | None, cfg: FitConfig) -> SequenceFit:
    """One sequence: X [N 3], tracks [T N 2], K [3 3], visible [T N]."""
    usable = rigid_fit.usable_points(X[None], tracks, visible, image_size, cfg.min_depth)
    Xc = rigid_fit.sanitize_points(X, cfg.min_depth).T  # [3 N], see rigid_fit's layout note
    uv = jnp.swapaxes(rigid_fit.sanitize_pixels(tracks, usable), 1, 2)  # [T 2 N]
    eye = se3.identity(dtype=X.dtype)
    # Frame 0 is the identity by definition; its statistics measure how well tracks[:, 0]
    # agrees with the projected points.
    inl0, rms0, n0, degen0 = rigid_fit.evaluate(eye, Xc, uv[0], usable[0], K, cfg)
    frame0 = rigid_fit.FrameFit(eye, inl0, rms0, ~degen0, degen0, n0)

    def step(carry, inputs):
        T_prev, keep = carry
        uv_t, usable_t, key_t = inputs
        if cfg.chain:
            w = (usable_t & keep).astype(X.dtype)
            Xc_prev = rigid_fit.transform_points(T_prev, Xc)
            fit = rigid_fit.fit_frame(Xc_prev, uv_t, K, w, eye, key_t, cfg)
            T = se3.matmul(fit.transform, T_prev)
            keep = keep & fit.inliers
        else:
            init = T_prev if cfg.warm_start else eye
            fit = rigid_fit.fit_frame(Xc, uv_t, K, usable_t.astype(X.dtype), init, key_t, cfg)
            T = fit.transform
        return (T, keep), fit._replace(transform=T)

    keys = jax.random.split(key, tracks.shape[0])
    _, rest = jax.lax.scan(step, (eye, usable[0]), (uv[1:], usable[1:], keys[1:]))
    fits = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b], 0), frame0, rest)
    transforms = se3.inverse(fits.transform) if cfg.camera_motion else fits.transform
    return SequenceFit(transforms, fits.inliers, fits.rms, fits.converged, fits.degenerate,
                       fits.num_inliers)


@functools.partial(jax.jit, static_argnames=("image_size", "config"))
def _fit_batch(points3d, tracks, K, visible, keys, image_size, config):
    return jax.vmap(_fit_one, in_axes=(0, 0, 0, 0, 0, None, None))(
        points3d, tracks, K, visible, keys, image_size, config)


def fit_rigid_sequence(
    points3d: ArrayLike,
    tracks: ArrayLike,
    K: ArrayLike,
    *,
    visible: ArrayLike | None = None,
    key: PRNGKey | None = None,
    image_size: tuple[int, int] | None = None,
    config: FitConfig = FitConfig(),
) -> SequenceFit:
    """Fits the rigid motion of tracked points over a sequence, for a batch of sequences.

    Args:
      points3d: float[B N 3] camera-frame points at frame 0 (e.g. ``camera.unproject`` of
        ``tracks[:, 0]`` with first-frame depth). Non-finite or z <= min_depth marks a point
        without depth: it is ignored.
      tracks: float[B T N 2] pixels (u, v); ``tracks[:, 0]`` is where ``points3d`` project.
      K: float[3 3] or float[B 3 3] intrinsics.
      visible: bool[B T N] tracker visibility; invisible observations are ignored.
      key: PRNG key for the random hypotheses; default ``PRNGKey(0)``. Same key, same result.
      image_size: (H, W); observations outside the image are ignored when given.
      config: :class:`FitConfig` (static: each distinct config compiles once).

    Returns:
      :class:`SequenceFit`. Frames that are degenerate (fewer than ``config.min_inliers``
      usable points, all depths invalid, collinear points) are flagged and hold the previous
      frame's transform; no field is ever NaN.

    Raises:
      ValueError: on wrong shapes or dtypes, naming the received shapes.
    """
    points3d, tracks, K = (jnp.asarray(shapes.as_array(a, n)) for a, n in
                           ((points3d, "points3d"), (tracks, "tracks"), (K, "K")))
    dims = shapes.check(points3d, "points3d", "B N 3", dtype="float")
    try:
        dims = shapes.check(tracks, "tracks", "B T N 2", dims, dtype="float")
    except ValueError as e:
        raise ValueError(f"{e} (points3d has shape {list(points3d.shape)})") from None
    if dims["T"] < 1:
        raise ValueError(f"tracks: need at least one frame, got shape {list(tracks.shape)}")
    if K.ndim == 2:
        shapes.check(K, "K", "3 3", dtype="float")
        K = jnp.broadcast_to(K, (dims["B"], 3, 3))
    else:
        try:
            shapes.check(K, "K", "B 3 3", dims, dtype="float")
        except ValueError as e:
            raise ValueError(f"{e}; K must be [3 3] or [B 3 3]") from None
    if visible is None:
        visible = jnp.ones(tracks.shape[:3], bool)
    else:
        visible = jnp.asarray(shapes.as_array(visible, "visible"))
        shapes.check(visible, "visible", "B T N", dims, dtype="bool")
    if not isinstance(config, FitConfig):
        raise ValueError(f"config: expected a FitConfig, got {type(config).__name__}")
    if image_size is not None:
        image_size = camera.check_image_size(image_size)
    key = jax.random.PRNGKey(0) if key is None else key
    if not (hasattr(key, "shape") and (key.shape == (2,) or (key.shape == () and
            jnp.issubdtype(key.dtype, jax.dtypes.prng_key)))):
        raise ValueError(f"key: expected a single PRNG key, got {getattr(key, 'shape', key)}")
    dtype = jnp.result_type(points3d.dtype, tracks.dtype, jnp.float32)
    keys = jax.random.split(key, dims["B"])
    return _fit_batch(points3d.astype(dtype), tracks.astype(dtype), K.astype(dtype), visible,
                      keys, image_size, config)
