"""SE(3) and SO(3) on 4x4 / 3x3 matrices: exp/log, compose, inverse, apply, error metrics.

Transforms are 4x4 matrices acting on column vectors (``X' = R X + t``). Tangent vectors
(twists) are ordered ``(rho, phi)``: translation part first, rotation part (axis-angle, radians)
second, so that ``exp(twist)`` for a pure translation ``(t, 0)`` is a translation by ``t``.

All functions broadcast over leading axes and are safe at the identity and at rotations of pi:
no NaN in values for valid input, and ``exp`` has finite gradients at the identity.
"""

from __future__ import annotations

import jax.numpy as jnp

from flipjax import shapes
from flipjax.typing import Array, ArrayLike

_SMALL = 1e-4  # angle (rad) below which Taylor series replace the closed forms


def matmul(a: ArrayLike, b: ArrayLike) -> Array:
    """Product of small matrices with broadcasting, ``a @ b`` for float[... n k] x float[... k m].

    Written as a broadcast multiply and sum: XLA fuses it, while ``@`` on large batches of 3x3
    or 4x4 matrices lowers to a batched matmul that is ~10x slower on CPU.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"matmul: cannot multiply shapes {list(a.shape)} and {list(b.shape)}")
    return jnp.sum(a[..., :, :, None] * b[..., None, :, :], axis=-2)


def _matvec(a: Array, v: Array) -> Array:
    return jnp.sum(a * v[..., None, :], axis=-1)


def hat(phi: ArrayLike) -> Array:
    """Skew-symmetric matrix of a 3-vector.

    Args:
      phi: float[... 3].

    Returns:
      float[... 3 3] with ``hat(a) @ b == cross(a, b)``.
    """
    phi = jnp.asarray(phi)
    shapes.check(phi, "phi", "... 3")
    x, y, z = phi[..., 0], phi[..., 1], phi[..., 2]
    o = jnp.zeros_like(x)
    return jnp.stack(
        [jnp.stack([o, -z, y], -1), jnp.stack([z, o, -x], -1), jnp.stack([-y, x, o], -1)], -2
    )


def _theta_terms(phi: Array) -> tuple[Array, Array, Array]:
    """Returns A=sin(θ)/θ, B=(1-cos θ)/θ², C=(θ-sin θ)/θ³ for θ=|phi|, NaN-safe at 0."""
    theta2 = jnp.sum(phi * phi, axis=-1)
    small = theta2 < _SMALL**2
    theta2_safe = jnp.where(small, 1.0, theta2)
    theta = jnp.sqrt(theta2_safe)
    a = jnp.where(small, 1.0 - theta2 / 6.0, jnp.sin(theta) / theta)
    b = jnp.where(small, 0.5 - theta2 / 24.0, (1.0 - jnp.cos(theta)) / theta2_safe)
    c = jnp.where(small, 1.0 / 6.0 - theta2 / 120.0,
                  (theta - jnp.sin(theta)) / (theta2_safe * theta))
    return a, b, c


def so3_exp(phi: ArrayLike) -> Array:
    """Rotation matrix of an axis-angle vector (Rodrigues).

    Args:
      phi: float[... 3], axis times angle in radians.

    Returns:
      float[... 3 3] rotation matrix.
    """
    phi = jnp.asarray(phi)
    shapes.check(phi, "phi", "... 3", dtype="float")
    a, b, _ = _theta_terms(phi)
    k = hat(phi)
    eye = jnp.eye(3, dtype=phi.dtype)
    return eye + a[..., None, None] * k + b[..., None, None] * matmul(k, k)


def so3_log(R: ArrayLike) -> Array:
    """Axis-angle vector of a rotation matrix, accurate near 0 and near pi.

    Args:
      R: float[... 3 3] rotation matrix.

    Returns:
      float[... 3] axis times angle, angle in [0, pi].
    """
    R = jnp.asarray(R)
    shapes.check(R, "R", "... 3 3", dtype="float")
    cos = jnp.clip((jnp.trace(R, axis1=-2, axis2=-1) - 1.0) / 2.0, -1.0, 1.0)
    # sin from the antisymmetric part is better conditioned than sqrt(1 - cos^2) near 0.
    w = jnp.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0],
                   R[..., 1, 0] - R[..., 0, 1]], -1)
    sin = 0.5 * jnp.sqrt(jnp.sum(w * w, axis=-1) + 1e-30)
    theta = jnp.arctan2(sin, cos)
    # Regular branch: phi = theta / (2 sin theta) * w, Taylor near theta = 0.
    small = theta < 1e-3
    sin_safe = jnp.where(small, 1.0, sin)
    scale = jnp.where(small, 0.5 + theta**2 / 12.0, theta / (2.0 * sin_safe))
    phi_regular = scale[..., None] * w
    # Near pi w vanishes; recover the axis from the symmetric part R + I = 2 a a^T (approx).
    sym = 0.5 * (R + jnp.swapaxes(R, -1, -2)) - cos[..., None, None] * jnp.eye(3, dtype=R.dtype)
    col = jnp.argmax(jnp.diagonal(sym, axis1=-2, axis2=-1), axis=-1)
    axis = jnp.take_along_axis(sym, col[..., None, None].repeat(3, -1), axis=-2)[..., 0, :]
    axis = axis / jnp.maximum(jnp.linalg.norm(axis, axis=-1, keepdims=True), 1e-12)
    # The symmetric part fixes the axis up to sign; w (small but non-zero) picks the sign.
    sign = jnp.where(jnp.sum(axis * w, axis=-1) < 0, -1.0, 1.0)
    phi_pi = (sign * theta)[..., None] * axis
    near_pi = theta > jnp.pi - 1e-2
    return jnp.where(near_pi[..., None], phi_pi, phi_regular)


def make(R: ArrayLike, t: ArrayLike) -> Array:
    """Builds 4x4 transforms from rotations and translations.

    Args:
      R: float[... 3 3].
      t: float[... 3].

    Returns:
      float[... 4 4] with last row (0, 0, 0, 1).
    """
    R, t = jnp.asarray(R), jnp.asarray(t)
    shapes.check(R, "R", "... 3 3", dtype="float")
    shapes.check(t, "t", "... 3", dtype="float")
    batch = jnp.broadcast_shapes(R.shape[:-2], t.shape[:-1])
    top = jnp.concatenate(
        [jnp.broadcast_to(R, (*batch, 3, 3)), jnp.broadcast_to(t, (*batch, 3))[..., None]], -1
    )
    bottom = jnp.broadcast_to(jnp.array([0.0, 0.0, 0.0, 1.0], top.dtype), (*batch, 1, 4))
    return jnp.concatenate([top, bottom], -2)


def identity(batch_shape: tuple[int, ...] = (), dtype=jnp.float32) -> Array:
    """Identity transforms of shape ``[*batch_shape 4 4]``."""
    return jnp.broadcast_to(jnp.eye(4, dtype=dtype), (*batch_shape, 4, 4))


def exp(twist: ArrayLike) -> Array:
    """SE(3) exponential.

    Args:
      twist: float[... 6] as (rho, phi): translation part then axis-angle rotation part.

    Returns:
      float[... 4 4] transform.
    """
    twist = jnp.asarray(twist)
    shapes.check(twist, "twist", "... 6", dtype="float")
    rho, phi = twist[..., :3], twist[..., 3:]
    a, b, c = _theta_terms(phi)
    k = hat(phi)
    kk = matmul(k, k)
    eye = jnp.eye(3, dtype=twist.dtype)
    R = eye + a[..., None, None] * k + b[..., None, None] * kk
    V = eye + b[..., None, None] * k + c[..., None, None] * kk
    return make(R, _matvec(V, rho))


def log(T: ArrayLike) -> Array:
    """SE(3) logarithm, the inverse of :func:`exp`.

    Args:
      T: float[... 4 4] transform.

    Returns:
      float[... 6] twist (rho, phi).
    """
    T = jnp.asarray(T)
    shapes.check(T, "T", "... 4 4", dtype="float")
    phi = so3_log(T[..., :3, :3])
    theta2 = jnp.sum(phi * phi, axis=-1)
    small = theta2 < _SMALL**2
    theta2_safe = jnp.where(small, 1.0, theta2)
    theta = jnp.sqrt(theta2_safe)
    # V^-1 = I - K/2 + d K^2 with d = (1 - theta sin / (2 (1 - cos))) / theta^2.
    half = theta / 2.0
    d = jnp.where(
        small,
        1.0 / 12.0 + theta2 / 720.0,
        (1.0 - half * jnp.cos(half) / jnp.maximum(jnp.sin(half), 1e-12)) / theta2_safe,
    )
    k = hat(phi)
    v_inv = jnp.eye(3, dtype=T.dtype) - 0.5 * k + d[..., None, None] * matmul(k, k)
    rho = _matvec(v_inv, T[..., :3, 3])
    return jnp.concatenate([rho, phi], -1)


def compose(a: ArrayLike, b: ArrayLike) -> Array:
    """Returns ``a @ b``: apply ``b`` first, then ``a``. Shapes float[... 4 4], broadcast."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    shapes.check(a, "a", "... 4 4", dtype="float")
    shapes.check(b, "b", "... 4 4", dtype="float")
    return matmul(a, b)


