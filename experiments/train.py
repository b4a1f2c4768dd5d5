"""Training entry point: one config file per experiment, one trainer module per FLIP module.

    python -m experiments.train --config=experiments/configs/cvae.py:S --workdir=DIR \
        [--config.total_steps=1000 --config.data_dir=CLIPS ...]
    python -m experiments.train --config=experiments/configs/cvae.py:S,runlocal \
        --workdir=/tmp/cvae_local

``config.trainer`` names a module of ``experiments.trainers`` whose
``train_and_evaluate(config, workdir)`` runs the job; rerunning with the same workdir resumes
from its latest checkpoint. With ``config.distributed`` (multi-host) the process joins the
cluster through ``jax.distributed.initialize()`` before anything touches the devices; JAX
detects SLURM, Open MPI, Kubernetes and Cloud TPU, and elsewhere (e.g. several processes on one
machine) the environment gives ``JAX_COORDINATOR_ADDRESS`` (host:port), ``JAX_NUM_PROCESSES``
and ``JAX_PROCESS_ID``.

The console shows the project's progress and third-party warnings (``--verbosity=0``: every
INFO record, orbax and JAX included; ``--verbosity=1``: also the config); a user error (a
missing data directory, a bad field value) is one line ``train: error: ...`` and exit status
1, with the traceback when ``FLIPJAX_DEBUG=1``.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from collections.abc import Callable
from typing import Any

from absl import flags, logging
from ml_collections import config_flags

from experiments import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file with its argument: path.py:VARIANT[,runlocal] (e.g. dit.py:L).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).")


def available_trainers() -> list[str]:
    """Names of the modules in ``experiments.trainers`` usable as ``config.trainer``."""
    from experiments import trainers

    return sorted(m.name for m in pkgutil.iter_modules(trainers.__path__)
                  if not m.name.startswith("_"))


def get_trainer(name: str) -> Callable[[Any, str], Any]:
    """``experiments.trainers.<name>.train_and_evaluate``.

    Raises:
      ValueError: for an unknown trainer (listing the available ones) or a module without
        ``train_and_evaluate``.
    """
    available = available_trainers()
    if name not in available:
        raise ValueError(f"unknown trainer {name!r} (config.trainer); available trainers: "
                         f"{', '.join(available) or 'none'}")
    module = importlib.import_module(f"experiments.trainers.{name}")
    fn = getattr(module, "train_and_evaluate", None)
    if not callable(fn):
        raise ValueError(f"experiments.trainers.{name} has no train_and_evaluate(config, "
                         "workdir)")
    return fn


def distributed_args(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """``jax.distributed.initialize`` arguments from the environment.

    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (integers) are passed when set; JAX itself
    reads ``JAX_COORDINATOR_ADDRESS`` and auto-detects whatever is left on known clusters.

    Raises:
      ValueError: for a variable that is not an integer.
    """
    environ = os.environ if environ is None else environ
    args = {}
    for name, key in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        value = environ.get(name)
        if value:
            try:
                args[key] = int(value)
            except ValueError:
                raise ValueError(f"{name} must be an integer, got {value!r}") from None
    return args


def main(argv: list[str]) -> None:
    config, workdir = cli.config_and_workdir(argv, _CONFIG, _WORKDIR)
    # Resolve the trainer first: a typo should fail before minutes of device setup.
    train_and_evaluate = get_trainer(config.trainer)
    if config.get("distributed", False):
        import jax

        jax.distributed.initialize(**distributed_args())
    import jax

    logging.info("JAX process %d/%d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    # Every field, at --verbosity=1 (each checkpoint's metadata and TensorBoard's hparams
    # keep it too).
    logging.debug("config:\n%s", config)
    train_and_evaluate(config, workdir)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cli.run(main, "train")
