"""FLIP's hill climbing written the way the official code runs it: the baseline of
``benchmarks.planning``.

The official planner (``scripts/hill_climbing.py`` with ``utils/module_utils.py`` of the FLIP
release) is reproduced in program structure on top of the SAME :class:`WorldModel` functions,
parameters, sampler and step count as :func:`flipjax.planning.hill_climb`, so that a timing
difference between the two comes from the structure alone:

* problems one at a time (a Python loop), and a Python loop over the planning steps;
* at every planning step the history of every row (beam x candidate) is RE-ENCODED through the
  codec from pixels: the frames generated at the previous step were decoded, and now go back
  through the encoder (the decode -> encode round trip);
* the B x A candidates of a step go through each model in one batched call, as in the official
  code (``beam_loop=True`` instead loops over beams in Python, one call of A rows per beam);
* the sampler is a Python loop over its steps that calls the full dynamics model each step:
  the conditioning (flow embedding, language, flow keys/values) is recomputed at every step,
  and the latents are copied to the host (``np.asarray``) after every step;
* the whole generated clip is decoded, history frames included, and the history decodings are
  thrown away;
* the value is that of the last frame (the ``value_frames`` window ending at it) after a
  min-max rescale of the pixels over the whole candidate batch, so a candidate's value depends
  on the others;
* every ``replace_every`` steps (not at step 0) the worst beam's RECORDED plan (flows,
  latents, videos, values) is overwritten by the best beam's while its state, the pixel
  history it goes on planning from, is kept: the official defect, whose returned plan splices
  two trajectories;
* returns are undiscounted sums of the recorded values.

Not reproduced: the official sampler fed respaced step indices as timestep labels to a
1000-step model; here both planners call the model with the original training timesteps
(:func:`flipjax.models.diffusion.model_timesteps`), which costs the same. The official encoder
drew a posterior sample; the world model's deterministic ``encode`` is used.

Modes: ``"eager"`` has no ``jax.jit`` of its own anywhere (op-by-op dispatch, the analogue of
PyTorch eager; jnp library functions that JAX implements with an internal jit still dispatch
as one op each, like PyTorch's fused kernels). ``"per_call_jit"`` jits each network call
(propose, encode, encode_conditions, denoise, decode, value) and the sampler's per-step update
on its own, while the loops and the host copies stay in Python: it separates the gain of the
program structure from that of compilation.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flipjax import shapes
from flipjax.models import diffusion
from flipjax.models.sampling import guided
from flipjax.planning import Plan, PlanConfig, WorldModel
from flipjax.planning.beam_search import problem_queries
from flipjax.typing import Array, PRNGKey

MODES = ("eager", "per_call_jit")
# The official min-max rescale divides by (max - min); this keeps a constant batch finite.
_RESCALE_EPS = 1e-8


# ------------------------------------------------------------------------------------------
# The sampler, one step at a time
# ------------------------------------------------------------------------------------------


def sampler_step(schedule: diffusion.Schedule, model_output: Array, x: Array, i: Array,
                 noise: Array | None, *, sampler: str, eta: float = 0.0,
                 learned_range: bool = True, prediction: str = "eps",
                 clip_x0: float | None = None) -> Array:
    """One reverse step x_i -> x_{i-1} of ancestral DDPM or DDIM.

    ``flipjax.models.sampling`` only has whole-loop samplers (``lax.scan`` over a private step),
    so the update is written once more here for a Python loop; the tests check that the loop
    of :func:`sample_loop` reproduces ``ddim_sample`` / ``ddpm_sample``.

    Args:
      schedule: the (respaced) sampling process that ``i`` indexes.
      model_output: float[R ... C or 2C] the model's output at x, labelled with
        ``schedule.timesteps[i]``.
      x: float[R ... C] the current sample.
      i: int scalar, the schedule index of this step (N - 1 first, 0 last).
      noise: float[R ... C] standard normal draws; unused (may be None) by DDIM with eta 0.
      sampler: "ddpm" or "ddim".
      eta, learned_range, prediction, clip_x0: as in ``flipjax.models.sampling``.

    Returns:
      float[R ... C] x_{i-1}.
    """
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
    t = jnp.full(x.shape[:1], i, jnp.int32)
    out = diffusion.p_mean_variance(schedule, model_output, x, t, learned_range=learned_range,
                                    prediction=prediction, clip_x0=clip_x0)
    if sampler == "ddpm":
        return out["mean"] + (i > 0) * jnp.exp(0.5 * out["log_variance"]) * noise
    shape = (-1,) + (1,) * (x.ndim - 1)
    ab = jnp.asarray(schedule.alphas_cumprod, jnp.float32)[t].reshape(shape)
    ab_prev = jnp.asarray(schedule.alphas_cumprod_prev, jnp.float32)[t].reshape(shape)
    sigma = eta * jnp.sqrt((1 - ab_prev) / (1 - ab)) * jnp.sqrt(1 - ab / ab_prev)
    mean = (out["pred_x0"] * jnp.sqrt(ab_prev)
            + jnp.sqrt(jnp.maximum(1 - ab_prev - sigma**2, 0.0)) * out["pred_eps"])
    if isinstance(eta, (int, float)) and eta == 0:
        return mean
    return mean + sigma * noise


_STATIC = ("sampler", "eta", "learned_range", "prediction", "clip_x0")
_sampler_step_jit = jax.jit(sampler_step, static_argnames=_STATIC)


def sample_loop(model_fn: Callable[[Array, Array], Array], schedule: diffusion.Schedule,
                x_init: Array, key: PRNGKey | None, *, sampler: str, eta: float = 0.0,
                learned_range: bool = True, prediction: str = "eps",
                clip_x0: float | None = None, jit_step: bool = False,
                on_step: Callable[[], None] | None = None) -> np.ndarray:
    """The official sampler structure: a Python loop over steps, the sample copied to the host
    after each one.

    Noise is drawn exactly as ``ddpm_sample`` / ``ddim_sample`` draw it for an array
    ``x_init`` (``jax.random.split(key, N)``, step j using key j), so the same key and
    ``x_init`` give their result.

    Args:
      model_fn: (x float[R ...], training timesteps int[R]) -> output.
      schedule: the (respaced) sampling process, N steps.
      x_init: float[R ...] x_N.
      key: PRNG key of the per-step noise (None only for DDIM with eta 0).
      sampler, eta, learned_range, prediction, clip_x0: see :func:`sampler_step`.
      jit_step: run the per-step update jitted (the ``per_call_jit`` mode).
      on_step: called once per step after the host copy (call counting).

    Returns:
      float32[R ...] x_0 as a host array.
    """
    n = schedule.num_steps
    deterministic = sampler == "ddim" and isinstance(eta, (int, float)) and eta == 0
    if key is None and not deterministic:
        raise ValueError(f"sampler {sampler!r} with eta={eta} draws noise: pass a key")
    keys = None if deterministic else jax.random.split(key, n)
    step = _sampler_step_jit if jit_step else sampler_step
    x = np.asarray(x_init, np.float32)
    for j in range(n):
        i = n - 1 - j
        labels = diffusion.model_timesteps(schedule, jnp.full(x.shape[:1], i, jnp.int32))
        out = model_fn(jnp.asarray(x), labels)
        noise = None if keys is None else jax.random.normal(keys[j], x.shape, jnp.float32)
        x = step(schedule, out, jnp.asarray(x), jnp.int32(i), noise, sampler=sampler, eta=eta,
                 learned_range=learned_range, prediction=prediction, clip_x0=clip_x0)
        x = np.asarray(x)  # the official loop's per-step device -> host copy
        if on_step is not None:
            on_step()
    return x


# ------------------------------------------------------------------------------------------
# The planner
# ------------------------------------------------------------------------------------------


def batch_minmax(frames: Array) -> Array:
    """The official rescale before scoring: ONE affine map of the whole candidate batch onto
    [-1, 1], so every candidate's pixels (and value) depend on the others' extremes.

    Args:
      frames: float[R ...] the clips of all R candidates.

    Returns:
      float[R ...] ``2 (frames - min) / (max - min) - 1``, min and max over the whole batch.
    """
    lo, hi = jnp.min(frames), jnp.max(frames)
    return 2.0 * (frames - lo) / (hi - lo + _RESCALE_EPS) - 1.0


@functools.cache
def _jitted(fn: Callable[..., Any]) -> Callable[..., Any]:
    # Keyed by the world model's function objects, so repeated plans reuse the compilations.
    return jax.jit(fn)


class _Calls:
    """The world model's functions in one mode, counting calls and rows."""

    def __init__(self, wm: WorldModel, mode: str, counts: collections.Counter) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        wrap = _jitted if mode == "per_call_jit" else (lambda f: f)
        self.wm, self.counts, self.jit_step = wm, counts, mode == "per_call_jit"
        for name in ("propose", "encode", "encode_conditions", "denoise", "decode", "value"):
            setattr(self, "_" + name, wrap(getattr(wm, name)))
        self._null = None if wm.null_conditions is None else wrap(wm.null_conditions)

    def propose(self, *args: Any) -> Array:
        self.counts["propose"] += 1
        return self._propose(self.wm.action_params, *args)

    def encode(self, frames: Array) -> Array:
        self.counts["encode"] += 1
        self.counts["encode_frames"] += frames.shape[0]
        return self._encode(self.wm.codec_params, frames)

    def decode(self, latents: Array) -> Array:
        self.counts["decode"] += 1
        self.counts["decode_frames"] += latents.shape[0]
        return self._decode(self.wm.codec_params, latents)

    def value(self, *args: Any) -> Array:
        self.counts["value"] += 1
        return self._value(self.wm.value_params, *args)

    def conditions(self, *args: Any) -> Any:
        self.counts["encode_conditions"] += 1
        return self._encode_conditions(self.wm.dynamics_params, *args)

    def null_conditions(self, *args: Any) -> Any:
        self.counts["encode_conditions"] += 1
        return self._null(self.wm.dynamics_params, *args)

    def denoise(self, x: Array, t: Array, cond: Any, history: Array) -> Array:
        self.counts["denoise"] += 1
        self.counts["denoise_rows"] += x.shape[0]
        return self._denoise(self.wm.dynamics_params, x, t, cond, history)


