"""Model-agnostic training core shared by the per-module trainers.

A trainer supplies ``init_fn(rng) -> params`` (logically partitioned, as every flipjax model
is) and ``loss_fn(params, batch, rng) -> (loss, metrics)``; this module turns them into a
sharded :class:`TrainState` and a single jitted ``train_step``. Parameters are born sharded
(``jax.jit`` with ``out_shardings``), so models larger than one device's memory never exist
replicated. The step skips non-finite updates, keeps an optional EMA of the parameters and can
compute in bfloat16 while the state keeps float32 master weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from flipjax.sharding import LOGICAL_RULES, batch_sharding, replicated

PyTree = Any
LossFn = Callable[[PyTree, PyTree, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]

SCHEDULES = ("constant", "cosine", "linear")


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes; a plain pytree of arrays.

    Attributes:
      step: int32[] number of steps taken, skipped ones included (it also seeds the step rng).
      params: float32 parameters, unboxed (shardings live in the separate shardings tree).
      opt_state: optimizer state.
      ema: exponential moving average of ``params``, or None when disabled.
      rng: uint32 key data (``jax.random.key_data``) so checkpoints hold a plain array.
      skipped: int32[] number of steps whose update was dropped for non-finite gradients.
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    ema: PyTree | None
    rng: jax.Array
    skipped: jax.Array


# ------------------------------------------------------------------------------------------
# Optimizer and schedule
# ------------------------------------------------------------------------------------------


def _get(config: Mapping[str, Any], name: str, default: Any = None) -> Any:
    # dict and ml_collections.ConfigDict both implement .get.
    return config.get(name, default)


def _accum_steps(config: Mapping[str, Any]) -> int:
    k = _get(config, "grad_accum_steps", 1)
    k = 1 if k is None else k
    if int(k) != k or k < 1:
        raise ValueError(f"grad_accum_steps must be a positive integer, got {k}")
    return int(k)


def make_schedule(config: Mapping[str, Any]) -> optax.Schedule:
    """Learning rate as a function of the number of optimizer updates.

    Linear warmup from 0 to ``learning_rate`` over ``warmup_steps``, then ``constant``, or a
    ``cosine``/``linear`` decay reaching ``end_learning_rate`` (default 0) at ``total_steps``
    (counted from 0, warmup included).

    Args:
      config: dict/ConfigDict with ``learning_rate``, ``warmup_steps``, ``schedule``,
        ``total_steps`` and optionally ``end_learning_rate``.

    Returns:
      An optax schedule ``count -> learning rate``.
    """
    lr = _get(config, "learning_rate")
    if lr is None or lr < 0:
        raise ValueError(f"learning_rate must be a non-negative number, got {lr}")
    kind = _get(config, "schedule", "constant")
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    warmup = int(_get(config, "warmup_steps", 0) or 0)
    if warmup < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup}")
    end = float(_get(config, "end_learning_rate", 0.0) or 0.0)

    if kind == "constant":
        after = optax.constant_schedule(lr)
    else:
        total = _get(config, "total_steps")
        if total is None or total <= warmup:
            raise ValueError(f"a {kind} schedule needs total_steps > warmup_steps={warmup}, "
                             f"got total_steps={total}")
        decay_steps = int(total) - warmup
        if kind == "cosine":
            after = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
        else:
            after = optax.linear_schedule(lr, end, decay_steps)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_learning_rate_fn(config: Mapping[str, Any]) -> Callable[[jax.Array], jax.Array]:
    """Learning rate as a function of applied train steps (micro-steps under accumulation).

    With ``grad_accum_steps = k`` the optimizer (and so the schedule) advances once every k
    train steps; this maps a train-step count onto the schedule accordingly.
    """
    schedule, k = make_schedule(config), _accum_steps(config)
    return lambda step: schedule(step // k)


def param_path(path: tuple[Any, ...]) -> tuple[str, ...]:
    """A ``jax.tree_util`` key path as plain names, e.g. ``("decoder", "conv_in", "kernel")``."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def make_optimizer(config: Mapping[str, Any],
                   trainable: Callable[[tuple[str, ...]], bool] | None = None
                   ) -> optax.GradientTransformation:
    """AdamW with warmup/decay schedule, global-norm clipping and gradient accumulation.

    With ``trainable``, parameters whose path it rejects are frozen: their updates are zero
    (no weight decay either) and their gradients do not count towards the clipping norm.

    Args:
      config: dict/ConfigDict with ``learning_rate``, ``warmup_steps``, ``schedule``
        ("constant" | "cosine" | "linear"), ``total_steps``, ``weight_decay`` (decoupled,
        multiplied by the learning rate as in AdamW; 0 disables), ``b1``, ``b2``, ``eps``,
        ``grad_clip_norm`` (None/0 disables) and ``grad_accum_steps`` (> 1 wraps the
        optimizer in ``optax.MultiSteps``, which averages k micro-batch gradients).
      trainable: optional predicate on a parameter's path (:func:`param_path`); None trains
        everything.

    Returns:
      The gradient transformation.
    """
    weight_decay = float(_get(config, "weight_decay", 0.0) or 0.0)
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    clip = _get(config, "grad_clip_norm")
    if clip is not None and clip < 0:
        raise ValueError(f"grad_clip_norm must be >= 0 or None, got {clip}")

    parts = []
    if clip:
        # Clip before Adam's moments so one bad batch cannot blow up the second moment.
        parts.append(optax.clip_by_global_norm(float(clip)))
    parts.append(optax.adamw(make_schedule(config), b1=float(_get(config, "b1", 0.9)),
                             b2=float(_get(config, "b2", 0.999)),
                             eps=float(_get(config, "eps", 1e-8)), weight_decay=weight_decay))
    tx = optax.chain(*parts) if len(parts) > 1 else parts[0]
    if trainable is not None:
        def labels(params: PyTree) -> PyTree:
            return jax.tree_util.tree_map_with_path(
                lambda p, _: "train" if trainable(param_path(p)) else "freeze", params)

        tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
    k = _accum_steps(config)
    if k > 1:
        # Clipping sits inside MultiSteps so it sees the accumulated (mean) gradient.
        tx = optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()
    return tx


