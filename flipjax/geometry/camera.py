"""Pinhole camera: projection, unprojection with depth, bilinear depth lookup, image masks.

Conventions (docs/DESIGN.md): pixels (u, v) = (column, row) with pixel centres at integers, so the
image spans u in [-0.5, W - 0.5]; camera frame x right, y down, z forward, metres.

Intrinsics ``K`` are float[3 3] or, per batch element, float[B 3 3]; a batched K pairs with
the leading axis of the points and broadcasts over the remaining axes.
"""

from __future__ import annotations

import jax.numpy as jnp

from flipjax import shapes
from flipjax.typing import Array, ArrayLike

MIN_DEPTH = 1e-6  # metres; points closer than this are treated as not in front of the camera


def _broadcast_K(K: ArrayLike, target_ndim: int, name: str = "K") -> Array:
    """Returns K reshaped to broadcast against an array with ``target_ndim`` leading axes."""
    K = jnp.asarray(K)
    shapes.check(K, name, "... 3 3", dtype="float")
    if K.ndim == 2:
        return K
    if K.ndim != 3:
        raise ValueError(f"{name}: expected shape [3 3] or [B 3 3], got {list(K.shape)}")
    if target_ndim < 1:
        raise ValueError(f"{name}: a batched K [B 3 3] needs points with a leading B axis")
    return K.reshape(K.shape[0], *([1] * (target_ndim - 1)), 3, 3)


def _check_batched_K(K: Array, lead: tuple[int, ...], name: str = "K") -> None:
    if K.ndim == 3 and (not lead or lead[0] != K.shape[0]):
        raise ValueError(
            f"{name}: batched K {list(K.shape)} needs the points' first axis to be "
            f"B={K.shape[0]}, got leading axes {list(lead)}"
        )


def intrinsics_from_fov(fov_deg: float, height: int, width: int) -> Array:
    """Intrinsics of a square-pixel pinhole camera with horizontal field of view ``fov_deg``.

    Args:
      fov_deg: horizontal field of view in degrees, in (0, 180).
      height: image height in pixels.
      width: image width in pixels.

    Returns:
      float[3 3] K with the principal point at the image centre ((W-1)/2, (H-1)/2).
    """
    if not 0.0 < fov_deg < 180.0:
        raise ValueError(f"fov_deg must be in (0, 180), got {fov_deg}")
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height} width={width}")
    f = (width / 2.0) / jnp.tan(jnp.radians(fov_deg) / 2.0)
    return jnp.array(
        [[f, 0.0, (width - 1) / 2.0], [0.0, f, (height - 1) / 2.0], [0.0, 0.0, 1.0]], jnp.float32
    )


def project(points: ArrayLike, K: ArrayLike) -> tuple[Array, Array]:
    """Projects camera-frame points to pixels.

    Args:
      points: float[... 3] camera-frame points (metres).
      K: float[3 3] or float[B 3 3] (B = first axis of ``points``).

    Returns:
      (pixels float[... 2], in_front bool[...]). Points with z <= MIN_DEPTH have
      ``in_front`` False and finite (meaningless) pixels.
    """
    points = jnp.asarray(points)
    shapes.check(points, "points", "... 3", dtype="float")
    Kb = _broadcast_K(K, points.ndim - 1)
    _check_batched_K(jnp.asarray(K), points.shape[:-1])
    z = points[..., 2]
    in_front = z > MIN_DEPTH
    z_safe = jnp.where(in_front, z, 1.0)
    n = points[..., :2] / z_safe[..., None]
    uv = jnp.einsum("...ij,...j->...i", Kb[..., :2, :2], n) + Kb[..., :2, 2]
    return uv, in_front


def unproject(pixels: ArrayLike, depth: ArrayLike, K: ArrayLike) -> Array:
    """Lifts pixels with depth (z, metres) to camera-frame points.

    Args:
      pixels: float[... 2] (u, v).
      depth: float[...] z-depth per pixel.
      K: float[3 3] or float[B 3 3] (B = first axis of ``pixels``).

    Returns:
      float[... 3] points with ``points[..., 2] == depth``.
    """
    pixels, depth = jnp.asarray(pixels), jnp.asarray(depth)
    shapes.check(pixels, "pixels", "... 2", dtype="float")
    if depth.shape != pixels.shape[:-1]:
        raise ValueError(
            f"depth: expected shape {list(pixels.shape[:-1])} to match pixels "
            f"{list(pixels.shape)}, got {list(depth.shape)}"
        )
    Kb = _broadcast_K(K, pixels.ndim - 1)
    _check_batched_K(jnp.asarray(K), pixels.shape[:-1])
    A = Kb[..., :2, :2]
    # Solve the 2x2 upper-triangular system A n = uv - c directly (general skew allowed).
    r = pixels - Kb[..., :2, 2]
    ny = r[..., 1] / A[..., 1, 1]
    nx = (r[..., 0] - A[..., 0, 1] * ny) / A[..., 0, 0]
    return jnp.stack([nx * depth, ny * depth, depth], -1)