def _expand(calls: _Calls, pixel_rows: Array, queries: Array, text: Array, mask: Array,
            key: PRNGKey, config: PlanConfig, schedule: diffusion.Schedule,
            encode_frames: int) -> tuple[Array, np.ndarray, Array, Array]:
    """Proposes, generates and scores R rows: (flows [R N L 2], latents [R F h w C],
    frames [R F Hi Wi 3], values [R])."""
    wm = calls.wm
    r, th = pixel_rows.shape[:2]
    k_prop, k_noise, k_dyn = jax.random.split(key, 3)
    flows = calls.propose(pixel_rows, queries, text, mask, k_prop)
    recent = pixel_rows[:, th - encode_frames:]
    lat_hist = calls.encode(recent.reshape(r * encode_frames, *recent.shape[2:]))
    lat_hist = lat_hist.reshape(r, encode_frames, *lat_hist.shape[1:])
    f = flows.shape[2] - 1

    def model_fn(x: Array, t: Array) -> Array:
        # The official loop calls the full model: conditioning recomputed at every step.
        cond = calls.conditions(flows, text, mask)
        if config.guidance_scale == 1.0:
            return calls.denoise(x, t, cond, lat_hist)
        if wm.null_conditions is None:
            raise ValueError(f"guidance_scale={config.guidance_scale} needs "
                             "WorldModel.null_conditions")
        null = calls.null_conditions(flows, text, mask)
        fn = guided(lambda xx, tt, c: calls.denoise(xx, tt, c[0], c[1]), (cond, lat_hist),
                    (null, lat_hist), config.guidance_scale, learned_range=wm.learned_range)
        return fn(x, t)

    x_init = jax.random.normal(k_noise, (r, f, *lat_hist.shape[2:]), jnp.float32)
    latents = sample_loop(model_fn, schedule, x_init, k_dyn, sampler=config.sampler,
                          eta=config.eta, learned_range=wm.learned_range,
                          prediction=wm.prediction, clip_x0=config.clip_x0,
                          jit_step=calls.jit_step,
                          on_step=lambda: calls.counts.update(host_copies=1))
    clip = jnp.concatenate([lat_hist, jnp.asarray(latents)], axis=1)
    decoded = calls.decode(clip.reshape(r * clip.shape[1], *clip.shape[2:]))
    frames = decoded.reshape(r, clip.shape[1], *decoded.shape[1:])[:, encode_frames:]
    full = jnp.concatenate([pixel_rows.astype(frames.dtype), frames], axis=1)
    windows = batch_minmax(full[:, full.shape[1] - wm.value_frames:])
    values = calls.value(windows, text, mask)
    return flows, latents, frames, values