# ------------------------------------------------------------------------------------------
# EMA
# ------------------------------------------------------------------------------------------


def ema_update(ema: PyTree, params: PyTree, decay: float | jax.Array) -> PyTree:
    """One EMA step: ``decay * ema + (1 - decay) * params``, leaf by leaf, in ema's dtype.

    Args:
      ema: current average.
      params: new parameters (same structure).
      decay: in [0, 1]; 0 copies params, 1 freezes the average.

    Returns:
      The updated average.
    """
    def mix(e, p):
        # e + (1 - decay)(p - e) rather than decay e + (1 - decay) p: the same average, but
        # exactly e when p == e, so frozen parameters keep a bitwise-constant EMA.
        return (e + (1.0 - decay) * (p.astype(e.dtype) - e)).astype(e.dtype)

    return jax.tree.map(mix, ema, params)


# ------------------------------------------------------------------------------------------
# State creation
# ------------------------------------------------------------------------------------------


def _to_key_data(rng: jax.Array) -> jax.Array:
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    if rng.dtype != jnp.uint32:
        raise ValueError(f"rng must be a typed key or uint32 key data, got dtype {rng.dtype}")
    return rng


def _mirror_shardings(tree: PyTree, params: PyTree, param_shardings: PyTree,
                      default: NamedSharding) -> PyTree:
    """Shardings for ``tree`` (e.g. optimizer state): params-shaped subtrees get the params'
    shardings, every other leaf ``default``."""
    params_def = jax.tree.structure(params)
    flat_params = jax.tree.leaves(params)
    flat_shardings = jax.tree.leaves(param_shardings,
                                     is_leaf=lambda x: isinstance(x, NamedSharding))

    def mirrors(x) -> bool:
        return (not isinstance(x, jax.ShapeDtypeStruct)
                and jax.tree.structure(x) == params_def)

    def assign(x):
        if not mirrors(x):
            return default
        # Same tree as params; a leaf of another shape (e.g. factored moments) is replicated.
        leaves = [s if leaf.shape == p.shape else default
                  for leaf, p, s in zip(jax.tree.leaves(x), flat_params, flat_shardings,
                                             strict=True)]
        return jax.tree.unflatten(params_def, leaves)

    return jax.tree.map(assign, tree, is_leaf=mirrors)


