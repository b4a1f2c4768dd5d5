"""Diffusion samplers and classifier-free guidance as ``lax.scan`` programs (pure functions).

Ancestral DDPM and DDIM (``eta``) over any (respaced) ``diffusion.Schedule``; the model is
always called with the ORIGINAL training timestep of each step (``Schedule.timesteps``), which
is what the official FLIP sampler got wrong. Clean history frames are re-imposed before every
model call and in the output; ``guided`` wraps a conditional model for classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from flipjax.models.diffusion import (
    ModelFn,
    Schedule,
    _extract,
    model_timesteps,
    p_mean_variance,
)
from flipjax.typing import Array, PRNGKey, PyTree


def guided(model_fn: Callable[[Array, Array, PyTree], Array], cond: PyTree, null_cond: PyTree,
           scale: float, *, learned_range: bool = True) -> ModelFn:
    """Classifier-free guidance as a plain ``model_fn(x, t)`` for the samplers.

    Runs ``model_fn(x, t, cond)`` once on the doubled batch ``[x; x]`` with ``[cond; null_cond]``
    (every leaf concatenated on axis 0) and returns
    ``pred_uncond + scale * (pred_cond - pred_uncond)``; the variance channels are the
    conditional ones (DiT's ``forward_with_cfg``). scale 1 is the conditional model, 0 the
    unconditional one.

    Args:
      model_fn: (x float[B ...], t int[B], cond pytree with batch B) -> output.
      cond, null_cond: conditioning pytrees of identical structure and shapes.
      scale: the guidance weight w.
      learned_range: whether the output carries the 2nd half of variance channels.

    Returns:
      model_fn(x, t) -> float[B ... C or 2C].
    """
    cond2 = jax.tree_util.tree_map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, null_cond)

    def fn(x: Array, t: Array) -> Array:
        out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), cond2)
        out_c, out_u = jnp.split(out, 2, axis=0)
        if not learned_range:
            return out_u + scale * (out_c - out_u)
        c = out.shape[-1] // 2
        pred = out_u[..., :c] + scale * (out_c[..., :c] - out_u[..., :c])
        return jnp.concatenate([pred, out_c[..., c:]], axis=-1)

    return fn


def _impose_history(x: Array, history: Array | None, frame_axis: int) -> Array:
    if history is None:
        return x
    h = history.shape[frame_axis]
    rest = jax.lax.slice_in_dim(x, h, x.shape[frame_axis], axis=frame_axis)
    return jnp.concatenate([history.astype(x.dtype), rest], axis=frame_axis)


def _init(key: PRNGKey, x_init: Array | Sequence[int], history: Array | None,
          frame_axis: int) -> tuple[PRNGKey, Array]:
    if isinstance(x_init, (tuple, list)):
        key, sub = jax.random.split(key)
        x_init = jax.random.normal(sub, tuple(x_init), jnp.float32)
    if history is not None:
        hs, xs, ax = list(history.shape), list(x_init.shape), frame_axis % x_init.ndim
        if len(hs) != len(xs) or hs[:ax] + hs[ax + 1:] != xs[:ax] + xs[ax + 1:] or hs[ax] >= xs[ax]:
            raise ValueError(f"history {history.shape} must match x {x_init.shape} except for "
                             f"fewer frames on axis {frame_axis}")
    return key, _impose_history(x_init, history, frame_axis)


def _run(step: Callable, key: PRNGKey | None, x: Array, schedule: Schedule,
         return_trajectory: bool) -> Array | tuple[Array, Array]:
    n = schedule.num_steps
    keys = jnp.zeros(n, jnp.uint32) if key is None else jax.random.split(key, n)
    xs = (jnp.arange(n - 1, -1, -1, dtype=jnp.int32), keys)

    def body(x, inp):
        x = step(x, *inp)
        return x, (x if return_trajectory else None)

    x, traj = jax.lax.scan(body, x, xs)
    return (x, traj) if return_trajectory else x


def ddpm_sample(model_fn: ModelFn, schedule: Schedule, key: PRNGKey,
                x_init: Array | Sequence[int], *, history: Array | None = None,
                frame_axis: int = 1, learned_range: bool = True, prediction: str = "eps",
                clip_x0: float | None = None, fixed_variance: str = "large",
                return_trajectory: bool = False) -> Array | tuple[Array, Array]:
    """Ancestral sampling x_N -> x_0 over ``schedule`` (typically respaced) with ``lax.scan``.

    Args:
      model_fn: (x float[B ...], training timesteps int[B]) -> output; wrap with ``guided``
        for classifier-free guidance.
      schedule: the sampling process; the model gets ``schedule.timesteps`` labels.
      key: PRNG key.
      x_init: x_N float[B ...], or its shape (drawn from N(0, I) with ``key``).
      history: float[B h ...] clean frames re-imposed on the first h frames (``frame_axis``)
        before every model call and in the result; None: none.
      learned_range, prediction, clip_x0, fixed_variance: as in ``p_mean_variance``.
      return_trajectory: also return float[N B ...], the sample after each step.

    Returns:
      float[B ...] x_0 (and the trajectory).
    """
    key, x = _init(key, x_init, history, frame_axis)

    def step(x, i, k):
        t = jnp.full(x.shape[:1], i, jnp.int32)
        out = p_mean_variance(schedule, model_fn(x, model_timesteps(schedule, t)), x, t,
                              learned_range=learned_range, prediction=prediction,
                              clip_x0=clip_x0, fixed_variance=fixed_variance)
        noise = jax.random.normal(k, x.shape, x.dtype)
        x = out["mean"] + (i > 0) * jnp.exp(0.5 * out["log_variance"]) * noise
        return _impose_history(x, history, frame_axis)

    return _run(step, key, x, schedule, return_trajectory)


def ddim_sample(model_fn: ModelFn, schedule: Schedule, key: PRNGKey,
                x_init: Array | Sequence[int], *, eta: float = 0.0,
                history: Array | None = None, frame_axis: int = 1, learned_range: bool = True,
                prediction: str = "eps", clip_x0: float | None = None,
                return_trajectory: bool = False) -> Array | tuple[Array, Array]:
    """DDIM sampling (Song et al.; IDDPM ``ddim_sample``) over ``schedule`` with ``lax.scan``.

    x_{t-1} = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z with
    sigma = eta sqrt((1 - ab_prev) / (1 - ab)) sqrt(1 - ab / ab_prev); eta = 0 is deterministic,
    eta = 1 is ancestral with the posterior variance. The learned variance is ignored.

    Args:
      as ``ddpm_sample``, plus eta.

    Returns:
      float[B ...] x_0 (and the trajectory float[N B ...]).
    """
    key, x = _init(key, x_init, history, frame_axis)
    # A static eta = 0 skips the per-step normal draws (and their sizeable compile).
    deterministic = isinstance(eta, (int, float)) and eta == 0

    def step(x, i, k):
        t = jnp.full(x.shape[:1], i, jnp.int32)
        out = p_mean_variance(schedule, model_fn(x, model_timesteps(schedule, t)), x, t,
                              learned_range=learned_range, prediction=prediction,
                              clip_x0=clip_x0)
        ab = _extract(schedule.alphas_cumprod, t, x.ndim)
        ab_prev = _extract(schedule.alphas_cumprod_prev, t, x.ndim)
        sigma = eta * jnp.sqrt((1 - ab_prev) / (1 - ab)) * jnp.sqrt(1 - ab / ab_prev)
        mean = (out["pred_x0"] * jnp.sqrt(ab_prev)
                + jnp.sqrt(jnp.maximum(1 - ab_prev - sigma**2, 0.0)) * out["pred_eps"])
        x = mean if deterministic else mean + sigma * jax.random.normal(k, x.shape, x.dtype)
        return _impose_history(x, history, frame_axis)

    return _run(step, None if deterministic else key, x, schedule, return_trajectory)

