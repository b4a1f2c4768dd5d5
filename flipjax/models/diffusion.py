"""Gaussian diffusion for FLIP's dynamics module, as pure functions over arrays.

FLIP trains its video DiT with the DiT / improved-DDPM (IDDPM) recipe: 1000 steps, linear betas,
epsilon prediction, a learned-range variance (the model outputs ``2C`` channels, ``eps`` and
``v``) and the loss ``MSE(eps) + VB``, where VB is the KL in bits between the true posterior
``q(x_{t-1} | x_t, x_0)`` and the model's ``p(x_{t-1} | x_t)`` with the model mean
stop-gradiented, replaced at ``t == 0`` by the discretised Gaussian decoder NLL. Both terms are
per-sample means over the non-batch axes (``mean_flat``), here over the elements of an optional
mask: FLIP's video loss keeps the first ``history`` frames clean (never noised, excluded from
the loss).

Layout: channels last, ``x: float[B ... C]`` (videos ``[B T H W C]``); a learned-range model
output is ``float[B ... 2C]`` with ``eps`` (or ``v`` / ``x0``) first and the variance
interpolation value second, matching DiT's channel split.

Timesteps: every function takes ``t`` as an index into *its* schedule (``int[B]``). A
respaced schedule remembers, in ``Schedule.timesteps``, the training timestep of each of its
steps, and the samplers call the model with those original labels (``model_timesteps``), as
DiT's ``SpacedDiffusion`` does. FLIP's official sampler instead rebuilt a *shorter linear
schedule* for few-step sampling and passed the short-schedule indices to a network trained on
1000-step labels, i.e. wrong noise levels and wrong timestep embeddings; this module does not.

Schedules hold float64 numpy arrays so that respacing (host side, outside jit) is exact;
coefficients are gathered as float32 at use, like DiT's ``_extract_into_tensor``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flipjax.models.gaussian import (
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)
from flipjax.typing import Array, ArrayLike

PREDICTIONS = ("eps", "v", "x0")
# A model maps (x_t: float[B ...], original timesteps: int[B]) to float[B ... C or 2C].
ModelFn = Callable[[Array, Array], Array]


# ------------------------------------------------------------------------------------------
# Schedules
# ------------------------------------------------------------------------------------------


class Schedule(NamedTuple):
    """Precomputed per-step quantities of a diffusion process with ``N`` steps (all ``[N]``).

    ``timesteps[i]`` is the training timestep of step ``i``: ``arange(N)`` for a training
    schedule, the kept timesteps for a respaced one. The model must always be called with these.
    """

    betas: np.ndarray
    log_betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    timesteps: np.ndarray

    @property
    def num_steps(self) -> int:
        return int(self.betas.shape[0])


def schedule_from_betas(betas: ArrayLike, timesteps: ArrayLike | None = None) -> Schedule:
    """Builds every derived quantity from ``betas`` (IDDPM's ``GaussianDiffusion.__init__``).

    Args:
      betas: float[N] in (0, 1].
      timesteps: int[N] training timestep of each step; ``arange(N)`` when omitted.

    Returns:
      The ``Schedule``, float64 numpy leaves.
    """
    betas = np.asarray(betas, np.float64)
    if betas.ndim != 1 or betas.shape[0] < 1:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    if not np.all((betas > 0) & (betas <= 1)):
        raise ValueError("betas must lie in (0, 1]")
    n = betas.shape[0]
    timesteps = np.arange(n) if timesteps is None else np.asarray(timesteps)
    if timesteps.shape != (n,):
        raise ValueError(f"timesteps must have shape ({n},), got {timesteps.shape}")
    alphas = 1.0 - betas
    acp = np.cumprod(alphas)
    acp_prev = np.append(1.0, acp[:-1])
    post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
    # The posterior variance is 0 at t = 0; IDDPM clips its log with the t = 1 value so that
    # the learned-range interpolation stays finite (t = 0 uses the decoder NLL anyway).
    first = post_var[1] if n > 1 else betas[0]
    post_log_var = np.log(np.append(first, post_var[1:]))
    return Schedule(
        betas=betas,
        log_betas=np.log(betas),
        alphas_cumprod=acp,
        alphas_cumprod_prev=acp_prev,
        sqrt_alphas_cumprod=np.sqrt(acp),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - acp),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / acp),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / acp - 1.0),
        posterior_variance=post_var,
        posterior_log_variance_clipped=post_log_var,
        posterior_mean_coef1=betas * np.sqrt(acp_prev) / (1.0 - acp),
        posterior_mean_coef2=(1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp),
        timesteps=timesteps.astype(np.int32),
    )


def linear_schedule(num_steps: int = 1000) -> Schedule:
    """DiT's ``get_named_beta_schedule("linear")``: betas linear in [1e-4, 0.02] * 1000 / N."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be positive, got {num_steps}")
    scale = 1000.0 / num_steps
    return schedule_from_betas(np.linspace(scale * 1e-4, scale * 0.02, num_steps,
                                           dtype=np.float64))


def cosine_schedule(num_steps: int = 1000, s: float = 0.008,
                    max_beta: float = 0.999) -> Schedule:
    """Nichol & Dhariwal's cosine schedule: alpha_bar(u) = cos((u + s) / (1 + s) * pi / 2)^2.

    ``beta_i = min(1 - alpha_bar((i + 1) / N) / alpha_bar(i / N), max_beta)``; the clip keeps
    the last step from being singular (alpha_bar(1) = 0).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be positive, got {num_steps}")
    u = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    alpha_bar = np.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return schedule_from_betas(np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta))


def space_timesteps(num_steps: int, spec: int | str | Sequence[int]) -> np.ndarray:
    """The kept step indices of a respaced process (DiT / IDDPM ``space_timesteps``).

    Args:
      num_steps: N, steps of the process being respaced.
      spec: ``"ddimK"``: the DDIM paper's integer stride, ``range(0, N, stride)`` with exactly K
        steps (1000 -> "ddim50" keeps 0, 20, ..., 980); an int K or a string ``"K"`` /
        ``"K1,K2,..."``: IDDPM's sections, N split into equal sections and each strided with
        ``round`` so that its first and last step are kept (1000 -> 50 keeps 0, 20, 41, ...,
        999); a sequence of ints: the indices themselves.

    Returns:
      int32[K] sorted unique indices into the process.
    """
    if isinstance(spec, str) and spec.startswith("ddim"):
        count = int(spec[len("ddim"):])
        for stride in range(1, max(num_steps, 2)):
            if len(range(0, num_steps, stride)) == count:
                return np.arange(0, num_steps, stride, dtype=np.int32)
        raise ValueError(f"cannot take exactly {count} of {num_steps} steps with an integer stride")
    if isinstance(spec, (int, np.integer)):
        spec = [int(spec)]
    elif isinstance(spec, str):
        spec = [int(c) for c in spec.split(",")]
    else:
        kept = np.unique(np.asarray(spec, np.int64))
        if kept.size == 0 or kept[0] < 0 or kept[-1] >= num_steps:
            raise ValueError(f"kept steps must be a non-empty subset of [0, {num_steps})")
        return kept.astype(np.int32)
    size_per, extra = divmod(num_steps, len(spec))
    start, kept = 0, []
    for i, count in enumerate(spec):
        size = size_per + (1 if i < extra else 0)
        if count < 1 or size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1.0 if count == 1 else (size - 1) / (count - 1)
        kept += [start + round(j * stride) for j in range(count)]
        start += size
    return np.unique(np.asarray(kept, np.int64)).astype(np.int32)


def respace(schedule: Schedule, spec: int | str | Sequence[int]) -> Schedule:
    """A shorter process on a subset of the steps, with the same marginals q(x_t | x_0).

    New betas are ``1 - alpha_bar[k_i] / alpha_bar[k_{i-1}]`` over the kept steps ``k``, so the
    respaced ``alphas_cumprod`` equal the original ones at the kept steps, and ``timesteps``
    maps each new step to the original training timestep (composes: respacing a respaced
    schedule maps through both). Host-side: call outside jit.

    Args:
      schedule: the process to respace (usually ``linear_schedule(1000)``).
      spec: see ``space_timesteps``.

    Returns:
      The respaced ``Schedule``.
    """
    kept = space_timesteps(schedule.num_steps, spec)
    acp = np.asarray(schedule.alphas_cumprod, np.float64)[kept]
    betas = 1.0 - acp / np.append(1.0, acp[:-1])
    return schedule_from_betas(betas, np.asarray(schedule.timesteps)[kept])


def model_timesteps(schedule: Schedule, t: ArrayLike) -> Array:
    """int32[...]: the training timestep labels of the schedule indices ``t``."""
    return jnp.asarray(schedule.timesteps, jnp.int32)[jnp.asarray(t, jnp.int32)]


def _extract(arr: ArrayLike, t: Array, ndim: int) -> Array:
    """float32[B 1 ... 1] (``ndim`` axes): ``arr[t]`` ready to broadcast against x."""
    vals = jnp.asarray(arr, jnp.float32)[t]
    return vals.reshape(vals.shape + (1,) * (ndim - vals.ndim))


def _check_t(t: ArrayLike, x: Array) -> Array:
    t = jnp.asarray(t, jnp.int32)
    if t.ndim == 0:
        t = jnp.broadcast_to(t, x.shape[:1])
    if t.shape != x.shape[:1]:
        raise ValueError(f"t must be a scalar or have shape [B]={x.shape[:1]}, got {t.shape}")
    return t


# ------------------------------------------------------------------------------------------
# Forward process and parameterisations
# ------------------------------------------------------------------------------------------


def q_sample(schedule: Schedule, x0: Array, t: ArrayLike, noise: Array) -> Array:
    """float[B ...] x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {noise.shape} != x0 shape {x0.shape}")
    t = _check_t(t, x0)
    return (_extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
            + _extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def q_posterior_mean_variance(schedule: Schedule, x0: Array, x_t: Array,
                              t: ArrayLike) -> tuple[Array, Array, Array]:
    """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0), each float[B ...]."""
    if x0.shape != x_t.shape:
        raise ValueError(f"x0 shape {x0.shape} != x_t shape {x_t.shape}")
    t = _check_t(t, x_t)
    nd = x_t.ndim
    mean = (_extract(schedule.posterior_mean_coef1, t, nd) * x0
            + _extract(schedule.posterior_mean_coef2, t, nd) * x_t)
    var = jnp.broadcast_to(_extract(schedule.posterior_variance, t, nd), x_t.shape)
    log_var = jnp.broadcast_to(_extract(schedule.posterior_log_variance_clipped, t, nd), x_t.shape)
    return mean, var, log_var


def predict_x0_from_eps(schedule: Schedule, x_t: Array, t: ArrayLike, eps: Array) -> Array:
    """float[B ...] x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)."""
    t = _check_t(t, x_t)
    return (_extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
            - _extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)


def predict_eps_from_x0(schedule: Schedule, x_t: Array, t: ArrayLike, x0: Array) -> Array:
    """float[B ...] eps = (x_t / sqrt(alpha_bar) - x0) / sqrt(1 / alpha_bar - 1)."""
    t = _check_t(t, x_t)
    return ((_extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x0)
            / _extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim))


def v_target(schedule: Schedule, x0: Array, t: ArrayLike, noise: Array) -> Array:
    """float[B ...] v = sqrt(alpha_bar) noise - sqrt(1 - alpha_bar) x0 (Salimans & Ho)."""
    t = _check_t(t, x0)
    return (_extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * noise
            - _extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)


def predict_x0_from_v(schedule: Schedule, x_t: Array, t: ArrayLike, v: Array) -> Array:
    """float[B ...] x0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v."""
    t = _check_t(t, x_t)
    return (_extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim) * x_t
            - _extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * v)