def _state_init(init_fn: Callable[[jax.Array], PyTree], optimizer: optax.GradientTransformation,
                ema_decay: float | None) -> Callable[[jax.Array], TrainState]:
    if ema_decay is not None and not 0.0 <= ema_decay <= 1.0:
        raise ValueError(f"ema_decay must be in [0, 1] or None, got {ema_decay}")

    def init(key_data: jax.Array) -> TrainState:
        init_key, state_key = jax.random.split(jax.random.wrap_key_data(key_data))
        params = nn.unbox(init_fn(init_key))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optimizer.init(params),
                          ema=params if ema_decay is not None else None,
                          rng=jax.random.key_data(state_key),
                          skipped=jnp.zeros((), jnp.int32))

    return init


def abstract_train_state(init_fn: Callable[[jax.Array], PyTree],
                         optimizer: optax.GradientTransformation, rng: jax.Array, *,
                         mesh: Mesh, rules: tuple = LOGICAL_RULES,
                         ema_decay: float | None = None) -> tuple[TrainState, TrainState]:
    """The :class:`TrainState` that :func:`create_train_state` would build, as shapes only.

    Nothing is initialised or placed, so it works for meshes of devices this process cannot
    run on (ahead-of-time compiles for a TPU topology, ``benchmarks.pod``).

    Args: as :func:`create_train_state`.

    Returns:
      ``(abstract_state, state_shardings)``: ``jax.ShapeDtypeStruct`` leaves carrying their
      shardings, and the TrainState of NamedShardings.
    """
    key_data = _to_key_data(rng)
    init = _state_init(init_fn, optimizer, ema_decay)
    boxed = jax.eval_shape(init_fn, jax.random.wrap_key_data(key_data))
    logical_specs = nn.get_partition_spec(boxed)
    param_shardings = nn.logical_to_mesh_sharding(logical_specs, mesh, rules)
    abstract = jax.eval_shape(init, key_data)
    rep = replicated(mesh)
    shardings = TrainState(
        step=rep, params=param_shardings,
        opt_state=_mirror_shardings(abstract.opt_state, abstract.params, param_shardings, rep),
        ema=param_shardings if ema_decay is not None else None, rng=rep, skipped=rep)
    placed = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, shardings)
    return placed, shardings


def create_train_state(init_fn: Callable[[jax.Array], PyTree],
                       optimizer: optax.GradientTransformation, rng: jax.Array, *,
                       mesh: Mesh, rules: tuple = LOGICAL_RULES,
                       ema_decay: float | None = None) -> tuple[TrainState, TrainState]:
    """Initialises a :class:`TrainState` directly in its sharded layout.

    Args:
      init_fn: ``rng -> params``, e.g. ``lambda r: model.init(r, x)["params"]``; leaves may be
        boxed with logical names (``nn.with_logical_partitioning``), unboxed leaves are
        replicated.
      optimizer: the gradient transformation whose state to create.
      rng: a typed key or raw uint32 key; split into the init key and the state's key.
      mesh: the device mesh.
      rules: logical-axis -> mesh-axis rules.
      ema_decay: when not None, the state carries an EMA of the params (initialised to them).

    Returns:
      ``(state, state_shardings)``: the state with unboxed, sharded params, and a TrainState
      of NamedShardings with the same structure (for ``jax.jit`` in/out shardings).
    """
    _, shardings = abstract_train_state(init_fn, optimizer, rng, mesh=mesh, rules=rules,
                                        ema_decay=ema_decay)
    init = _state_init(init_fn, optimizer, ema_decay)
    state = jax.jit(init, out_shardings=shardings)(_to_key_data(rng))
    return state, shardings


# ------------------------------------------------------------------------------------------
# Train step
# ------------------------------------------------------------------------------------------


def _cast_floating(tree: PyTree, dtype: Any) -> PyTree:
    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(cast, tree)


