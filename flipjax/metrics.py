"""Flow-prediction metrics of FLIP: average distance error (ADE) and the less-than-delta ratio.

Both compare predicted and ground-truth trajectories float[B N L 2] (pixels) on steps
1..L-1 (step 0 is the shared query point). The official evaluation keeps only the steps where
the ground truth moves more than 1 px (:func:`moving_steps`); pass that as ``valid``.

Image metrics (:func:`psnr`, :func:`ssim`) compare frames [... H W C] per image, in uint8 or
in flipjax's float [-1, 1] convention.
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


def best_of_k(samples: Array, gt_flow: Array, valid: Array | None = None) -> Array:
    """Per clip, the sample closest to the truth: the measure of a generator whose data
    admits several motions per scene (one sample may rightly pick another mode).

    Args:
      samples: float[K B N L 2] K predictions per clip.
      gt_flow: float[B N L 2] ground truth.
      valid: optional bool[B N L-1] steps that count (e.g. :func:`moving_steps`).

    Returns:
      float[B N L 2]: for each clip the sample with the lowest mean distance over its valid
      steps (score it with :func:`ade` and the same ``valid``).
    """
    dims = shapes.check(samples, "samples", "K B N L 2", dtype="float")
    shapes.check(gt_flow, "gt_flow", "B N L 2", dims, dtype="float")
    d = jnp.linalg.norm(samples[:, :, :, 1:] - gt_flow[None, :, :, 1:], axis=-1)  # [K B N L-1]
    w = jnp.ones(d.shape[1:], d.dtype) if valid is None else valid.astype(d.dtype)
    per_clip = jnp.sum(d * w, axis=(2, 3)) / jnp.maximum(jnp.sum(w, axis=(1, 2)), 1.0)
    best = jnp.argmin(per_clip, axis=0)  # [B]
    return jnp.take_along_axis(samples, best[None, :, None, None, None], axis=0)[0]


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


# ------------------------------------------------------------------------------------------
# Images (frame codec, dynamics module)
# ------------------------------------------------------------------------------------------


def _image_pair(pred: Array, target: Array, max_value: float | None,
                min_size: int = 1) -> tuple[Array, Array, float]:
    """Checks two image stacks and returns them as float32 with the peak-to-peak range."""
    pred, target = shapes.as_array(pred, "pred"), shapes.as_array(target, "target")
    if pred.ndim < 3:
        raise ValueError(f"pred: expected images [... H W C], got shape {list(pred.shape)}")
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"pred and target shapes differ: {list(pred.shape)} vs "
                         f"{list(target.shape)}")
    if min(pred.shape[-3:-1]) < min_size:
        raise ValueError(f"images [... H W C] must be at least {min_size}x{min_size}, got "
                         f"shape {list(pred.shape)}")
    ints = [jnp.issubdtype(x.dtype, jnp.integer) for x in (pred, target)]
    if ints[0] != ints[1] and max_value is None:
        # uint8 against [-1, 1] floats would compare different scales without an error.
        raise ValueError(f"pred ({pred.dtype}) and target ({target.dtype}) mix integer and "
                         "float pixels; convert one or pass max_value")
    if max_value is None:
        max_value = 255.0 if ints[0] else 2.0
    if max_value <= 0:
        raise ValueError(f"max_value must be > 0, got {max_value}")
    return (jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32),
            float(max_value))


def psnr(pred: Array, target: Array, max_value: float | None = None) -> Array:
    """Peak signal-to-noise ratio per image, in dB.

    ``10 log10(max_value^2 / MSE)`` with the MSE over each image's H, W and C. Float
    predictions are not clipped here: clip them to the valid range first (as a rendered
    frame would be).

    Args:
      pred: [... H W C] images, uint8 (or any integer type) or float in [-1, 1].
      target: same shape as ``pred``.
      max_value: the peak-to-peak range of the pixel scale; None: 255 for integer images and
        2.0 for float images (flipjax's [-1, 1] convention; use 1.0 for [0, 1] images).

    Returns:
      float32[...] one PSNR per image (+inf where the images are identical); average over
      the leading axes yourself.
    """
    p, t, peak = _image_pair(pred, target, max_value)
    mse = jnp.mean(jnp.square(p - t), axis=(-3, -2, -1))
    return 10.0 * jnp.log10(peak**2 / mse)


def changed_psnr(pred: Array, target: Array, reference: Array,
                 max_value: float | None = None) -> Array:
    """PSNR (dB) over the pixels where ``target`` differs from ``reference``, pooled.

    The pixels that move are where a video model's prediction matters: a model that copies
    the current frame scores well on the static rest. The MSE pools every changed pixel's
    channels over all images, so clips with little motion weigh little.

    Args:
      pred: [... H W C] images, uint8 or float in [-1, 1].
      target: same shape, the true images.
      reference: same shape or broadcastable (e.g. the current frame repeated): a pixel
        counts where any channel of ``target`` differs from it.
      max_value: as in :func:`psnr`.

    Returns:
      float32[] one PSNR (+inf where no pixel changes or the changed pixels are exact).
    """
    p, t, peak = _image_pair(pred, target, max_value)
    target = jnp.asarray(target)
    changed = jnp.any(target != jnp.broadcast_to(jnp.asarray(reference), target.shape),
                      axis=-1, keepdims=True)
    sq = jnp.where(changed, jnp.square(p - t), 0.0)
    n = jnp.sum(changed) * p.shape[-1]
    return 10.0 * jnp.log10(peak**2 * n / jnp.sum(sq))


def _gaussian_filter_matrix(size: int, window: int, sigma: float) -> Array:
    """float32[size-window+1 size]: row i holds the normalised Gaussian at i..i+window-1,
    so a matrix product is a 'valid' 1-D Gaussian filter."""
    k = jnp.arange(window, dtype=jnp.float32) - (window - 1) / 2
    g = jnp.exp(-0.5 * jnp.square(k / sigma))
    g = g / jnp.sum(g)
    out = size - window + 1
    cols = jnp.arange(size)[None, :] - jnp.arange(out)[:, None]
    return jnp.where((cols >= 0) & (cols < window), g[jnp.clip(cols, 0, window - 1)], 0.0)


def ssim(pred: Array, target: Array, max_value: float | None = None, *, window: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> Array:
    """Structural similarity (Wang et al. 2004) per image, averaged over channels.

    Local statistics come from a ``window`` x ``window`` Gaussian (std ``sigma``) over the
    positions where the window fits entirely (no padding), with population (co)variances:
    the definition ``tf.image.ssim`` uses.

    Args:
      pred: [... H W C] images, uint8 (or any integer type) or float in [-1, 1]; H, W >=
        ``window``.
      target: same shape as ``pred``.
      max_value: the peak-to-peak range (as in :func:`psnr`).
      window: Gaussian window side in pixels.
      sigma: Gaussian standard deviation in pixels.
      k1, k2: the stabilising constants, C1 = (k1 max_value)^2, C2 = (k2 max_value)^2.

    Returns:
      float32[...] mean SSIM per image, at most 1 (1 for identical images).
    """
    p, t, peak = _image_pair(pred, target, max_value, min_size=window)
    gh = _gaussian_filter_matrix(p.shape[-3], window, sigma)
    gw = _gaussian_filter_matrix(p.shape[-2], window, sigma)

    def blur(x: Array) -> Array:
        return jnp.einsum("ih,jw,...hwc->...ijc", gh, gw, x)

    c1, c2 = (k1 * peak) ** 2, (k2 * peak) ** 2
    mu_p, mu_t = blur(p), blur(t)
    var_p = blur(p * p) - mu_p**2
    var_t = blur(t * t) - mu_t**2
    cov = blur(p * t) - mu_p * mu_t
    luminance = (2 * mu_p * mu_t + c1) / (mu_p**2 + mu_t**2 + c1)
    structure = (2 * cov + c2) / (var_p + var_t + c2)
    return jnp.mean(luminance * structure, axis=(-3, -2, -1))