def _plan_one(calls: _Calls, history: Array, text: Array, mask: Array, queries: Array,
              key: PRNGKey, config: PlanConfig, schedule: diffusion.Schedule,
              encode_frames: int, beam_loop: bool) -> dict[str, np.ndarray]:
    b, a, hz = config.beams, config.candidates, config.horizon
    th = history.shape[0]
    groups = [slice(i * a, (i + 1) * a) for i in range(b)] if beam_loop else [slice(0, b * a)]
    pixel = jnp.broadcast_to(history, (b, *history.shape))
    records: dict[str, list[Array]] = {"flows": [], "latents": [], "videos": [], "values": []}
    for h, k in enumerate(jax.random.split(key, hz)):
        rows = jnp.repeat(pixel, a, axis=0)  # beam-major: b * A + a
        outs = []
        for g, kg in zip(groups, jax.random.split(k, len(groups)), strict=True):
            n = g.stop - g.start
            outs.append(_expand(calls, rows[g], jnp.broadcast_to(queries, (n, *queries.shape)),
                                jnp.broadcast_to(text, (n, *text.shape)),
                                jnp.broadcast_to(mask, (n, *mask.shape)), kg, config, schedule,
                                encode_frames))
        flows, latents, frames, values = (jnp.concatenate([jnp.asarray(o[i]) for o in outs])
                                          for i in range(4))
        kept = jnp.arange(b) * a + jnp.argmax(values.reshape(b, a), axis=1)
        records["flows"].append(jnp.swapaxes(flows[kept], 1, 2))
        records["latents"].append(latents[kept])
        records["videos"].append(frames[kept])
        records["values"].append(values[kept])
        pixel = jnp.concatenate([pixel, frames[kept].astype(pixel.dtype)], axis=1)[:, -th:]
        if config.replace_every > 0 and (h + 1) % config.replace_every == 0 and h > 0:
            totals = jnp.sum(jnp.stack(records["values"]), axis=0)
            worst, best = int(jnp.argmin(totals)), int(jnp.argmax(totals))
            # The official defect: the recorded plan is copied, the beam's state is not.
            for name, steps in records.items():
                records[name] = [s.at[worst].set(s[best]) for s in steps]
    out = {name: np.stack([np.asarray(s) for s in steps], axis=1)
           for name, steps in records.items()}
    out["returns"] = out["values"].sum(axis=1)
    return out


