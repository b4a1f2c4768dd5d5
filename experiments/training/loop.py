"""The generic training loop every trainer runs (mesh, resume, logging, checkpoints, eval).

A trainer supplies the model-specific pieces (``init_fn``, ``loss_fn``, a data-loader factory
and optionally an eval factory) and calls :func:`train`. The loop:

* builds the ``data x fsdp x tensor`` mesh from ``config.mesh`` (-1 fills the devices);
* creates the sharded state, or resumes the latest checkpoint of ``workdir`` together with
  the data iterator's position, so an interrupted run continues bit-for-bit;
* logs every ``log_every`` steps through clu metric writers
  (:mod:`experiments.training.logging_utils`): a console line (loss, steps/s, examples/s,
  ETA), ``workdir/metrics.jsonl`` (one JSON object per line) and TensorBoard event files in
  ``workdir/tensorboard`` (both process 0 only), with the peak host memory
  (``host_peak_rss_mb``) and, where the backend reports it, the peak device memory
  (``device_peak_memory_mb``);
* checkpoints every ``checkpoint_every`` steps, at the end and on SIGTERM/SIGINT (then
  returns cleanly);
* runs the trainer's eval hook every ``eval_every`` steps and at the last step; its sample
  images/videos go to ``workdir/samples`` and to TensorBoard;
* traces steps ``profile_start_step .. profile_start_step + profile_steps - 1`` with
  ``jax.profiler`` into ``workdir/profile`` when ``profile_start_step > 0`` (process 0).

Determinism: parameters come from ``config.seed``, the step rng is folded from the state's
key and step, and the loader is seeded with ``config.seed``, so a run is a function of its
config.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from experiments.training import common
from flipjax import builders
from flipjax.checkpoints import Checkpointer, handle_preemption
from flipjax.sharding import create_mesh

PyTree = Any
# An eval hook returns scalars (logged) and optionally samples: uint8 arrays [H W 3] (images,
# written as PNG) or [T H W 3] (videos, written as GIF) under workdir/samples/.
EvalFn = Callable[[common.TrainState, int], Mapping[str, Any]]
SAMPLES_DIR = "samples"
METRICS_FILE = "metrics.jsonl"
PROFILE_DIR = "profile"


class Loader(Protocol):
    """What the loop needs from a data loader (``data_pipelines.loader.ClipLoader``)."""

    def __next__(self) -> PyTree: ...

    def get_state(self) -> Any: ...

    def set_state(self, state: Any) -> None: ...


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------


def make_mesh(config: ml_collections.ConfigDict) -> Mesh:
    """The mesh of ``config.mesh`` (data/fsdp/tensor; -1 for data fills the devices).

    Raises:
      ValueError: when the mesh does not fit the devices or the global batch does not split
        over the mesh's batch axes.
    """
    m = config.mesh
    mesh = create_mesh(int(m.data), int(m.fsdp), int(m.tensor))
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.batch_size % shards:
        raise ValueError(f"batch_size {config.batch_size} must divide by the {shards} batch "
                         f"shards of mesh {dict(mesh.shape)}; set --config.batch_size or "
                         "--config.mesh.data/fsdp")
    return mesh


def parameter_overview(params: PyTree) -> str:
    """A short table of parameter counts: the total and one line per top-level module.

    Args:
      params: the (unboxed) parameter tree, a nested mapping.

    Returns:
      Multi-line text.
    """
    def count(tree: PyTree) -> int:
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))

    total = count(params)
    lines = [f"parameters: {total:,}"]
    if isinstance(params, Mapping):
        width = max((len(str(k)) for k in params), default=0)
        for name in sorted(params):
            n = count(params[name])
            lines.append(f"  {name:<{width}}  {n:>12,}  {100 * n / max(total, 1):5.1f}%")
    return "\n".join(lines)


def _host_mean(history: list[dict[str, jax.Array]]) -> dict[str, float]:
    # One transfer for the whole interval: the loop never blocks on a step in between.
    fetched = jax.device_get(history)
    keys = fetched[-1].keys()
    return {k: float(np.mean([np.asarray(m[k], np.float64) for m in fetched])) for k in keys}


class ProfileWindow:
    """Traces a window of training steps with ``jax.profiler`` (process 0 only).

    Steps ``start .. start + steps - 1`` (1-based, as the loop counts them) are traced into
    ``logdir``; the trace stops after the last traced step's state is ready, so the trace
    holds that step's device work. ``start = 0`` disables it. A resumed run that starts past
    ``start`` traces nothing.
    """

    def __init__(self, start: int, steps: int, logdir: str | Path):
        if start < 0:
            raise ValueError(f"profile_start_step must be >= 0 (0 disables), got {start}")
        if start and steps < 1:
            raise ValueError(f"profile_steps must be >= 1, got {steps}")
        self.start, self.stop_step = int(start), int(start) + int(steps) - 1
        self.logdir = Path(logdir)
        self.enabled = bool(start) and jax.process_index() == 0
        self.active = False

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, workdir: str | Path
                    ) -> ProfileWindow:
        """The window of ``config.profile_start_step`` / ``profile_steps`` (default 5)."""
        steps = config.get("profile_steps", 5)
        return cls(int(config.get("profile_start_step", 0) or 0),
                   5 if steps is None else int(steps), Path(workdir) / PROFILE_DIR)

    def before_step(self, step: int) -> None:
        """Starts the trace when ``step`` opens the window."""
        if self.enabled and step == self.start:
            self.logdir.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.logdir))
            self.active = True
            logging.info("profiling steps %d-%d into %s", self.start, self.stop_step,
                         self.logdir)

    def after_step(self, step: int, outputs: PyTree) -> None:
        """Stops the trace after the window's last step, once ``outputs`` are computed."""
        if self.active and step >= self.stop_step:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        """Stops a running trace (a run that ends or is preempted inside the window)."""
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            logging.info("profile written to %s", self.logdir)