def inverse(T: ArrayLike) -> Array:
    """Exact rigid inverse ``[R^T, -R^T t]`` of float[... 4 4] transforms."""
    T = jnp.asarray(T)
    shapes.check(T, "T", "... 4 4", dtype="float")
    Rt = jnp.swapaxes(T[..., :3, :3], -1, -2)
    return make(Rt, -_matvec(Rt, T[..., :3, 3]))


def apply(T: ArrayLike, points: ArrayLike) -> Array:
    """Applies transforms to points.

    Args:
      T: float[... 4 4]; its leading axes broadcast against those of ``points`` minus ``N``.
      points: float[... N 3].

    Returns:
      float[... N 3], ``R X + t`` for each point.
    """
    T, points = jnp.asarray(T), jnp.asarray(points)
    shapes.check(T, "T", "... 4 4", dtype="float")
    shapes.check(points, "points", "... N 3", dtype="float")
    R, t = T[..., None, :3, :3], T[..., None, :3, 3]
    return _matvec(R, points) + t


def rotation_error_deg(a: ArrayLike, b: ArrayLike) -> Array:
    """Geodesic angle between the rotations of two transforms (or rotations), in degrees.

    Args:
      a: float[... 4 4] or float[... 3 3].
      b: same layout as ``a``, broadcast.

    Returns:
      float[...] angle of ``R_a^T R_b`` in degrees, in [0, 180].
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    for name, x in (("a", a), ("b", b)):
        if x.ndim < 2 or x.shape[-2:] not in ((3, 3), (4, 4)):
            raise ValueError(f"{name}: expected shape [... 4 4] or [... 3 3], got {list(x.shape)}")
    Ra, Rb = a[..., :3, :3], b[..., :3, :3]
    rel = matmul(jnp.swapaxes(Ra, -1, -2), Rb)
    return jnp.degrees(jnp.linalg.norm(so3_log(rel), axis=-1))


def translation_error(a: ArrayLike, b: ArrayLike) -> Array:
    """Euclidean distance between the translations of float[... 4 4] transforms (metres)."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    shapes.check(a, "a", "... 4 4", dtype="float")
    shapes.check(b, "b", "... 4 4", dtype="float")
    return jnp.linalg.norm(a[..., :3, 3] - b[..., :3, 3], axis=-1)
