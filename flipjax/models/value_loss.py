"""Losses of the FLIP value module (LIV): VIP time-contrastive value loss and language InfoNCE.

Everything here is a pure function of embeddings, so it runs under ``jax.jit`` / ``grad`` and
is independent of the encoders that produced them (:mod:`flipjax.models.value`). Shapes use the
glossary of :mod:`flipjax.typing` plus E for the embedding width.

Value (LIV ``model_liv.py: sim`` with ``metric="cos"``, ``trainer.py: compute_vip_loss``)::

    V(s; g) = cos(phi(s), phi(g)) / (1 - gamma)          in [-1/(1-gamma), 1/(1-gamma)]

LIV's "sim" is the plain cosine (no temperature, no learned scale); the 1/(1-gamma) factor
makes V the discounted return of the -1-per-step reward of VIP, so V ~ -(steps to goal) up to
the bound. VIP (Ma et al. 2023) uses sim = -||phi(s) - phi(g)||_2 instead; LIV and FLIP use cos.

VIP loss (same form in VIP's ``trainer.py`` and LIV's ``compute_vip_loss``)::

    L_vip = -(1 - gamma) * mean_b V(s0_b; g_b)
            + log mean_b exp(V(s_b; g_b) - r_b - gamma * V(s'_b; g_b))

with s0 the first frame (clip) of a video, (s, s') a random consecutive pair and g its last
frame (or its instruction, for LIV's language-goal VIP term), r = 1[s == g] - 1 = -1. The first
term pulls the value of initial states up (it is the dual of the goal-reaching objective), the
log-mean-exp of the one-step TD error pushes V(s) down towards r + gamma V(s'), hardest where
the error is largest. LIV computes ``log(1e-8 + mean(exp(.)))``; here it is ``logsumexp - log
B`` because the exponent reaches 2/(1-gamma) = 100 for gamma = 0.98, which overflows float32.

Language InfoNCE (LIV ``compute_clip_loss``): symmetric cross-entropy over the B x B matrix of
cosine similarities between goal images and instructions. LIV uses the cosines as logits with
no temperature (``temperature=1``); CLIP uses a learned 1/temperature initialised at 1/0.07.

Success ranking (a departure from LIV, off by default: weight 0 is the official objective).
LIV only contrasts an instruction with other episodes' goals, never with a wrong outcome of the
same scene, so its value need not prefer "the red block pushed left" to "the red block pushed
right" under "push the red block to the left". Given the ending of a faithful script and of a
failed script from the same scene (``data_pipelines.toy.endings``), this term is a two-way
InfoNCE of the instruction over {faithful ending, failed ending}::

    L_rank = mean_b softplus((cos(phi(fail_b), l_b) - cos(phi(ok_b), l_b)) / tau)

i.e. the failed ending is a hard negative of the instruction, and minimising it makes
V(ok; l) > V(fail; l).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from flipjax import shapes
from flipjax.typing import Array, PRNGKey

DEFAULT_GAMMA = 0.98


def cosine_similarity(a: Array, b: Array, eps: float = 1e-8) -> Array:
    """Cosine of the angle between embeddings along the last axis.

    Args:
      a, b: float[... E], broadcastable.
      eps: floor on the norms, so a zero embedding gives 0 rather than NaN.

    Returns:
      float32[...] in [-1, 1].
    """
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    na = jnp.maximum(jnp.linalg.norm(a, axis=-1), eps)
    nb = jnp.maximum(jnp.linalg.norm(b, axis=-1), eps)
    return jnp.sum(a * b, axis=-1) / (na * nb)


def value_from_embeddings(state_emb: Array, goal_emb: Array,
                          gamma: float = DEFAULT_GAMMA) -> Array:
    """LIV value V(s; g) = cos(phi(s), phi(g)) / (1 - gamma).

    Args:
      state_emb: float[... E] state (clip) embeddings.
      goal_emb: float[... E] goal embeddings (goal clip or instruction), broadcastable.
      gamma: discount in [0, 1).

    Returns:
      float32[...], bounded by 1 / (1 - gamma) in absolute value and invariant to positive
      rescaling of either embedding.
    """
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"gamma must be in [0, 1), got {gamma}")
    return cosine_similarity(state_emb, goal_emb) / (1.0 - gamma)


def _log_mean_exp(x: Array) -> Array:
    return jax.nn.logsumexp(x) - math.log(x.size)


def vip_loss(init_emb: Array, state_emb: Array, next_emb: Array, goal_emb: Array,
             reward: Array | None = None, *, gamma: float = DEFAULT_GAMMA,
             num_negatives: int = 0, key: PRNGKey | None = None) -> Array:
    """VIP / LIV time-contrastive value loss (formula in the module docstring).

    Args:
      init_emb: float[B E] embeddings of the initial states s0.
      state_emb: float[B E] embeddings of s_t.
      next_emb: float[B E] embeddings of s_{t+1}.
      goal_emb: float[B E] goal embeddings (last clip, or the instruction for language VIP).
      reward: float[B] r(s_t; g); default -1 everywhere (s_t is never the goal when t < T-1).
      gamma: discount in [0, 1).
      num_negatives: LIV's extra negatives: this many random permutations of the (s_t, s_{t+1})
        pairs scored against the unpermuted goals with reward -1, each adding a log-mean-exp
        term (LIV's pretraining uses 3).
      key: PRNG key for the permutations; required when num_negatives > 0.

    Returns:
      float32[] loss.
    """
    dims = shapes.check(init_emb, "init_emb", "B E", dtype="float")
    for name, x in (("state_emb", state_emb), ("next_emb", next_emb), ("goal_emb", goal_emb)):
        shapes.check(x, name, "B E", dims, dtype="float")
    if reward is None:
        reward = -jnp.ones((dims["B"],), jnp.float32)
    shapes.check(reward, "reward", "B", dims)
    if num_negatives > 0 and key is None:
        raise ValueError("vip_loss: num_negatives > 0 needs a PRNG key")

    value = lambda s: value_from_embeddings(s, goal_emb, gamma)
    v0, vs, vs_next = value(init_emb), value(state_emb), value(next_emb)
    loss = -(1.0 - gamma) * jnp.mean(v0) + _log_mean_exp(vs - reward - gamma * vs_next)
    for i in range(num_negatives):
        perm = jax.random.permutation(jax.random.fold_in(key, i), dims["B"])
        vs_neg, vs_next_neg = value(state_emb[perm]), value(next_emb[perm])
        loss = loss + _log_mean_exp(vs_neg + 1.0 - gamma * vs_next_neg)
    return loss


def language_infonce_loss(image_emb: Array, text_emb: Array, *, temperature: float = 1.0,
                          text_ids: Array | None = None) -> Array:
    """Symmetric image-text InfoNCE over the batch (CLIP loss as LIV computes it).

    Args:
      image_emb: float[B E] goal-image (clip) embeddings.
      text_emb: float[B E] instruction embeddings; row b describes image b.
      temperature: logits are cos / temperature; LIV uses 1 (no scale), CLIP ~0.07.
      text_ids: optional int[B] instruction identities. Rows sharing an instruction are all
        positives of each other (uniform target over them); without it a batch holding the same
        task twice asks the model to tell identical instructions apart, which with the few
        tasks of robot datasets (LIBERO-10 has 10) is most pairs.

    Returns:
      float32[] loss; log(B) when all cosines are equal and ids are distinct.
    """
    dims = shapes.check(image_emb, "image_emb", "B E", dtype="float")
    shapes.check(text_emb, "text_emb", "B E", dims, dtype="float")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    logits = cosine_similarity(image_emb[:, None], text_emb[None]) / temperature  # [B B]
    if text_ids is None:
        targets = jnp.eye(dims["B"], dtype=jnp.float32)
    else:
        shapes.check(text_ids, "text_ids", "B", dims)
        same = (text_ids[:, None] == text_ids[None]).astype(jnp.float32)
        targets = same / jnp.sum(same, axis=1, keepdims=True)  # symmetric: so is `same`

    def xent(lg: Array) -> Array:
        return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(lg, axis=-1), axis=-1))

    return 0.5 * (xent(logits) + xent(logits.T))


def success_ranking_loss(text_emb: Array, success_emb: Array, failure_emb: Array, *,
                         temperature: float = 0.1) -> Array:
    """Two-way InfoNCE of each instruction over its faithful and failed ending (module docstring).

    Args:
      text_emb: float[B E] instruction embeddings.
      success_emb: float[B E] embeddings of the faithful endings (row b fulfils instruction b).
      failure_emb: float[B E] embeddings of failed endings of the same scenes and instructions.
      temperature: tau; the cosines are divided by it (LIV's language cosines span [-1, 1]).

    Returns:
      float32[] loss; log 2 when the two endings score the same, towards 0 as the faithful
      ending's cosine exceeds the failed one's by many tau.
    """
    dims = shapes.check(text_emb, "text_emb", "B E", dtype="float")
    shapes.check(success_emb, "success_emb", "B E", dims, dtype="float")
    shapes.check(failure_emb, "failure_emb", "B E", dims, dtype="float")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    gap = cosine_similarity(failure_emb, text_emb) - cosine_similarity(success_emb, text_emb)
    return jnp.mean(jax.nn.softplus(gap / temperature))


@dataclasses.dataclass(frozen=True)
class LivLossWeights:
    """Weights of the LIV objective (defaults: LIV's pretraining config, ``pretrain.yaml``).

    Attributes:
      vip_image: VIP with the last clip of the video as goal (LIV ``visionweight``).
      vip_text: VIP with the instruction embedding as goal (LIV ``langweight``; 0 in LIV's
        fine-tuning config).
      infonce: image-text InfoNCE between goal clip and instruction (LIV ``clipweight``).
      gamma: discount of the value.
      temperature: InfoNCE temperature.
      num_negatives: extra shuffled VIP negatives per VIP term (LIV: 3 pretraining, 0 fine-tuning).
      success_ranking: weight of :func:`success_ranking_loss` (not LIV: 0 = the official
        objective; :func:`liv_loss` never adds it, the caller does with its ending pairs).
      ranking_temperature: its tau.
    """

    vip_image: float = 1.0
    vip_text: float = 1.0
    infonce: float = 1.0
    gamma: float = DEFAULT_GAMMA
    temperature: float = 1.0
    num_negatives: int = 0
    success_ranking: float = 0.0
    ranking_temperature: float = 0.1


def liv_loss(init_emb: Array, state_emb: Array, next_emb: Array, goal_emb: Array,
             text_emb: Array, weights: LivLossWeights = LivLossWeights(), *,
             text_goal_emb: Array | None = None, text_ids: Array | None = None,
             key: PRNGKey | None = None) -> tuple[Array, dict[str, Array]]:
    """Weighted LIV objective: image-goal VIP + language-goal VIP + image-text InfoNCE.

    Args:
      init_emb, state_emb, next_emb, goal_emb: float[B E] embeddings of s0, s_t, s_{t+1} and
        the goal (last) clip.
      text_emb: float[B E] instruction embeddings.
      weights: loss weights and hyper-parameters.
      text_goal_emb: float[B E] image embedding paired with the instruction in InfoNCE;
        default ``goal_emb``. (LIV draws it from the last 5% of the video on EPIC-Kitchens,
        the last frame elsewhere.)
      text_ids: optional int[B] instruction identities for InfoNCE (see there).
      key: PRNG key, needed when ``weights.num_negatives > 0``.

    Returns:
      (total float32[], {"vip_image", "vip_text", "infonce", "total"} unweighted terms and the
      weighted total).
    """
    if text_goal_emb is None:
        text_goal_emb = goal_emb
    keys = (None, None) if key is None else tuple(jax.random.split(key))
    vip = lambda goal, k: vip_loss(init_emb, state_emb, next_emb, goal, gamma=weights.gamma,
                                   num_negatives=weights.num_negatives, key=k)
    terms = {"vip_image": vip(goal_emb, keys[0]), "vip_text": vip(text_emb, keys[1]),
             "infonce": language_infonce_loss(text_goal_emb, text_emb,
                                              temperature=weights.temperature,
                                              text_ids=text_ids)}
    total = (weights.vip_image * terms["vip_image"] + weights.vip_text * terms["vip_text"]
             + weights.infonce * terms["infonce"])
    return total, {**terms, "total": total}