def _memory_metrics() -> dict[str, float]:
    from experiments.training import logging_utils

    out = {"host_peak_rss_mb": logging_utils.host_peak_rss_mb()}
    device = logging_utils.device_peak_memory_mb()
    if device is not None:
        out["device_peak_memory_mb"] = device
    return out


def _load_pretrained(state: common.TrainState, shardings: common.TrainState,
                     params: PyTree) -> common.TrainState:
    """Places host ``params`` into the state's layout (params and EMA), checking the tree."""
    want = jax.tree.structure(state.params)
    if jax.tree.structure(params) != want:
        raise ValueError("pretrained parameters do not match the model's parameter tree")
    for got, ref, path in zip(jax.tree.leaves(params), jax.tree.leaves(state.params),
                              jax.tree_util.tree_flatten_with_path(state.params)[0], strict=True):
        if tuple(np.shape(got)) != ref.shape:
            raise ValueError(f"pretrained parameter {'/'.join(common.param_path(path[0]))}: "
                             f"shape {tuple(np.shape(got))} != model {ref.shape}")
    params = jax.tree.map(lambda x, r, s: jax.device_put(np.asarray(x, r.dtype), s), params,
                          state.params, shardings.params)
    ema = None if state.ema is None else jax.tree.map(jnp.copy, params)
    return state.replace(params=params, ema=ema)


