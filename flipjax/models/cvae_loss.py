"""Training losses of the FLIP action module (:class:`flipjax.models.flow_cvae.FlowCVAE`).

The official objective (``train_cvae.py`` with ``weight_loss: true, aux: true``)::

  10 * direction + 10 * scale + 1e-4 * KL + ADE + 1e-5 * (image recon + flow recon)

* Targets come from the ground-truth flow itself: step vectors v_i = x_{i+1} - x_i, target
  scale |v_i| and direction v_i / (|v_i| + 1e-8) (the official preprocessing). A step that
  does not move therefore has target direction 0, which a unit prediction misses by 1: that is
  the official behaviour and is kept.
* direction / scale: per-step squared error summed over coordinates; steps whose error exceeds
  ``threshold`` (2) count ``up_weight`` (100) times, then the mean.
* ADE: per-step distance between the integrated prediction and the ground truth (steps 1..L-1);
  distances above ``ade_threshold`` (1 px) count ``up_weight`` times, then the mean.
* KL: the analytic KL(N(mu, exp(logvar)) || N(0, I)) summed over latent dims and, officially,
  over the batch as well; then the robust form sqrt(1 + KL^2) - 1 (~KL^2/2 near 0, ~|KL| far).
* Auxiliary: MSE of the encoder's image tokens against the patchified history and of its flow
  tokens against the ground-truth flow.

Shapes: B batch, N points, L flow horizon, S = L-1 steps, T frames, D latent width.
"""

from __future__ import annotations

import dataclasses
import math

import einops
import jax
import jax.numpy as jnp

from flipjax import shapes
from flipjax.models.cvae_latent import categorical_kl, mixture_kl
from flipjax.typing import Array


@dataclasses.dataclass(frozen=True)
class CVAELossConfig:
    """Weights and thresholds of :func:`cvae_loss` (defaults: the official recipe).

    Attributes:
      direction, scale, kl, ade, aux: term weights (aux applies to both reconstructions).
      step_threshold: squared-error threshold of the direction / scale up-weighting.
      ade_threshold: distance threshold (pixels) of the ADE up-weighting.
      up_weight: factor for elements above their threshold (1 disables the weighting).
      kl_batch_sum: sum the KL over the batch (official; scales with the batch size) rather
        than averaging the per-example KL.
      robust_kl: apply sqrt(1 + KL^2) - 1.
      free_nats: per-example KL below this many nats costs nothing (free bits, a departure:
        the latent can carry a few nats of motion before the KL pushes back, so a strong KL
        weight does not collapse it while the decoder is still learning to read it).
      kl_warmup_steps: the KL weight ramps linearly from 0 to ``kl`` over this many training
        steps (KL annealing, Bowman et al. 2016, a departure; 0: official, full weight from
        the start). A latent that the decoder has learnt to read survives the KL, where a full
        KL from step 0 keeps the decoder on the no-motion answer.
      prior_kl: with a learned prior, the weight of the KL's pull on the prior, split from the
        pull on the posterior (KL balancing, Hafner et al. 2021, a departure): the posterior
        sees ``kl`` * KL(q || sg(p)) and the prior ``prior_kl`` * KL(sg(q) || p), so the prior
        can chase the posterior hard without squeezing the motion out of the latent. Negative
        (default): one KL term at weight ``kl`` pulling both.
      best_of_many: K > 0 adds, at weight ``best_of_many_weight``, the smallest ADE of K
        prior samples per example (:func:`best_of_many_ade`; the trainer draws them): the
        best-of-many objective (Bhattacharyya et al. 2018, a departure, 0 = off). The KL
        alone only pulls the prior towards the posterior; this trains the prior's samples to
        cover the motions a scene admits, which is what a planner choosing among them needs.
      prior_mean_ade: with a learned prior, the weight of the plain ADE of the flow decoded at
        z = the prior's mean (a departure, 0 = off; the trainer decodes it): the decoder has
        to predict from the observation what the observation tells, instead of reading every
        motion from a posterior latent that the prior cannot reproduce.
    """

    direction: float = 10.0
    scale: float = 10.0
    kl: float = 1e-4
    ade: float = 1.0
    aux: float = 1e-5
    step_threshold: float = 2.0
    ade_threshold: float = 1.0
    up_weight: float = 100.0
    kl_batch_sum: bool = True
    robust_kl: bool = True
    free_nats: float = 0.0
    kl_warmup_steps: int = 0
    prior_kl: float = -1.0
    best_of_many: int = 0
    best_of_many_weight: float = 1.0
    prior_mean_ade: float = 0.0