def _select(pred: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    state_shardings: TrainState, mesh: Mesh, *,
                    learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None,
                    ema_decay: float | None = None, compute_dtype: Any = None,
                    donate: bool = True) -> Callable[[TrainState, PyTree],
                                                     tuple[TrainState, dict[str, jax.Array]]]:
    """Builds the jitted ``train_step(state, batch) -> (state, metrics)``.

    The step's rng is ``fold_in(state key, state.step)``. A step whose loss or global
    gradient norm is not finite leaves params, optimizer state and EMA untouched and
    increments ``skipped``; ``step`` always advances. Under ``optax.MultiSteps`` the EMA only
    moves when the parameters actually change.

    Args:
      loss_fn: ``(params, batch, rng) -> (scalar loss, metrics dict)``; a loss_fn with a true
        ``takes_step`` attribute is also given ``step=`` the state's step (e.g. to ramp a
        loss weight).
      optimizer: the same transformation the state was created with.
      state_shardings: the shardings returned by :func:`create_train_state`.
      mesh: the device mesh; every batch leaf is split over ("data", "fsdp") on axis 0.
      learning_rate_fn: train-step count -> learning rate (:func:`make_learning_rate_fn`),
        reported as ``learning_rate``; it is fed the number of applied (not skipped) steps,
        which is what the optimizer's own counter sees.
      ema_decay: EMA decay; required iff the state has an EMA.
      compute_dtype: e.g. ``jnp.bfloat16``: params are cast to it inside the loss only, so
        gradients and the state stay float32.
      donate: donate the input state's buffers (the caller must use the returned state).

    Returns:
      The jitted step function. Metrics: the loss_fn's, plus ``loss``, ``grad_norm``,
      ``learning_rate`` (when learning_rate_fn is given), ``skipped`` (the running count) and
      ``update_skipped`` (this step).
    """
    if (state_shardings.ema is None) != (ema_decay is None):
        raise ValueError("ema_decay must be given exactly when the state has an EMA "
                         f"(state ema: {state_shardings.ema is not None}, "
                         f"ema_decay: {ema_decay})")
    param_shardings = state_shardings.params

    def train_step(state: TrainState, batch: PyTree) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def compute_loss(params):
            if compute_dtype is not None:
                # The cast is differentiated, so gradients come back in the master dtype.
                params = _cast_floating(params, compute_dtype)
            extra = {"step": state.step} if getattr(loss_fn, "takes_step", False) else {}
            loss, metrics = loss_fn(params, batch, rng, **extra)
            return loss.astype(jnp.float32), metrics

        (loss, metrics), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.params)
        # Keep gradients in the params' layout: under FSDP this makes XLA reduce-scatter
        # instead of all-reducing full gradients.
        grads = jax.lax.with_sharding_constraint(grads, param_shardings)
        # optax.global_norm is deprecated in favour of optax.tree.norm (same value).
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(grad_norm) & jnp.isfinite(loss)

        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params = _select(ok, params, state.params)
        opt_state = _select(ok, opt_state, state.opt_state)

        ema = state.ema
        if ema is not None:
            moved = ok
            if isinstance(opt_state, optax.MultiStepsState):
                # mini_step wraps to 0 exactly when the accumulated update was applied.
                moved = ok & (opt_state.mini_step == 0)
            ema = _select(moved, ema_update(ema, params, ema_decay), ema)

        skipped = state.skipped + (~ok).astype(jnp.int32)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  ema=ema, skipped=skipped)
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, skipped=skipped,
                       update_skipped=(~ok).astype(jnp.int32))
        if learning_rate_fn is not None:
            metrics["learning_rate"] = jnp.asarray(
                learning_rate_fn(state.step - state.skipped), jnp.float32)
        return new_state, metrics

    return jax.jit(train_step,
                   in_shardings=(state_shardings, batch_sharding(mesh)),
                   out_shardings=(state_shardings, replicated(mesh)),
                   donate_argnums=(0,) if donate else ())


def param_partition_specs(state_shardings: TrainState) -> PyTree:
    """The mesh PartitionSpec of every parameter (handy for logging the layout)."""
    return jax.tree.map(lambda s: s.spec, state_shardings.params,
                        is_leaf=lambda x: isinstance(x, NamedSharding))


__all__ = [
    "TrainState", "abstract_train_state", "create_train_state", "ema_update",
    "make_learning_rate_fn", "make_optimizer", "make_schedule", "make_train_step",
    "param_partition_specs", "param_path",
]