def in_image(pixels: ArrayLike, image_size: tuple[int, int], margin: float = 0.0) -> Array:
    """Whether pixels lie inside the image, ``margin`` pixels in from its border.

    Args:
      pixels: float[... 2] (u, v).
      image_size: (H, W).
      margin: pixels to shrink the valid area by on every side (may be negative).

    Returns:
      bool[...]; False for non-finite pixels.
    """
    pixels = jnp.asarray(pixels)
    shapes.check(pixels, "pixels", "... 2", dtype="float")
    h, w = check_image_size(image_size)
    u, v = pixels[..., 0], pixels[..., 1]
    lo = -0.5 + margin
    return (u >= lo) & (v >= lo) & (u <= w - 0.5 - margin) & (v <= h - 0.5 - margin)


def check_image_size(image_size) -> tuple[int, int]:
    """Returns ``image_size`` as a pair of positive ints (H, W); ValueError otherwise."""
    try:
        h, w = (int(s) for s in image_size)
    except (TypeError, ValueError) as e:
        raise ValueError(f"image_size: expected (H, W), got {image_size!r}") from e
    if h <= 0 or w <= 0:
        raise ValueError(f"image_size: expected positive (H, W), got {image_size!r}")
    return h, w


def bilinear_sample(image: ArrayLike, pixels: ArrayLike) -> tuple[Array, Array]:
    """Samples an image at sub-pixel locations with bilinear interpolation.

    Args:
      image: float[H W] or float[H W C].
      pixels: float[... 2] (u, v), pixel centres at integers.

    Returns:
      (values float[...] or float[... C], inside bool[...]); ``inside`` is False where the
      2x2 neighbourhood leaves the image (values there are clamped, not extrapolated).
    """
    image, pixels = jnp.asarray(image), jnp.asarray(pixels)
    if image.ndim not in (2, 3):
        raise ValueError(f"image: expected shape [H W] or [H W C], got {list(image.shape)}")
    shapes.check(pixels, "pixels", "... 2", dtype="float")
    h, w = image.shape[:2]
    u, v = pixels[..., 0], pixels[..., 1]
    inside = (u >= 0) & (v >= 0) & (u <= w - 1) & (v <= h - 1)
    u = jnp.clip(jnp.nan_to_num(u), 0.0, w - 1.0)
    v = jnp.clip(jnp.nan_to_num(v), 0.0, h - 1.0)
    u0 = jnp.clip(jnp.floor(u), 0, max(w - 2, 0)).astype(jnp.int32)
    v0 = jnp.clip(jnp.floor(v), 0, max(h - 2, 0)).astype(jnp.int32)
    u1, v1 = jnp.minimum(u0 + 1, w - 1), jnp.minimum(v0 + 1, h - 1)
    fu, fv = u - u0, v - v0
    if image.ndim == 3:
        fu, fv = fu[..., None], fv[..., None]
    top = image[v0, u0] * (1 - fu) + image[v0, u1] * fu
    bottom = image[v1, u0] * (1 - fu) + image[v1, u1] * fu
    return top * (1 - fv) + bottom * fv, inside


def depth_lookup(depth: ArrayLike, pixels: ArrayLike, min_depth: float = MIN_DEPTH
                 ) -> tuple[Array, Array]:
    """Bilinear depth at sub-pixel locations, refusing to blend across missing depth.

    Args:
      depth: float[H W] z-depth in metres; zero, negative or non-finite means missing.
      pixels: float[... 2] (u, v).
      min_depth: depths at or below this are missing.

    Returns:
      (z float[...], valid bool[...]); ``valid`` is False outside the image or where any of the
      four neighbours is missing, and ``z`` is 0 there.
    """
    depth = jnp.asarray(depth)
    shapes.check(depth, "depth", "H W", dtype="float")
    ok = jnp.isfinite(depth) & (depth > min_depth)
    z, inside = bilinear_sample(jnp.where(ok, depth, 0.0), pixels)
    # All four neighbours valid <=> the bilinear weight of the validity mask is 1.
    ok_frac, _ = bilinear_sample(ok.astype(depth.dtype), pixels)
    valid = inside & (ok_frac > 1.0 - 1e-6)
    return jnp.where(valid, z, 0.0), valid
