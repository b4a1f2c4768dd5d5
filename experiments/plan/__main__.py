"""``python -m experiments.plan``: the command line of :mod:`experiments.plan`."""

from __future__ import annotations

import os
from typing import Any

from absl import flags, logging
from ml_collections import config_flags

from experiments import cli
from experiments.plan.runner import run


def define_flags() -> tuple[Any, Any]:
    """Defines ``--config`` and ``--workdir`` (only when run as a program: the training CLI,
    imported next to this module by tests and notebooks, defines flags of the same names)."""
    config = config_flags.DEFINE_config_file(
        "config", None, "Planning config file, optionally with an argument: "
        "path.py[:runlocal].", lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, "Output directory (plans, media, summary).")
    return config, workdir


def main(argv: list[str], flag_holders: tuple[Any, Any]) -> None:
    config, workdir = cli.config_and_workdir(argv, *flag_holders)
    logging.debug("config:\n%s", config)
    run(config, workdir)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _flags = define_flags()
    cli.run(lambda argv: main(argv, _flags), "plan")