def split_samples(results: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Separates an eval hook's scalars from its sample images/videos (uint8 arrays)."""
    scalars, samples = {}, {}
    for k, v in results.items():
        a = np.asarray(jax.device_get(v))
        if a.dtype == np.uint8 and a.ndim in (3, 4):
            samples[k] = a
        elif a.ndim == 0:
            scalars[k] = float(a)
        else:
            raise ValueError(f"eval result {k!r}: expected a scalar or uint8 image [H W 3] / "
                             f"video [T H W 3], got {a.dtype}{list(a.shape)}")
    return scalars, samples


def write_samples(workdir: str | Path, step: int, samples: Mapping[str, np.ndarray]) -> list[Path]:
    """Writes ``samples`` to ``workdir/samples/<name>_<step>.{png,gif}`` (process 0 only).

    Returns:
      The paths written.
    """
    from flipjax import viz

    if jax.process_index() != 0 or not samples:
        return []
    out = Path(workdir) / SAMPLES_DIR
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, a in samples.items():
        path = out / f"{name}_{int(step):08d}.{'png' if a.ndim == 3 else 'gif'}"
        (viz.write_image if a.ndim == 3 else viz.write_video)(path, a)
        paths.append(path)
    return paths


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    """The records of ``workdir/metrics.jsonl`` (empty when absent)."""
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------


def train(config: ml_collections.ConfigDict, workdir: str | Path, *,
          init_fn: Callable[[jax.Array], PyTree], loss_fn: common.LossFn,
          make_loader: Callable[[Mesh], Loader],
          make_eval: Callable[[Mesh], EvalFn] | None = None,
          trainable: Callable[[tuple[str, ...]], bool] | None = None,
          pretrained: Callable[[], PyTree] | None = None) -> common.TrainState:
    """Trains (or resumes training) to ``config.total_steps``.

    Args:
      config: a locked config with the ``experiments/configs/common.py`` base fields.
      workdir: run directory (checkpoints, metrics.jsonl); resumed when it has checkpoints.
      init_fn: ``rng -> params`` (logically partitioned).
      loss_fn: ``(params, batch, rng) -> (loss, metrics)``.
      make_loader: ``mesh -> loader`` yielding global batches sharded over the mesh.
      make_eval: ``mesh -> eval_fn(state, step) -> metrics``; None disables evaluation.
      trainable: predicate on parameter paths (``common.param_path``); rejected parameters
        are frozen (e.g. the encoder when fine-tuning a decoder). None trains everything.
      pretrained: ``() -> params`` (host arrays, same tree as ``init_fn``'s, unboxed) loaded
        into a fresh run's params and EMA; ignored when resuming from a checkpoint.

    Returns:
      The final state (after a preemption: the state that was saved).
    """
    # Imported here, not at module level, so that importing a trainer (configs, model
    # builders) stays light: clu brings TensorFlow for the event files. A missing `train`
    # extra still fails before any work.
    from experiments.training import logging_utils

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    total = int(config.total_steps)
    if total < 1:
        raise ValueError(f"total_steps must be >= 1, got {total}")
    for name in ("log_every", "checkpoint_every"):
        if int(config[name]) < 1:
            raise ValueError(f"{name} must be >= 1, got {config[name]}")
    mesh = make_mesh(config)
    logging.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.devices.size,
                 jax.devices()[0].platform)

    tx = common.make_optimizer(config, trainable)
    ema_decay = config.get("ema_decay")
    state, shardings = common.create_train_state(
        init_fn, tx, jax.random.key(int(config.seed)), mesh=mesh, ema_decay=ema_decay)
    train_step = common.make_train_step(
        loss_fn, tx, shardings, mesh, learning_rate_fn=common.make_learning_rate_fn(config),
        ema_decay=ema_decay, compute_dtype=builders.compute_dtype(config))
    logging.info("%s", parameter_overview(state.params))

    ckpt = Checkpointer(workdir, keep=config.get("keep_checkpoints", 3),
                        save_every=int(config.checkpoint_every),
                        async_save=bool(config.get("async_checkpointing", True)))
    loader = make_loader(mesh)
    start = ckpt.latest_step() or 0
    if start:
        # The abstract target keeps the live layout; the fresh state is freed before restore.
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                             sharding=x.sharding), state)
        del state
        state, data_state, _ = ckpt.restore(start, target=target)
        if data_state is None:
            raise ValueError(f"checkpoint {start} in {workdir} has no data iterator state; "
                             "cannot resume exactly")
        loader.set_state(data_state)
        logging.info("resumed from step %d of %s", start, workdir)
    elif pretrained is not None:
        state = _load_pretrained(state, shardings, pretrained())
        logging.info("initialised from pretrained parameters")
    if start >= total:
        logging.info("step %d already reaches total_steps=%d; nothing to train", start, total)
        ckpt.close()
        return state

    eval_fn = make_eval(mesh) if make_eval is not None else None
    eval_every = int(config.get("eval_every", 0) or 0)
    profile = ProfileWindow.from_config(config, workdir)
    writer = logging_utils.create_writer(workdir, total, metrics_file=METRICS_FILE)
    if not start:
        writer.write_hparams(logging_utils.flatten_hparams(config))
    meta = {"config": config.to_json_best_effort()}
    log_every = int(config.log_every)
    history: list[dict[str, jax.Array]] = []
    t_last, step_last = time.perf_counter(), start
    waited = 0.0  # seconds blocked on the loader since the last log line
    step = start
    try:
        with handle_preemption(ckpt):
            for step in range(start + 1, total + 1):
                profile.before_step(step)
                # Dispatch is asynchronous, so the host only blocks here when the loader is
                # slower than the device: this is the time the step waited for input.
                t_in = time.perf_counter()
                batch = next(loader)
                waited += time.perf_counter() - t_in
                state, metrics = train_step(state, batch)
                profile.after_step(step, (state, metrics))
                history.append(metrics)
                if step % log_every == 0 or step == total:
                    means = _host_mean(history)
                    history = []
                    now = time.perf_counter()
                    rate = (step - step_last) / max(now - t_last, 1e-9)
                    wait_fraction = min(waited / max(now - t_last, 1e-9), 1.0)
                    t_last, step_last, waited = now, step, 0.0
                    means.update(steps_per_s=rate, examples_per_s=rate * config.batch_size,
                                 input_wait_fraction=wait_fraction,
                                 **_memory_metrics())
                    writer.write_scalars(step, {f"train/{k}": v for k, v in means.items()})
                if eval_fn is not None and ((eval_every and step % eval_every == 0)
                                            or step == total):
                    t0 = time.perf_counter()
                    results, samples = split_samples(eval_fn(state, step))
                    write_samples(workdir, step, samples)
                    logging_utils.write_sample_images(writer, step, samples)
                    results["eval_seconds"] = time.perf_counter() - t0
                    writer.write_scalars(step, {f"eval/{k}": v for k, v in results.items()})
                    # Evaluation time is not training throughput.
                    t_last += time.perf_counter() - t0
                ckpt.save(step, state, loader.get_state(), meta=meta)
                if ckpt.should_stop(step):
                    logging.warning("preempted: saving step %d and stopping", step)
                    break
            ckpt.save(step, state, loader.get_state(), meta=meta, force=True)
    finally:
        profile.close()
        writer.close()
    ckpt.close()
    return state
