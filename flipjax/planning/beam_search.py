"""FLIP's hill-climbing beam search (Algorithm 1) as one jitted, batched JAX program.

Per problem: B beams start from the observation history. At each of H planning steps every
beam's A candidates go through the models in ONE batched call over B*A rows: the action module
proposes flows on the query grid, the dynamics module samples the next F = L - 1 latent frames
for each flow (DDIM or DDPM over a respaced schedule), the codec decodes them, the value module
scores each candidate, and every beam keeps its best candidate. Every ``replace_every`` steps the
beam with the lowest discounted return so far is replaced by the one with the highest. The plan
of a beam is the sequence of its kept candidates; ``best`` is the beam with the highest return.

Departures from the official FLIP planner, on purpose:

* Timesteps: the samplers (``flipjax.models.sampling``) call the DiT with the ORIGINAL
  training timesteps of the respaced schedule; the official code rebuilt a short schedule and
  fed its indices as labels to a 1000-step model.
* Latent history: the initial history is encoded once (only its newest
  ``WorldModel.latent_history_frames`` frames, the ones the dynamics model reads); afterwards
  the generated latents are appended as they are (no decode -> encode round trip through the
  VAE at every step). The pixel history that the action and value modules need is the
  decoding of the generated latents, computed once per step, and nothing decoded is thrown
  away (it is the video plan).
* Conditioning (flow embedding, language, cross-attention keys) is encoded once per planning
  step, not at every sampler step.
* Values are per candidate: ``value`` sees only that candidate's clip; the official min-max
  rescale over the whole candidate batch, which made a candidate's value depend on the others,
  is gone. ``value_on="clip"`` averages the values of the windows ending at each generated
  frame instead of scoring only the last one.
* Replacement copies the WHOLE beam state (latent and pixel history, the accumulated flows,
  latents, videos, values and the return); the official code copied only the recorded plan,
  so the returned plan spliced two trajectories. It never happens after the last step.
* Returns are discounted: ``sum_h discount^h value_h`` (the official sum had no discount).
* Batched problems: P problems are planned at once (``vmap`` inside the jit, optionally sharded
  over the mesh's batch axes) with one key per problem, so P problems give exactly what a
  loop over them with the same keys gives; the whole search is ``lax.scan`` over the horizon
  (and over sampler steps inside), with no host round trips.
* The no-value ablation (FLIP-NV, ``use_value=False``) keeps a uniformly random candidate per
  beam, never replaces beams and returns beam 0 as ``best`` (the beams are exchangeable);
  values are still computed and reported but steer nothing.

Layouts: the models' flows are ``[N L 2]`` (points, then steps, pixel (u, v), step 0 the current
frame); the ``Plan`` stores them as ``[L N 2]`` per planning step (``flows[p, b, h] =
swapaxes(model_flows, 0, 1)``) so that the steps of a plan read along time first.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flipjax import shapes
from flipjax.models import diffusion
from flipjax.models.sampling import ddim_sample, ddpm_sample, guided
from flipjax.planning.world_model import WorldModel
from flipjax.sharding import BATCH_AXES
from flipjax.typing import Array, PRNGKey

VALUE_ON = ("last", "clip")
SAMPLERS = ("ddim", "ddpm")


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    """Static settings of the search (hashable: a static argument of the jit).

    Attributes:
      beams: B, beams per problem.
      candidates: A, flow candidates proposed per beam and step.
      horizon: H, planning steps.
      replace_every: replace the worst beam by the best every this many steps (0: never).
      discount: gamma of the return sum_h gamma^h value_h.
      value_on: "last" (the window ending at the last generated frame) or "clip" (mean over
        the windows ending at each generated frame).
      sampler: "ddim" or "ddpm".
      sample_steps: sampler steps: an int K or a ``diffusion.space_timesteps`` spec
        ("ddim50"); the training ``schedule`` is respaced to it.
      eta: DDIM eta (0: deterministic given the initial noise).
      guidance_scale: classifier-free guidance weight; 1 is none, anything else needs
        ``WorldModel.null_conditions``.
      use_value: False is the FLIP-NV ablation (random candidate kept, no replacement).
      query_grid: G, the default query points are the G x G grid of pixel centres.
      follow_queries: each planning step after the first queries the end points of the
        previous step's kept tracks (clipped to the frame) instead of the same points again
        (official FLIP). Points on a moving object then stay on it over the whole plan; with
        fixed queries a small object leaves the queries around its start and its later
        motion goes unread (docs/LEARNING.md, "Queries that follow the motion").
      clip_x0: clip the sampler's predicted x0 to [-clip_x0, clip_x0] (None: no clipping).
      schedule: the diffusion process the dynamics model was trained with.
    """

    beams: int = 4
    candidates: int = 8
    horizon: int = 4
    replace_every: int = 2
    discount: float = 0.99
    value_on: str = "last"
    sampler: str = "ddim"
    sample_steps: int | str = 50
    eta: float = 0.0
    guidance_scale: float = 1.0
    use_value: bool = True
    query_grid: int = 8
    follow_queries: bool = False
    clip_x0: float | None = None
    schedule: diffusion.Schedule = dataclasses.field(
        default_factory=lambda: diffusion.linear_schedule(1000))

    def __post_init__(self) -> None:
        for name in ("beams", "candidates", "horizon", "query_grid"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"PlanConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.replace_every < 0:
            raise ValueError(f"PlanConfig.replace_every must be >= 0, got {self.replace_every}")
        if not 0.0 <= self.discount <= 1.0:
            raise ValueError(f"PlanConfig.discount must lie in [0, 1], got {self.discount}")
        if self.value_on not in VALUE_ON:
            raise ValueError(f"PlanConfig.value_on must be one of {VALUE_ON}, got "
                             f"{self.value_on!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"PlanConfig.sampler must be one of {SAMPLERS}, got "
                             f"{self.sampler!r}")
        if not isinstance(self.schedule, diffusion.Schedule):
            raise ValueError("PlanConfig.schedule must be a diffusion.Schedule, got "
                             f"{type(self.schedule).__name__}")
        self.sampling_schedule()  # fails early on a bad sample_steps spec

    def sampling_schedule(self) -> diffusion.Schedule:
        """The training schedule respaced to ``sample_steps`` (host side)."""
        return diffusion.respace(self.schedule, self.sample_steps)

    def _identity(self) -> tuple:
        s = self.schedule
        sched = (np.asarray(s.betas).tobytes(), np.asarray(s.timesteps).tobytes())
        return tuple(sched if f.name == "schedule" else getattr(self, f.name)
                     for f in dataclasses.fields(self))

    # The schedule holds numpy arrays, which neither hash nor compare to a bool.
    def __eq__(self, other: object) -> bool:
        return isinstance(other, PlanConfig) and self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash(self._identity())


class Plan(NamedTuple):
    """Everything the search produced, for P problems with B beams and H steps.

    Attributes:
      flows: float[P B H L N 2] pixel tracks of the kept candidate of each step.
      latents: float[P B H F h w C] the generated latent frames (F = L - 1 per step).
      videos: float[P B H F Hi Wi 3] their decodings in [-1, 1] (the video plan).
      values: float[P B H] value of each kept candidate.
      returns: float[P B] sum_h discount^h values.
      best: int32[P] the beam with the highest return (0 for the no-value ablation).
    """

    flows: Array
    latents: Array
    videos: Array
    values: Array
    returns: Array
    best: Array


class BeamState(NamedTuple):
    """The state of B beams of one problem (the scan carry); replacement copies all of it."""

    latent_history: Array  # float[B Tl h w C], the newest Tl = latent_history_frames
    pixel_history: Array   # float[B Th Hi Wi 3]
    flows: Array           # float[B H L N 2]
    latents: Array         # float[B H F h w C]
    videos: Array          # float[B H F Hi Wi 3]
    values: Array          # float[B H]
    returns: Array         # float[B]
    queries: Array         # float[B N 2], the next step's query points


def grid_queries(grid: int, height: int, width: int) -> Array:
    """float32[G*G 2]: pixel (u, v) centres of a G x G grid of cells over an H x W frame."""
    if grid < 1 or height < 1 or width < 1:
        raise ValueError(f"grid, height and width must be >= 1, got {grid}, {height}, {width}")
    u = (jnp.arange(grid, dtype=jnp.float32) + 0.5) * width / grid - 0.5
    v = (jnp.arange(grid, dtype=jnp.float32) + 0.5) * height / grid - 0.5
    vv, uu = jnp.meshgrid(v, u, indexing="ij")
    return jnp.stack([uu.ravel(), vv.ravel()], axis=-1)


# ------------------------------------------------------------------------------------------
# One planning step for a batch of candidates
# ------------------------------------------------------------------------------------------


def _clip_values(wm: WorldModel, pixel_history: Array, frames: Array, text_tokens: Array,
                 text_mask: Array, value_on: str) -> Array:
    r, th = pixel_history.shape[:2]
    f, tv = frames.shape[1], wm.value_frames
    full = jnp.concatenate([pixel_history.astype(frames.dtype), frames], axis=1)
    ends = range(th, th + f) if value_on == "clip" else (th + f - 1,)
    windows = jnp.stack([full[:, e - tv + 1:e + 1] for e in ends], axis=1)  # R E Tv Hi Wi 3
    e = windows.shape[1]
    vals = wm.value(wm.value_params, windows.reshape(r * e, *windows.shape[2:]),
                    jnp.repeat(text_tokens, e, axis=0), jnp.repeat(text_mask, e, axis=0))
    if vals.shape != (r * e,):
        raise ValueError(f"WorldModel.value must return float[{r * e}], got shape "
                         f"{list(vals.shape)}")
    return vals.reshape(r, e).mean(axis=1)


def rollout_candidates(wm: WorldModel, latent_history: Array, pixel_history: Array,
                       flows: Array, text_tokens: Array, text_mask: Array, key: PRNGKey,
                       config: PlanConfig) -> tuple[Array, Array, Array]:
    """Generates and scores the next clip of R candidates in one batched model call.

    Each row depends only on its own inputs and on ``key`` (the initial noise is drawn for all
    R rows from ``key``), never on the other rows: values are not normalised across rows.

    Args:
      wm: the world model.
      latent_history: float[R Tl h w C] clean history latents (the newest Tl frames).
      pixel_history: float[R Th Hi Wi 3] the history in pixels, in [-1, 1].
      flows: float[R N L 2] pixel tracks, step 0 the current frame.
      text_tokens: float[R Lt D]; text_mask: bool[R Lt].
      key: PRNG key of the sampler.
      config: the search settings (sampler, steps, guidance, value_on).

    Returns:
      (latents float[R F h w C], frames float[R F Hi Wi 3], values float[R]), F = L - 1.
    """
    dims = shapes.check(latent_history, "latent_history", "R Tl h w C", dtype="float")
    dims = shapes.check(pixel_history, "pixel_history", "R T Hi Wi 3", dims, dtype="float")
    dims = shapes.check(flows, "flows", "R N L 2", dims, dtype="float")
    dims = shapes.check(text_tokens, "text_tokens", "R Lt D", dims, dtype="float")
    shapes.check(text_mask, "text_mask", "R Lt", dims, dtype="bool")
    if dims["L"] < 2:
        raise ValueError(f"flows of shape {list(flows.shape)} need L >= 2 steps (the current "
                         "frame and at least one future frame)")
    if wm.value_frames > dims["T"] + 1:
        raise ValueError(f"WorldModel.value_frames={wm.value_frames} needs at least "
                         f"{wm.value_frames - 1} history frames, got pixel_history of shape "
                         f"{list(pixel_history.shape)}")
    r, f = dims["R"], dims["L"] - 1
    params = wm.dynamics_params
    cond = (wm.encode_conditions(params, flows, text_tokens, text_mask), latent_history)

    def model(x: Array, t: Array, c: tuple) -> Array:
        return wm.denoise(params, x, t, c[0], c[1])

    if config.guidance_scale == 1.0:
        def model_fn(x: Array, t: Array) -> Array:
            return model(x, t, cond)
    else:
        if wm.null_conditions is None:
            raise ValueError(f"guidance_scale={config.guidance_scale} needs "
                             "WorldModel.null_conditions (the null condition); set it or use "
                             "guidance_scale=1")
        null = (wm.null_conditions(params, flows, text_tokens, text_mask), latent_history)
        model_fn = guided(model, cond, null, config.guidance_scale,
                          learned_range=wm.learned_range)
    shape = (r, f, *latent_history.shape[2:])
    kwargs = dict(learned_range=wm.learned_range, prediction=wm.prediction,
                  clip_x0=config.clip_x0)
    schedule = config.sampling_schedule()
    if config.sampler == "ddim":
        latents = ddim_sample(model_fn, schedule, key, shape, eta=config.eta, **kwargs)
    else:
        latents = ddpm_sample(model_fn, schedule, key, shape, **kwargs)
    frames = wm.decode(wm.codec_params, latents.reshape(r * f, *shape[2:]))
    frames = frames.reshape(r, f, *frames.shape[1:])
    values = _clip_values(wm, pixel_history, frames, text_tokens, text_mask, config.value_on)
    return latents, frames, values


# ------------------------------------------------------------------------------------------
# The search for one problem, then batched
# ------------------------------------------------------------------------------------------


def _plan_one(wm: WorldModel, history: Array, text_tokens: Array, text_mask: Array,
              queries: Array, key: PRNGKey, config: PlanConfig) -> BeamState:
    """The search for one problem: history [Th Hi Wi 3], text [Lt D], mask [Lt], queries [N 2]."""
    b, a, hz = config.beams, config.candidates, config.horizon
    rows = b * a
    th = history.shape[0]
    tl = th if wm.latent_history_frames is None else min(th, int(wm.latent_history_frames))
    latent0 = wm.encode(wm.codec_params, history[th - tl:].astype(jnp.float32))  # Tl h w C
    text_r = jnp.broadcast_to(text_tokens, (rows, *text_tokens.shape))
    mask_r = jnp.broadcast_to(text_mask, (rows, *text_mask.shape))
    queries = queries.astype(jnp.float32)
    pixel0 = history.astype(jnp.float32)
    limit = jnp.asarray([history.shape[2] - 1, history.shape[1] - 1], jnp.float32)  # (u, v)

    def propose(pixel_history: Array, queries_r: Array, k: PRNGKey) -> Array:
        return wm.propose(wm.action_params, pixel_history, queries_r, text_r, mask_r, k)

    flow_shape = jax.eval_shape(propose, jnp.zeros((rows, *pixel0.shape), jnp.float32),
                                jnp.zeros((rows, *queries.shape), jnp.float32), key).shape
    if len(flow_shape) != 4 or flow_shape[0] != rows or flow_shape[1] != queries.shape[0] \
            or flow_shape[3] != 2 or flow_shape[2] < 2:
        raise ValueError(f"WorldModel.propose must return flows float[{rows} "
                         f"{queries.shape[0]} L 2] with L >= 2, got shape {list(flow_shape)}")
    n, ll = flow_shape[1], flow_shape[2]
    f = ll - 1
    state = BeamState(
        latent_history=jnp.broadcast_to(latent0, (b, *latent0.shape)),
        pixel_history=jnp.broadcast_to(pixel0, (b, *pixel0.shape)),
        flows=jnp.zeros((b, hz, ll, n, 2), jnp.float32),
        latents=jnp.zeros((b, hz, f, *latent0.shape[1:]), jnp.float32),
        videos=jnp.zeros((b, hz, f, *pixel0.shape[1:]), jnp.float32),
        values=jnp.zeros((b, hz), jnp.float32),
        returns=jnp.zeros((b,), jnp.float32),
        queries=jnp.broadcast_to(queries, (b, *queries.shape)))
    beam_ids = jnp.arange(b)

    def step(state: BeamState, inp: tuple[Array, PRNGKey]) -> tuple[BeamState, None]:
        h, k = inp
        k_prop, k_dyn, k_pick = jax.random.split(k, 3)
        pixel_r = jnp.repeat(state.pixel_history, a, axis=0)  # rows beam-major: b * A + a
        flows = propose(pixel_r, jnp.repeat(state.queries, a, axis=0),
                        k_prop).astype(jnp.float32)
        latents, frames, values = rollout_candidates(
            wm, jnp.repeat(state.latent_history, a, axis=0), pixel_r, flows, text_r, mask_r,
            k_dyn, config)
        if config.use_value:
            pick = jnp.argmax(values.reshape(b, a), axis=1)
        else:
            pick = jax.random.randint(k_pick, (b,), 0, a)
        kept = beam_ids * a + pick
        lat, vid, val = latents[kept], frames[kept].astype(jnp.float32), values[kept]
        state = BeamState(
            latent_history=jnp.concatenate([state.latent_history, lat], axis=1)[:, -tl:],
            pixel_history=jnp.concatenate([state.pixel_history, vid], axis=1)[:, -th:],
            flows=state.flows.at[:, h].set(jnp.swapaxes(flows[kept], 1, 2)),
            latents=state.latents.at[:, h].set(lat),
            videos=state.videos.at[:, h].set(vid),
            values=state.values.at[:, h].set(val),
            returns=state.returns + jnp.power(config.discount, h.astype(jnp.float32)) * val,
            queries=(jnp.clip(flows[kept][:, :, -1], 0.0, limit) if config.follow_queries
                     else state.queries))
        if config.use_value and config.replace_every > 0 and b > 1:
            due = ((h + 1) % config.replace_every == 0) & (h + 1 < hz)
            worst, best = jnp.argmin(state.returns), jnp.argmax(state.returns)
            src = jnp.where(due & (beam_ids == worst), best, beam_ids)
            state = jax.tree.map(lambda x: x[src], state)
        return state, None

    state, _ = jax.lax.scan(step, state, (jnp.arange(hz), jax.random.split(key, hz)))
    return state


def _search(wm: WorldModel, history: Array, text_tokens: Array, text_mask: Array,
            queries: Array, keys: Array, config: PlanConfig) -> Plan:
    one = functools.partial(_plan_one, config=config)
    state = jax.vmap(one, in_axes=(None, 0, 0, 0, 0, 0))(wm, history, text_tokens, text_mask,
                                                         queries, keys)
    if config.use_value:
        best = jnp.argmax(state.returns, axis=1).astype(jnp.int32)
    else:
        best = jnp.zeros(state.returns.shape[:1], jnp.int32)
    return Plan(flows=state.flows, latents=state.latents, videos=state.videos,
                values=state.values, returns=state.returns, best=best)


_search_jit = jax.jit(_search, static_argnames=("config",))


@functools.lru_cache(maxsize=16)
def sharded_search(mesh: Mesh) -> Any:
    """The jitted program :func:`hill_climb` runs with ``mesh``: problems over the batch axes,
    the world model replicated.

    Call it (or ``.lower(...)`` it ahead of time, e.g. with ``jax.ShapeDtypeStruct``s for a
    TPU topology) as ``(world_model, history, text_tokens, text_mask, queries, keys,
    config)``: queries float[P N 2], keys [P] typed PRNG keys, the rest as ``hill_climb``.

    Args:
      mesh: the device mesh.

    Returns:
      The jitted search, returning a :class:`Plan`.
    """
    data = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    rep = NamedSharding(mesh, PartitionSpec())
    # in_shardings forbids keyword arguments: config is passed positionally.
    return jax.jit(_search, static_argnums=(6,),
                   in_shardings=(rep, data, data, data, data, data), out_shardings=data)


def problem_queries(queries: Array | None, config: PlanConfig, dims: shapes.Dims) -> Array:
    """float[P N 2] query points per problem from None (the ``config.query_grid`` grid over
    Hi x Wi), float[N 2] (shared) or float[P N 2]; ``dims`` holds P, Hi and Wi."""
    p = dims["P"]
    if queries is None:
        queries = grid_queries(config.query_grid, dims["Hi"], dims["Wi"])
    queries = jnp.asarray(queries)
    if queries.ndim == 2:
        shapes.check(queries, "queries", "N 2", dtype="float")
        return jnp.broadcast_to(queries, (p, *queries.shape))
    shapes.check(queries, "queries", "P N 2", dims, dtype="float")
    return queries


def _problem_keys(key: PRNGKey, p: int) -> Array:
    key = jnp.asarray(key)
    single = 0 if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else 1
    if key.ndim == single:
        return jax.random.split(key, p)
    if key.ndim == single + 1 and key.shape[0] == p:
        return key
    raise ValueError(f"key must be one PRNG key or one per problem ([{p}] keys), got shape "
                     f"{list(key.shape)}")


def hill_climb(world_model: WorldModel, history: Array, text_tokens: Array, text_mask: Array,
               key: PRNGKey, config: PlanConfig = PlanConfig(), *, queries: Array | None = None,
               mesh: Mesh | None = None) -> Plan:
    """Plans P problems at once with FLIP's hill-climbing beam search (one jitted program).

    Args:
      world_model: the action, dynamics, codec and value functions with their params.
      history: float[P Th Hi Wi 3] observation frames in [-1, 1], the last one current.
      text_tokens: float[P Lt D] instruction features; text_mask: bool[P Lt].
      key: one PRNG key (split into one per problem) or keys [P] (one per problem: problem p
        then plans exactly as ``hill_climb`` on problem p alone with ``key[p:p+1]``).
      config: the search settings (static: a new config compiles a new program).
      queries: float[N 2] or float[P N 2] pixel query points; None: the ``config.query_grid``
        grid over the frame. The first planning step's queries; with
        ``config.follow_queries`` each later step's are where the kept tracks ended (read
        such plans with ``plan_to_actions(queries=None)``).
      mesh: shard problems over its batch axes (``data``, ``fsdp``) with NamedShardings, the
        world model replicated; P must divide by their size. None: default placement.

    Returns:
      The :class:`Plan` (flows float[P B H L N 2], latents, videos, values float[P B H],
      returns float[P B], best int32[P]).

    Raises:
      ValueError: naming the argument and shape that do not fit, or a bad setting.
    """
    dims = shapes.check(history, "history", "P Th Hi Wi 3", dtype="float")
    dims = shapes.check(text_tokens, "text_tokens", "P Lt D", dims, dtype="float")
    shapes.check(text_mask, "text_mask", "P Lt", dims, dtype="bool")
    p = dims["P"]
    if dims["Th"] < world_model.history_frames:
        raise ValueError(f"history of shape {list(history.shape)}: the world model needs at "
                         f"least {world_model.history_frames} history frames")
    if world_model.value_frames > dims["Th"] + 1:
        raise ValueError(f"WorldModel.value_frames={world_model.value_frames} needs at least "
                         f"{world_model.value_frames - 1} history frames, got history of shape "
                         f"{list(history.shape)}")
    queries = problem_queries(queries, config, dims)
    keys = _problem_keys(key, p)
    args = (history, text_tokens, text_mask, queries, keys)
    if mesh is None:
        return _search_jit(world_model, *args, config=config)
    shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    if p % shards:
        raise ValueError(f"history of shape {list(history.shape)}: {p} problems do not divide "
                         f"by the mesh's {shards} batch shards; pad the problems")
    data = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    args = jax.device_put(args, data)
    world_model = jax.device_put(world_model, NamedSharding(mesh, PartitionSpec()))
    return sharded_search(mesh)(world_model, *args, config)