def _safe_norm(x: Array) -> Array:
    # Exact zeros occur (perfect steps, the query point); plain sqrt would give NaN gradients.
    sq = jnp.sum(x * x, axis=-1)
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def flow_targets(flow: Array) -> tuple[Array, Array]:
    """Per-step scale and direction of ground-truth trajectories (official preprocessing).

    Args:
      flow: float[B N L 2].

    Returns:
      (scale float[B N L-1 1] = |v|, direction float[B N L-1 2] = v / (|v| + 1e-8)) with
      v = flow[:, :, 1:] - flow[:, :, :-1].
    """
    shapes.check(flow, "flow", "B N L 2", dtype="float")
    v = flow[:, :, 1:] - flow[:, :, :-1]
    scale = _safe_norm(v)[..., None]
    return scale, v / (scale + 1e-8)


def thresholded_squared_error(pred: Array, target: Array, threshold: float = 2.0,
                              up_weight: float = 100.0) -> Array:
    """Mean over steps of the squared error summed over the last axis, with the steps whose
    error exceeds ``threshold`` counted ``up_weight`` times (official direction/scale loss).

    Args:
      pred, target: float[... C] (C = 2 for directions, 1 for scales).
      threshold: squared-error threshold.
      up_weight: weight of the steps above it.

    Returns:
      float[] loss.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {list(pred.shape)} and target {list(target.shape)} differ")
    err = jnp.sum((pred - target) ** 2, axis=-1)
    weight = jax.lax.stop_gradient(jnp.where(err > threshold, up_weight, 1.0))
    return jnp.mean(weight * err)


direction_loss = thresholded_squared_error
scale_loss = thresholded_squared_error


def weighted_ade(pred_flow: Array, gt_flow: Array, threshold: float = 1.0,
                 up_weight: float = 100.0) -> Array:
    """Training ADE: mean per-step distance (steps 1..L-1), distances above ``threshold``
    counted ``up_weight`` times (official ``average_distance_error`` with weighting).

    Args:
      pred_flow: float[B N L 2] integrated prediction (starting at the true query point).
      gt_flow: float[B N L 2].
      threshold: distance threshold in pixels.
      up_weight: weight of the distances above it.

    Returns:
      float[] loss.
    """
    dims = shapes.check(pred_flow, "pred_flow", "B N L 2", dtype="float")
    shapes.check(gt_flow, "gt_flow", "B N L 2", dims, dtype="float")
    dist = _safe_norm(pred_flow - gt_flow)[:, :, 1:]
    weight = jax.lax.stop_gradient(jnp.where(dist > threshold, up_weight, 1.0))
    return jnp.mean(weight * dist)


def best_of_many_ade(samples: Array, gt_flow: Array) -> Array:
    """The best-of-many objective: per example, the smallest plain ADE among K samples.

    Args:
      samples: float[K B N L 2] flows decoded from K prior draws.
      gt_flow: float[B N L 2].

    Returns:
      float[] the batch mean of min_k ADE_k (steps 1..L-1); only the best sample of each
      example gets a gradient.
    """
    dims = shapes.check(samples, "samples", "K B N L 2", dtype="float")
    shapes.check(gt_flow, "gt_flow", "B N L 2", dims, dtype="float")
    ade = jnp.mean(_safe_norm(samples - gt_flow[None])[..., 1:], axis=(2, 3))   # K B
    return jnp.mean(jnp.min(ade, axis=0))


def kl_divergence(z_mu: Array, z_logvar: Array, official_std: bool = False,
                  prior: tuple[Array, Array] | None = None) -> Array:
    """Per-example KL(posterior || prior) summed over latent dims.

    Args:
      z_mu, z_logvar: float[B D].
      official_std: the distributions the official code actually samples, posterior std
        exp(exp(0.5 logvar)) against prior std e (diagnostics only; the official loss uses the
        standard form, which matches this module's fixed sampler).
      prior: (mu, logvar) float[B D] of a learned Gaussian prior; None: N(0, I).

    Returns:
      float[B] KL in nats.
    """
    dims = shapes.check(z_mu, "z_mu", "B D", dtype="float")
    shapes.check(z_logvar, "z_logvar", "B D", dims, dtype="float")
    if prior is not None:
        p_mu, p_logvar = prior
        shapes.check(p_mu, "prior_mu", "B D", dims, dtype="float")
        shapes.check(p_logvar, "prior_logvar", "B D", dims, dtype="float")
        return 0.5 * jnp.sum(p_logvar - z_logvar - 1.0
                             + (jnp.exp(z_logvar) + (z_mu - p_mu) ** 2) * jnp.exp(-p_logvar),
                             axis=-1)
    if not official_std:
        return -0.5 * jnp.sum(1.0 + z_logvar - z_mu**2 - jnp.exp(z_logvar), axis=-1)
    log_std = jnp.exp(0.5 * z_logvar)  # log of exp(exp(.)) std
    prior_log_std = 1.0
    var_ratio = jnp.exp(2.0 * (log_std - prior_log_std))
    kl = prior_log_std - log_std + 0.5 * (var_ratio + z_mu**2 * math.exp(-2.0)) - 0.5
    return jnp.sum(kl, axis=-1)


def kl_loss(z_mu: Array, z_logvar: Array, batch_sum: bool = True, robust: bool = True,
            free_nats: float = 0.0, prior: tuple[Array, Array] | None = None) -> Array:
    """The KL term of the objective.

    Args:
      z_mu, z_logvar: float[B D].
      batch_sum: sum over the batch (official) instead of averaging.
      robust: return sqrt(1 + KL^2) - 1 (official) instead of KL.
      free_nats: each example's KL counts max(KL, free_nats) (0: official).
      prior: a learned prior's (mu, logvar) float[B D]; None: N(0, I).

    Returns:
      float[] loss.
    """
    return reduce_kl(kl_divergence(z_mu, z_logvar, prior=prior), batch_sum, robust, free_nats)


def reduce_kl(kl: Array, batch_sum: bool = True, robust: bool = True,
              free_nats: float = 0.0) -> Array:
    """Per-example KL float[B] to the loss term (:func:`kl_loss`'s options), float[]."""
    if free_nats > 0:
        kl = jnp.maximum(kl, free_nats)
    kl = jnp.sum(kl) if batch_sum else jnp.mean(kl)
    return jnp.sqrt(1.0 + kl**2) - 1.0 if robust else kl


def patchify(history: Array, patch: int) -> Array:
    """Image-reconstruction target in the official ``_patchify`` layout.

    Args:
      history: float[B T H W 3].
      patch: p.

    Returns:
      float[B (h w) (p q T 3)] with h = H/p, w = W/p.
    """
    _, _, h, w, _ = history.shape
    shapes.check(history, "history", "B T H W 3")
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not divisible into {patch}px patches")
    return einops.rearrange(history, "b t (h p) (w q) c -> b (h w) (p q t c)", p=patch, q=patch)


def kl_weight(config: CVAELossConfig, step: Array | int | None = None) -> Array:
    """The KL term's weight at training ``step`` (None: after any warm-up)."""
    if step is None or config.kl_warmup_steps <= 0:
        return jnp.asarray(config.kl, jnp.float32)
    ramp = jnp.asarray(step, jnp.float32) / float(config.kl_warmup_steps)
    return config.kl * jnp.clip(ramp, 0.0, 1.0)


def _kl(outputs: dict[str, Array], c: CVAELossConfig, *, posterior_grad: bool = True,
        prior_grad: bool = True) -> Array:
    """The KL term of ``outputs``' latent (Gaussian, or categorical with ``z_logits``), with
    the gradient stopped on the posterior or the prior side when asked."""
    q_sg = (lambda x: x) if posterior_grad else jax.lax.stop_gradient
    p_sg = (lambda x: x) if prior_grad else jax.lax.stop_gradient
    if "z_logits" in outputs:
        kl = categorical_kl(q_sg(outputs["z_logits"]), p_sg(outputs["prior_logits"]))
        return reduce_kl(kl, c.kl_batch_sum, c.robust_kl, c.free_nats)
    if "prior_logits" in outputs:   # a mixture prior, the KL at the posterior's draw
        kl = mixture_kl(q_sg(outputs["z"]), q_sg(outputs["z_mu"]), q_sg(outputs["z_logvar"]),
                        *(p_sg(outputs[k]) for k in ("prior_logits", "prior_mu",
                                                      "prior_logvar")))
        return reduce_kl(kl, c.kl_batch_sum, c.robust_kl, c.free_nats)
    prior = ((p_sg(outputs["prior_mu"]), p_sg(outputs["prior_logvar"]))
             if "prior_mu" in outputs else None)
    return kl_loss(q_sg(outputs["z_mu"]), q_sg(outputs["z_logvar"]), c.kl_batch_sum,
                   c.robust_kl, c.free_nats, prior)


def _kl_objective(outputs: dict[str, Array], kl: Array, c: CVAELossConfig,
                  step: Array | int | None) -> Array:
    """The weighted KL term: one term, or balanced halves with ``prior_kl`` >= 0."""
    learned = "prior_mu" in outputs or "prior_logits" in outputs
    if not learned or c.prior_kl < 0:
        return kl_weight(c, step) * kl
    to_posterior = _kl(outputs, c, prior_grad=False)
    to_prior = _kl(outputs, c, posterior_grad=False)
    return kl_weight(c, step) * to_posterior + c.prior_kl * to_prior


def cvae_loss(outputs: dict[str, Array], gt_flow: Array, history: Array, patch: int,
              config: CVAELossConfig = CVAELossConfig(),
              step: Array | int | None = None) -> dict[str, Array]:
    """The full training objective.

    Args:
      outputs: :meth:`FlowCVAE.__call__` outputs (scale, direction, flow, z_mu and z_logvar
        or z_logits, img_output, flow_output; prior_mu and prior_logvar, or prior_logits,
        with a learned prior).
      gt_flow: float[B N L 2] the flow that was encoded.
      history: float[B T H W 3] the observation frames that were encoded.
      patch: the model's patch size (for the image target).
      config: weights and thresholds.
      step: the training step, for ``config.kl_warmup_steps`` (None: the full KL weight).

    Returns:
      dict of float[]: loss (the weighted total), direction, scale, ade, kl, img_recon,
      flow_recon (unweighted terms).
    """
    shapes.check(gt_flow, "gt_flow", "B N L 2", dtype="float")
    target_scale, target_direction = flow_targets(gt_flow)
    c = config
    terms = {
        "direction": thresholded_squared_error(outputs["direction"], target_direction,
                                               c.step_threshold, c.up_weight),
        "scale": thresholded_squared_error(outputs["scale"], target_scale, c.step_threshold,
                                           c.up_weight),
        "ade": weighted_ade(outputs["flow"], gt_flow, c.ade_threshold, c.up_weight),
        "kl": _kl(outputs, c),
        "img_recon": jnp.mean((outputs["img_output"] - patchify(history, patch)) ** 2),
        "flow_recon": jnp.mean((outputs["flow_output"] - gt_flow) ** 2),
    }
    total = (c.direction * terms["direction"] + c.scale * terms["scale"]
             + _kl_objective(outputs, terms["kl"], c, step)
             + c.ade * terms["ade"] + c.aux * (terms["img_recon"] + terms["flow_recon"]))
    return {"loss": total, **terms}
