"""Checkpoints for the trainers, on top of orbax's ``CheckpointManager``.

Layout: ``<workdir>/checkpoints/<step>/{state,data,meta}``.

* ``state``: any pytree of jax/numpy arrays and Python scalars (params, optax state, EMA
  params, step, PRNG keys), written with orbax's standard (PyTree) handler.
* ``data``: the input pipeline's iterator state (e.g. grain's ``iterator.get_state()``), JSON.
  In a multi-process job every process reads its own data shard, so the states of all
  processes are gathered and stored together; each process restores its own.
* ``meta``: JSON with the step, the wall time and whatever the caller adds (the config).

PRNG keys: new-style typed keys (``jax.random.key``) round-trip as they are with orbax 0.12;
raw ``uint32`` keys (``jax.random.PRNGKey`` or ``jax.random.key_data(key)``) round-trip as
plain arrays. When a restore has to work without a target (:func:`load_params`, notebooks),
store ``jax.random.key_data(key)`` and re-wrap it with ``jax.random.wrap_key_data`` after
loading, since a target-free restore of a typed key depends on orbax's key metadata.

Preemption: :func:`handle_preemption` turns SIGTERM/SIGINT into a flag
(:meth:`Checkpointer.should_stop`) that the training loop polls; the loop then saves with
``force=True`` and returns. Saving inside the signal handler is unsafe (it could interrupt a
jitted step or an ongoing save), so the handler only sets the flag.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

STATE, DATA, META = "state", "data", "meta"
ITEMS = (STATE, DATA, META)
# Written by orbax when a step is finalised; an integer-named directory without it is a
# leftover of a crash or of a partial copy and is not restorable.
_FINALISED_MARKERS = ("_CHECKPOINT_METADATA", "commit_success.txt")


def checkpoint_dir(workdir: str | Path) -> Path:
    """Returns the (absolute) directory holding the step directories of a training run."""
    # Absolute: orbax's asynchronous writers refuse relative paths (and the process's working
    # directory may change while a save is in flight).
    return Path(workdir).absolute() / "checkpoints"


def _is_finalised(step_dir: Path) -> bool:
    return any((step_dir / name).exists() for name in _FINALISED_MARKERS)


def _valid_steps(manager: ocp.CheckpointManager) -> list[int]:
    """Steps orbax lists that were also completely written (sorted ascending)."""
    root = Path(manager.directory)
    steps = []
    for step in manager.all_steps():
        if _is_finalised(root / str(step)):
            steps.append(step)
        else:
            log.warning("ignoring incomplete checkpoint directory %s", root / str(step))
    return sorted(steps)


def _encode_data_state(data_state: Any) -> dict:
    """Wraps the iterator state so that None and bytes survive the JSON round trip exactly."""
    if data_state is None:
        return {"kind": "none", "value": None}
    if isinstance(data_state, bytes):
        # grain's DataLoader iterators return their state as bytes.
        return {"kind": "bytes", "value": base64.b64encode(data_state).decode("ascii")}
    try:
        round_trip = json.loads(json.dumps(data_state))
    except (TypeError, ValueError) as e:
        raise ValueError(f"data_state must be JSON-serialisable, got {type(data_state)}: {e}") \
            from e
    if round_trip != data_state:
        # Tuples, non-string keys, ... would silently change type on restore.
        raise ValueError("data_state does not round-trip through JSON exactly (tuples or "
                         "non-string dict keys?); convert it to lists/str keys first")
    return {"kind": "json", "value": data_state}


def _gather_process_states(encoded: dict) -> list[dict]:
    """Every process's encoded data state, in process order.

    A collective: every process must call it (they all save the same steps).
    """
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(encoded).encode(), np.uint8)
    # process_allgather needs equal shapes: gather the lengths, then the padded bytes.
    lengths = np.asarray(multihost_utils.process_allgather(np.int32(raw.size))).ravel()
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:raw.size] = raw
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, lengths, strict=True)]


def _decode_data_state(stored: Mapping[str, Any] | None) -> Any:
    if stored is None or stored.get("kind") == "none":
        return None
    if stored["kind"] == "per_process":
        states = stored["value"]
        if len(states) == jax.process_count():
            return _decode_data_state(states[jax.process_index()])
        if all(s == states[0] for s in states):
            return _decode_data_state(states[0])
        raise ValueError(f"the checkpoint holds the data iterator states of {len(states)} "
                         f"processes, this job has {jax.process_count()}; the data position "
                         "cannot be resumed with another process count")
    if stored["kind"] == "bytes":
        return base64.b64decode(stored["value"])
    return stored["value"]


def _default_sharding() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _abstract_target(target: Any) -> Any:
    """Turns a target pytree into ShapeDtypeStructs that all carry a sharding.

    Orbax restores a leaf without a sharding as whatever type was saved (numpy for numpy
    leaves), so leaves without one are placed on the first local device to always get jax
    arrays back.
    """
    def leaf(x: Any) -> jax.ShapeDtypeStruct:
        if isinstance(x, jax.ShapeDtypeStruct | jax.Array):
            sharding = getattr(x, "sharding", None)
            return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                        sharding=sharding or _default_sharding())
        x = np.asarray(x)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_default_sharding())

    return jax.tree.map(leaf, target)


def _to_jax(tree: Any) -> Any:
    """Converts numpy leaves (orbax's choice for target-free restores) to jax arrays."""
    return jax.tree.map(lambda x: jnp.asarray(x) if isinstance(x, np.ndarray | np.generic)
                        else x, tree)


class Checkpointer:
    """Saves and restores ``state``/``data``/``meta`` per step under ``workdir/checkpoints``.

    Every process of a multi-host job must call :meth:`save` and :meth:`restore` with the same
    arguments (orbax coordinates the writes).
    """

    def __init__(self, workdir: str | Path, *, keep: int | None = 3,
                 save_every: int | None = None, async_save: bool = True) -> None:
        """Opens (creating if needed) the checkpoint directory of a run.

        Args:
          workdir: run directory; checkpoints go to ``workdir/checkpoints/<step>``.
          keep: number of most recent checkpoints kept; older ones are deleted. None keeps all.
          save_every: :meth:`save` only writes steps divisible by this (unless forced);
            None writes every step it is called with.
          async_save: write in a background thread; :meth:`wait` blocks until done.

        Raises:
          ValueError: for a non-positive ``keep`` or ``save_every``.
        """
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1 or None, got {keep}")
        if save_every is not None and save_every < 1:
            raise ValueError(f"save_every must be >= 1 or None, got {save_every}")
        self.workdir = Path(workdir)
        self.directory = checkpoint_dir(workdir)
        self.keep = keep
        self.save_every = save_every
        self._preempted = threading.Event()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            # The save/skip decision is ours (save_every, force); orbax is always forced.
            save_interval_steps=1,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    # ---------------------------------------------------------------- saving

    def should_save(self, step: int, force: bool = False) -> bool:
        """Whether :meth:`save` would write ``step`` (save_every and existing steps)."""
        if step in self._manager.all_steps():
            return False
        return force or self.save_every is None or step % self.save_every == 0

    def save(self, step: int, state: Any, data_state: Any = None,
             meta: Mapping[str, Any] | None = None, force: bool = False) -> bool:
        """Saves a step (in the background when ``async_save``).

        Args:
          step: training step; the directory name.
          state: pytree of arrays/scalars (params, opt_state, ema, step, rng).
          data_state: this process's data iterator state: a JSON-serialisable dict (or
            grain's bytes), or None.
          meta: extra JSON metadata (e.g. the config); ``step`` and ``wall_time`` are added.
            Values JSON cannot represent are stored as their ``str``.
          force: ignore ``save_every`` (e.g. on preemption or at the last step).

        Returns:
          True when a save was started, False when skipped (save_every, or the step already
          exists).

        Raises:
          ValueError: for a negative step or a data_state that is not exactly JSON-serialisable.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if not self.should_save(step, force):
            return False
        data = _encode_data_state(data_state)
        if jax.process_count() > 1:
            # Orbax writes JSON items from the primary process only.
            data = {"kind": "per_process", "value": _gather_process_states(data)}
        # Serialising here rather than in orbax's background thread makes bad metadata fail
        # at the call site instead of asynchronously.
        meta_json = json.loads(json.dumps(
            {**(meta or {}), "step": int(step), "wall_time": time.time()}, default=str))
        args = ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(state),
            DATA: ocp.args.JsonSave(data),
            META: ocp.args.JsonSave(meta_json),
        })
        return bool(self._manager.save(step, args=args, force=True))

    def wait(self) -> None:
        """Blocks until all pending asynchronous saves are written (re-raising their errors)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases orbax's resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------- restoring

    def all_steps(self) -> list[int]:
        """All completely written steps, ascending (an asynchronous save still in flight is
        not listed until it is finalised)."""
        return _valid_steps(self._manager)

    def latest_step(self) -> int | None:
        """The newest completely written step, or None when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def restore(self, step: int | None = None,
                target: Any = None) -> tuple[Any, Any, dict[str, Any]]:
        """Restores a step's state, data iterator state and metadata.

        Args:
          step: step to restore; default the latest one.
          target: optional abstract pytree of the state (e.g. ``jax.eval_shape`` of the
            initial state, or the initial state itself). Its structure (optax NamedTuples,
            ...), dtypes and shardings are used; leaves without a sharding land on the first
            local device. Without a target, containers come back as dicts/lists.

        Returns:
          ``(state, data_state, meta)``; ``data_state`` is this process's; state leaves are
          jax arrays (Python scalars stay scalars when restoring without a target).

        Raises:
          FileNotFoundError: when the run has no checkpoint.
          ValueError: when ``step`` is not among the saved steps.
        """
        # A save still in flight is the newest state: wait for it rather than restore older.
        self._manager.wait_until_finished()
        step = _resolve_step(self.workdir, self.all_steps(), step)
        state_args = (ocp.args.StandardRestore() if target is None
                      else ocp.args.StandardRestore(_abstract_target(target)))
        restored = self._manager.restore(step, args=ocp.args.Composite(**{
            STATE: state_args, DATA: ocp.args.JsonRestore(), META: ocp.args.JsonRestore()}))
        state = _to_jax(restored[STATE])
        return state, _decode_data_state(restored[DATA]), dict(restored[META] or {})

    # -------------------------------------------------------------- preemption

    @property
    def preempted(self) -> bool:
        """True once SIGTERM/SIGINT arrived under :func:`handle_preemption`."""
        return self._preempted.is_set()

    def request_stop(self) -> None:
        """Sets the preemption flag (what the signal handler does)."""
        self._preempted.set()

    def should_stop(self, step: int | None = None) -> bool:
        """Whether the training loop should save and exit.

        Args:
          step: current step; when given, JAX's multi-host preemption sync point is also
            checked (so all hosts stop at the same step). Harmless on a single host.

        Returns:
          True after a preemption signal or at a reached preemption sync point.
        """
        if self.preempted:
            return True
        return step is not None and bool(self._manager.reached_preemption(step))


def _resolve_step(workdir: Path, steps: Sequence[int], step: int | None) -> int:
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(workdir)} "
                                f"(workdir {workdir})")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise ValueError(f"no checkpoint for step {step} in {checkpoint_dir(workdir)}; "
                         f"available steps: {list(steps)}")
    return step


def install_signal_handlers(
        checkpointer: Checkpointer,
        signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> Callable[[], None]:
    """Makes the given signals set ``checkpointer``'s preemption flag.

    A second SIGINT after the flag is set raises KeyboardInterrupt, so a user can still abort
    a loop that does not poll the flag. Signal handlers can only be installed from the main
    thread; elsewhere this logs a warning and installs nothing.

    Args:
      checkpointer: whose :meth:`Checkpointer.should_stop` becomes True on a signal.
      signals: signal numbers to catch.

    Returns:
      A function that reinstates the previous handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        log.warning("not in the main thread: preemption signals are not caught")
        return lambda: None

    def handler(signum: int, frame: object) -> None:
        if signum == signal.SIGINT and checkpointer.preempted:
            raise KeyboardInterrupt
        log.warning("received signal %d: saving and stopping at the next step", signum)
        checkpointer.request_stop()

    previous = {s: signal.signal(s, handler) for s in signals}

    def uninstall() -> None:
        for s, old in previous.items():
            # getsignal returns None for handlers not installed from Python; SIG_DFL is the
            # closest valid replacement.
            signal.signal(s, old if old is not None else signal.SIG_DFL)

    return uninstall


@contextlib.contextmanager
def handle_preemption(
        checkpointer: Checkpointer,
        signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[Checkpointer]:
    """Context manager form of :func:`install_signal_handlers`.

    Usage::

        with handle_preemption(ckpt):
            for step in range(start, steps):
                state = train_step(state, next(it))
                ckpt.save(step, state, it.get_state())
                if ckpt.should_stop(step):
                    ckpt.save(step, state, it.get_state(), force=True)
                    break
        ckpt.close()

    Args:
      checkpointer: whose preemption flag the signals set.
      signals: signal numbers to catch.

    Yields:
      ``checkpointer``; the previous handlers are back in place on exit.
    """
    uninstall = install_signal_handlers(checkpointer, signals)
    try:
        yield checkpointer
    finally:
        uninstall()


def load_params(workdir: str | Path, step: int | None = None, ema: bool = False) -> Any:
    """Loads the parameters of a run without knowing its optimizer.

    Only the ``params`` (or ``ema``) subtree of the ``state`` item is read, onto the first
    local device.

    Args:
      workdir: the run directory given to :class:`Checkpointer`.
      step: step to load; default the latest.
      ema: load ``state["ema"]`` instead of ``state["params"]``.

    Returns:
      The parameter pytree (dicts of jax arrays).

    Raises:
      FileNotFoundError: when the run has no checkpoint.
      ValueError: for a missing step, or ``ema=True`` when no EMA was saved.
    """
    workdir = Path(workdir)
    directory = checkpoint_dir(workdir)
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint directory {directory} (workdir {workdir})")
    key = "ema" if ema else "params"
    # A PyTree handler (same on-disk format as StandardSave) is needed for the metadata and
    # the partial restore that skips the optimizer state.
    manager = ocp.CheckpointManager(
        directory, item_handlers={STATE: ocp.PyTreeCheckpointHandler(),
                                  DATA: ocp.JsonCheckpointHandler(),
                                  META: ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    try:
        step = _resolve_step(workdir, _valid_steps(manager), step)
        tree = manager.item_metadata(step)[STATE]
        tree = getattr(tree, "tree", tree)
        if not isinstance(tree, Mapping) or tree.get(key) is None:
            found = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
            raise ValueError(f"checkpoint step {step} of {workdir} has no state[{key!r}] "
                             f"(state keys: {found})"
                             + ("; was the run trained without EMA?" if ema else ""))
        item = {key: tree[key]}
        sharding = _default_sharding()
        restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding), item)
        restored = manager.restore(step, args=ocp.args.Composite(**{
            STATE: ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                          partial_restore=True)}))
    finally:
        manager.close()
    return _to_jax(restored[STATE][key])


def load_meta(workdir: str | Path, step: int | None = None) -> dict[str, Any]:
    """The JSON metadata saved with a step (the trainers store their config under "config").

    Args:
      workdir: the run directory given to :class:`Checkpointer`.
      step: step to read; default the latest.

    Returns:
      The metadata dict, with ``step`` and ``wall_time``.

    Raises:
      FileNotFoundError: when the run has no checkpoint.
      ValueError: for a missing step.
    """
    workdir = Path(workdir)
    directory = checkpoint_dir(workdir)
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint directory {directory} (workdir {workdir})")
    manager = ocp.CheckpointManager(
        directory, item_handlers={META: ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    try:
        step = _resolve_step(workdir, _valid_steps(manager), step)
        restored = manager.restore(step, args=ocp.args.Composite(**{
            META: ocp.args.JsonRestore()}))
    finally:
        manager.close()
    return dict(restored[META] or {})