def split_output(model_output: Array, x_t: Array,
                 learned_range: bool) -> tuple[Array, Array | None]:
    """Splits ``float[B ... 2C]`` into the prediction and the variance value (channels last)."""
    c = x_t.shape[-1]
    want = (*x_t.shape[:-1], 2 * c if learned_range else c)
    if model_output.shape != want:
        raise ValueError(f"model output must have shape {want} "
                         f"(learned_range={learned_range}), got {model_output.shape}")
    if not learned_range:
        return model_output, None
    return model_output[..., :c], model_output[..., c:]


def p_mean_variance(schedule: Schedule, model_output: Array, x_t: Array, t: ArrayLike, *,
                    learned_range: bool = True, prediction: str = "eps",
                    clip_x0: float | None = None,
                    fixed_variance: str = "large") -> dict[str, Array]:
    """The model's p(x_{t-1} | x_t) from its raw output (IDDPM ``p_mean_variance``).

    Args:
      schedule: the process ``t`` indexes.
      model_output: float[B ... 2C] (learned range) or float[B ... C].
      x_t: float[B ... C].
      t: int[B] schedule indices.
      learned_range: log variance = frac log(beta_t) + (1 - frac) posterior_log_variance_clipped
        with frac = (v + 1) / 2; otherwise the fixed variance below.
      prediction: what the first C channels predict: "eps", "v" or "x0".
      clip_x0: clip the predicted x0 to [-clip_x0, clip_x0] (None: no clipping, as DiT).
      fixed_variance: without a learned range, "large" (beta_t, with the t = 1 posterior
        variance at t = 0, IDDPM's FIXED_LARGE) or "small" (the clipped posterior variance).

    Returns:
      dict of float[B ... C]: mean, variance, log_variance, pred_x0, pred_eps (the eps
      consistent with the possibly clipped pred_x0, which DDIM needs).
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    t = _check_t(t, x_t)
    pred, var_values = split_output(model_output, x_t, learned_range)
    nd = x_t.ndim
    min_log = _extract(schedule.posterior_log_variance_clipped, t, nd)
    if learned_range:
        frac = (var_values + 1.0) / 2.0
        log_var = frac * _extract(schedule.log_betas, t, nd) + (1.0 - frac) * min_log
    elif fixed_variance == "large":
        # beta_t except at t = 0, where beta_0 would be too small a decoder variance.
        first = schedule.posterior_variance[1] if schedule.num_steps > 1 else schedule.betas[0]
        large = jnp.where(t.reshape(t.shape + (1,) * (nd - 1)) == 0,
                          jnp.log(jnp.asarray(first, jnp.float32)),
                          _extract(schedule.log_betas, t, nd))
        log_var = jnp.broadcast_to(large, x_t.shape)
    elif fixed_variance == "small":
        log_var = jnp.broadcast_to(min_log, x_t.shape)
    else:
        raise ValueError(f"fixed_variance must be 'large' or 'small', got {fixed_variance!r}")
    if prediction == "eps":
        pred_x0 = predict_x0_from_eps(schedule, x_t, t, pred)
    elif prediction == "v":
        pred_x0 = predict_x0_from_v(schedule, x_t, t, pred)
    else:
        pred_x0 = pred
    if clip_x0 is not None:
        pred_x0 = jnp.clip(pred_x0, -clip_x0, clip_x0)
    exact_eps = prediction == "eps" and clip_x0 is None
    pred_eps = pred if exact_eps else predict_eps_from_x0(schedule, x_t, t, pred_x0)
    mean, _, _ = q_posterior_mean_variance(schedule, pred_x0, x_t, t)
    return dict(mean=mean, variance=jnp.exp(log_var), log_variance=log_var, pred_x0=pred_x0,
                pred_eps=pred_eps)


# ------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------


def vb_terms_bpd(schedule: Schedule, model_output: Array, x0: Array, x_t: Array, t: ArrayLike, *,
                 mask: ArrayLike | None = None, learned_range: bool = True,
                 prediction: str = "eps") -> Array:
    """float[B]: the variational bound term in bits per (masked) element.

    KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0, the decoder NLL
    -log p(x0 | x_1) for t == 0. Gradients flow through whatever ``model_output`` carries;
    ``training_losses`` stops the mean's.
    """
    t = _check_t(t, x_t)
    true_mean, _, true_log_var = q_posterior_mean_variance(schedule, x0, x_t, t)
    out = p_mean_variance(schedule, model_output, x_t, t, learned_range=learned_range,
                          prediction=prediction)
    kl = normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])
    kl = mean_flat(kl, mask) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
    nll = mean_flat(nll, mask) / math.log(2.0)
    return jnp.where(t == 0, nll, kl)


def training_losses(schedule: Schedule, model_output: Array, x0: Array, x_t: Array, t: ArrayLike,
                    noise: Array, *, mask: ArrayLike | None = None, learned_range: bool = True,
                    prediction: str = "eps") -> dict[str, Array]:
    """Per-sample IDDPM / DiT losses (``LossType.MSE``) for the model's output at ``x_t``.

    Args:
      schedule: the training process (``t`` indexes it).
      model_output: float[B ... 2C] (learned range) or float[B ... C] for input ``x_t``.
      x0: float[B ... C] clean data; noise: float[B ... C] the noise that made ``x_t``.
      x_t: float[B ... C] the model input (FLIP: history frames clean, see ``noise_video``).
      t: int[B].
      mask: 1 where an element counts, broadcastable to x0 (FLIP: ``history_mask``); None: all.
      learned_range: adds the VB term, which only trains the variance channels.
      prediction: "eps" (FLIP / DiT), "v" or "x0"; sets the MSE target.

    Returns:
      dict of float[B]: mse, vb (bits; zeros without a learned range), loss = mse + vb.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    if not (x0.shape == x_t.shape == noise.shape):
        raise ValueError(f"x0, x_t, noise shapes differ: {x0.shape}, {x_t.shape}, {noise.shape}")
    t = _check_t(t, x0)
    pred, var_values = split_output(model_output, x_t, learned_range)
    target = {"eps": noise, "x0": x0}.get(prediction)
    target = v_target(schedule, x0, t, noise) if target is None else target
    mse = mean_flat((target - pred) ** 2, mask)
    if learned_range:
        # The VB term must not pull the mean: only the variance channels learn from it.
        frozen = jnp.concatenate([jax.lax.stop_gradient(pred), var_values], axis=-1)
        vb = vb_terms_bpd(schedule, frozen, x0, x_t, t, mask=mask, learned_range=True,
                          prediction=prediction)
    else:
        vb = jnp.zeros_like(mse)
    return dict(mse=mse, vb=vb, loss=mse + vb)


