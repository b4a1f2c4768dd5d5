"""What the ``python -m experiments.<x>`` programs share: :func:`run` (a quiet console, one-line
user errors; see ``flipjax.console``) and the ``--config=... --config.field=...`` flags."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from absl import app

from flipjax import console

# Packages whose log records the programs show at INFO (besides flipjax); the rest of the
# process (orbax, JAX, TensorFlow, tfds, grain) logs from WARNING up unless --verbosity says.
PACKAGES = ("experiments", "data_pipelines")


def parse_flags(argv: list[str]) -> list[str]:
    """``flipjax.console.parse_flags`` (a bad flag is a ``UsageError``: one line under
    :func:`run`), with a readable error for an unknown ``--config.<field>``.

    Pass as ``app.run(main, flags_parser=parse_flags)``.

    Raises:
      app.UsageError: for a bad flag or an override of a field the config does not have.
    """
    try:
        return console.parse_flags(argv)
    except (AttributeError, KeyError) as e:
        # ml_collections raises these (not a flags error) for overrides of absent fields.
        detail: Any = e
        while isinstance(detail, BaseException) and detail.args:
            detail = detail.args[0]  # the KeyError inside, then its ("'name'\nDid you mean...")
        overrides = " ".join(a for a in argv[1:] if a.startswith("--config."))
        raise app.UsageError(f"the config has no field {detail}; check the --config.<field> "
                             f"overrides ({overrides}) against the config file") from None


def config_and_workdir(argv: list[str], config: Any, workdir: Any) -> tuple[Any, str]:
    """The values of the ``--config`` and ``--workdir`` flag holders, both required.

    Raises:
      app.UsageError: for positional arguments, a missing flag or a config file that could
        not be loaded.
    """
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if config.value is None:
        raise app.UsageError("--config is required")
    try:
        config.value.keys()  # ml_collections defers a config file's load error to first use
    except OSError as e:
        cause = e.__cause__ or e  # "Failed loading config file ...", the attempts, the error
        raise app.UsageError(f"--config: {str(cause).strip().splitlines()[-1].strip()}"
                             ) from None
    if not workdir.value:
        raise app.UsageError("--workdir is required")
    return config.value, workdir.value


def run(main: Callable[[list[str]], Any], prog: str) -> None:
    """``absl.app.run(main)`` for an experiments program: this project's INFO records and
    third-party warnings on the console (``--verbosity``/``-v N`` sets every logger to absl
    level N instead), a user error as the one line ``<prog>: error: ...`` with exit status 1
    (the traceback with ``FLIPJAX_DEBUG=1``), and :func:`parse_flags`."""
    console.run(main, prog, packages=PACKAGES, flags_parser=parse_flags)
