"""Elementwise Gaussian helpers of the diffusion losses: per-sample masked means, the KL of two
diagonal Gaussians and IDDPM's discretised decoder likelihood (re-exported by
:mod:`flipjax.models.diffusion`)."""

from __future__ import annotations

import math

import jax.numpy as jnp

from flipjax.typing import Array, ArrayLike


def mean_flat(x: Array, mask: ArrayLike | None = None) -> Array:
    """float[B]: mean over the non-batch axes, or over the elements where ``mask`` is 1.

    ``mask`` broadcasts against ``x`` (e.g. ``[1 T 1 1 1]`` or ``[B T H W C]``); a sample whose
    mask is empty gets 0 rather than NaN.
    """
    axes = tuple(range(1, x.ndim))
    if mask is None:
        return jnp.mean(x, axis=axes)
    mask = jnp.broadcast_to(jnp.asarray(mask, x.dtype), x.shape)
    return jnp.sum(x * mask, axis=axes) / jnp.maximum(jnp.sum(mask, axis=axes), 1.0)


def normal_kl(mean1: Array, logvar1: Array, mean2: Array, logvar2: Array) -> Array:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: Array) -> Array:
    """The tanh approximation of the standard normal CDF that IDDPM's decoder uses."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Array, means: Array, log_scales: Array) -> Array:
    """Elementwise log-likelihood (nats) of data in [-1, 1] quantised to 256 levels.

    Each value owns the bin ``x +- 1/255``; the end bins extend to -inf / +inf (IDDPM).

    Args:
      x: float[...] targets in [-1, 1].
      means, log_scales: float[...] Gaussian means and log standard deviations.

    Returns:
      float[...] log probabilities.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(f"shapes differ: {x.shape}, {means.shape}, {log_scales.shape}")
    centred = x - means
    inv_std = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centred + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centred - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus,
                     jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


__all__ = ["approx_standard_normal_cdf", "discretized_gaussian_log_likelihood", "mean_flat",
           "normal_kl"]
