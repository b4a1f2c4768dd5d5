"""The action module's latent: Gaussian (official) or a categorical over learned codes.

A Gaussian prior that is wider than the posteriors it has to cover puts most of its draws where
the decoder never saw a latent in training; on the toy world the decoder maps those to no
motion, so eight prior draws rarely offer the planner the motion the posterior knows
(docs/LEARNING.md). With K learned codes every prior draw is a code the decoder was trained on,
and a categorical prior's KL to the posterior is exact.

Shapes: B batch, Z latent width, K codes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flipjax import shapes
from flipjax.typing import Array


def latent_std(z_logvar: Array, official_std: bool = False) -> Array:
    """Posterior standard deviation exp(0.5 logvar); exp of that with ``official_std``."""
    std = jnp.exp(0.5 * z_logvar)
    return jnp.exp(std) if official_std else std


def gaussian_draw(key: Array, mu: Array, logvar: Array, official_std: bool = False) -> Array:
    """A reparameterised draw mu + std * eps, float[B Z]."""
    return mu + latent_std(logvar, official_std) * jax.random.normal(key, mu.shape, jnp.float32)


def code_draw(key: Array, logits: Array, codebook: Array, *, straight_through: bool) -> Array:
    """One code per example from the categorical ``softmax(logits)``.

    Args:
      key: PRNG key.
      logits: float[B K] unnormalised log-probabilities.
      codebook: float[K Z] the codes.
      straight_through: the Gumbel-softmax straight-through estimator (Jang et al. 2017,
        temperature 1): the forward pass uses the drawn code, the gradient reaches the logits
        through the soft sample. False: a plain draw (no gradient to the logits).

    Returns:
      float[B Z] the drawn codes.
    """
    dims = shapes.check(logits, "logits", "B K", dtype="float")
    shapes.check(codebook, "codebook", "K Z", dims, dtype="float")
    logits = logits.astype(jnp.float32)
    gumbel = jax.random.gumbel(key, logits.shape, jnp.float32)
    hard = jax.nn.one_hot(jnp.argmax(logits + gumbel, axis=-1), logits.shape[-1])
    if straight_through:
        soft = jax.nn.softmax(logits + gumbel, axis=-1)
        hard = soft + jax.lax.stop_gradient(hard - soft)
    return hard @ codebook.astype(jnp.float32)


def categorical_kl(q_logits: Array, p_logits: Array) -> Array:
    """Per-example KL(softmax(q_logits) || softmax(p_logits)) in nats.

    Args:
      q_logits, p_logits: float[B K].

    Returns:
      float[B], >= 0, at most log K against a uniform p.
    """
    dims = shapes.check(q_logits, "q_logits", "B K", dtype="float")
    shapes.check(p_logits, "p_logits", "B K", dims, dtype="float")
    log_q = jax.nn.log_softmax(q_logits.astype(jnp.float32), axis=-1)
    log_p = jax.nn.log_softmax(p_logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1)


def gaussian_log_prob(z: Array, mu: Array, logvar: Array) -> Array:
    """log N(z; mu, exp(logvar)) summed over the last axis (diagonal), float[...]."""
    return -0.5 * jnp.sum(logvar + jnp.log(2.0 * jnp.pi) + (z - mu) ** 2 * jnp.exp(-logvar),
                          axis=-1)


def mixture_log_prob(z: Array, logits: Array, mu: Array, logvar: Array) -> Array:
    """log of a diagonal Gaussian mixture's density at z.

    Args:
      z: float[B Z].
      logits: float[B K] component weights (unnormalised).
      mu, logvar: float[B K Z] component means and log-variances.

    Returns:
      float[B].
    """
    dims = shapes.check(z, "z", "B Z", dtype="float")
    dims = shapes.check(logits, "logits", "B K", dims, dtype="float")
    shapes.check(mu, "mu", "B K Z", dims, dtype="float")
    shapes.check(logvar, "logvar", "B K Z", dims, dtype="float")
    per = gaussian_log_prob(z[:, None], mu, logvar)                       # B K
    return jax.nn.logsumexp(jax.nn.log_softmax(logits, axis=-1) + per, axis=-1)


def mixture_draw(key: Array, logits: Array, mu: Array, logvar: Array) -> Array:
    """One draw per example from a diagonal Gaussian mixture (float[B K], float[B K Z] x2),
    float[B Z]: a component from softmax(logits), then its Gaussian."""
    pick, noise = jax.random.split(key)
    k = jax.random.categorical(pick, logits.astype(jnp.float32), axis=-1)
    take = jax.vmap(lambda a, i: a[i])
    return gaussian_draw(noise, take(mu, k), take(logvar, k))


def mixture_kl(z: Array, q_mu: Array, q_logvar: Array, p_logits: Array, p_mu: Array,
               p_logvar: Array) -> Array:
    """One-sample estimate of KL(q || p) for a Gaussian posterior and a mixture prior (no
    closed form): log q(z) - log p(z) at the posterior's draw z, float[B]."""
    return gaussian_log_prob(z, q_mu, q_logvar) - mixture_log_prob(z, p_logits, p_mu, p_logvar)