def history_mask(shape: Sequence[int], history: int, frame_axis: int = 1) -> Array:
    """float32 mask broadcastable to ``shape``: 0 on the first ``history`` frames, 1 after.

    Args:
      shape: the video shape, e.g. ``[B T H W C]``.
      history: number of clean conditioning frames, 0 <= history < T.
      frame_axis: the T axis.

    Returns:
      float32[1 T 1 ...] (ones except along ``frame_axis``).
    """
    shape = tuple(shape)
    frame_axis = frame_axis % len(shape)
    num_frames = shape[frame_axis]
    if not 0 <= history < num_frames:
        raise ValueError(f"history must be in [0, {num_frames}), got {history}")
    frames = (jnp.arange(num_frames) >= history).astype(jnp.float32)
    bshape = [1] * len(shape)
    bshape[frame_axis] = num_frames
    return frames.reshape(bshape)


def noise_video(schedule: Schedule, x0: Array, t: ArrayLike, noise: Array, history: int,
                frame_axis: int = 1) -> Array:
    """float[B T ...] x_t with the first ``history`` frames left clean (FLIP's model input)."""
    keep = history_mask(x0.shape, history, frame_axis) == 0
    return jnp.where(keep, x0, q_sample(schedule, x0, t, noise))


def model_losses(model_fn: ModelFn, schedule: Schedule, x0: Array, t: ArrayLike, noise: Array,
                 *, history: int = 0, frame_axis: int = 1, mask: ArrayLike | None = None,
                 learned_range: bool = True, prediction: str = "eps") -> dict[str, Array]:
    """Noises ``x0`` (history frames kept clean), runs the model, returns ``training_losses``.

    Args:
      model_fn: (x_t float[B ...], training timesteps int[B]) -> model output.
      schedule, x0, t, noise, learned_range, prediction: as in ``training_losses``.
      history: leading clean frames along ``frame_axis``: not noised, excluded from the loss.
      mask: an extra loss mask, multiplied with the history mask.

    Returns:
      dict of float[B]: mse, vb, loss.
    """
    t = _check_t(t, x0)
    x_t = noise_video(schedule, x0, t, noise, history, frame_axis)
    if history:
        hmask = history_mask(x0.shape, history, frame_axis)
        mask = hmask if mask is None else hmask * jnp.asarray(mask, jnp.float32)
    out = model_fn(x_t, model_timesteps(schedule, t))
    return training_losses(schedule, out, x0, x_t, t, noise, mask=mask,
                           learned_range=learned_range, prediction=prediction)