def plan_official(world_model: WorldModel, history: Array, text_tokens: Array,
                  text_mask: Array, key: PRNGKey, config: PlanConfig = PlanConfig(), *,
                  queries: Array | None = None, mode: str = "eager",
                  encode_frames: int | None = None, beam_loop: bool = False
                  ) -> tuple[Plan, dict[str, int]]:
    """Plans P problems one at a time with the official program structure (module docstring).

    ``config`` gives beams, candidates, horizon, replace_every, sampler, sample_steps, eta,
    guidance_scale, clip_x0, query_grid and schedule exactly as for ``hill_climb``;
    ``discount`` and ``value_on`` are not used (the official returns are undiscounted sums of
    last-frame values).

    Args:
      world_model: the action, dynamics, codec and value functions with their params.
      history: float[P Th Hi Wi 3] observation frames in [-1, 1], the last one current.
      text_tokens: float[P Lt D]; text_mask: bool[P Lt].
      key: one PRNG key (split into one per problem).
      config: the search settings (``use_value`` must be True).
      queries: float[N 2] or float[P N 2] pixel query points; None: the config's grid.
      mode: "eager" (no jit) or "per_call_jit" (each network call jitted on its own).
      encode_frames: the last history frames re-encoded for the dynamics model at every
        step (the official: the DiT's history length); None: all Th.
      beam_loop: loop over beams in Python (one call of A rows per beam) instead of one call
        of B x A rows per step.

    Returns:
      (plan, counts): the :class:`~flipjax.planning.Plan` as host arrays (flows float[P B H L N
      2], latents float[P B H F h w C], videos float[P B H F Hi Wi 3], values float[P B H] of
      rescaled frames, returns float[P B], best int32[P]); counts of the model calls made:
      propose, encode (and encode_frames), encode_conditions, denoise (and denoise_rows),
      decode (and decode_frames), value, host_copies.

    Raises:
      ValueError: naming the argument and shape that do not fit, or a bad setting.
    """
    dims = shapes.check(history, "history", "P Th Hi Wi 3", dtype="float")
    dims = shapes.check(text_tokens, "text_tokens", "P Lt D", dims, dtype="float")
    shapes.check(text_mask, "text_mask", "P Lt", dims, dtype="bool")
    p, th = dims["P"], dims["Th"]
    if not config.use_value:
        raise ValueError("plan_official reproduces the value-guided search: use_value=False "
                         "(FLIP-NV) has no official counterpart")
    if th < max(world_model.history_frames, world_model.value_frames - 1):
        raise ValueError(f"history of shape {list(history.shape)}: the world model needs at "
                         f"least {max(world_model.history_frames, world_model.value_frames - 1)}"
                         " history frames")
    encode_frames = th if encode_frames is None else int(encode_frames)
    if not 1 <= encode_frames <= th:
        raise ValueError(f"encode_frames must lie in [1, {th}] for history of shape "
                         f"{list(history.shape)}, got {encode_frames}")
    queries = problem_queries(queries, config, dims)
    counts: collections.Counter = collections.Counter()
    calls = _Calls(world_model, mode, counts)
    schedule = config.sampling_schedule()
    history = jnp.asarray(history, jnp.float32)
    per = [_plan_one(calls, history[i], text_tokens[i], text_mask[i], queries[i], k, config,
                     schedule, encode_frames, beam_loop)
           for i, k in enumerate(jax.random.split(key, p))]
    stacked = {name: np.stack([o[name] for o in per]) for name in per[0]}
    plan = Plan(flows=stacked["flows"], latents=stacked["latents"], videos=stacked["videos"],
                values=stacked["values"], returns=stacked["returns"],
                best=np.argmax(stacked["returns"], axis=1).astype(np.int32))
    return plan, dict(counts)


__all__ = ["MODES", "batch_minmax", "plan_official", "sample_loop", "sampler_step"]
