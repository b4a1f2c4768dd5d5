"""What every command line of the project shares: a quiet console and one-line user errors.

The programs (``python -m experiments.train``, ``experiments.plan``,
``experiments.metaworld.evaluation``, ``data_pipelines.toy``, ``data_pipelines.build_clips``, ...)
run through :func:`run` (absl programs) or :func:`user_errors` (argparse programs), which

* log the project's own records (``packages``: progress, evaluations, summaries) at INFO and
  everything else (orbax, JAX, TensorFlow, tfds, grain, ...) only from WARNING up. An
  explicit absl ``--verbosity``/``-v`` holds for every logger instead: ``-v 0`` shows all INFO
  records (absl's own default), ``-v 1`` adds DEBUG (e.g. the training config), ``-v -1``
  leaves warnings only;
* turn a user error (``ValueError``, ``FileNotFoundError``, absl's ``UsageError``: a bad flag
  value, a missing directory) into the one line ``<prog>: error: <message>`` on stderr and
  exit status 1. With ``FLIPJAX_DEBUG=1`` in the environment the exception goes through
  unchanged, traceback included.

Only absl is needed; nothing here imports the application.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

DEBUG_ENV = "FLIPJAX_DEBUG"
# Exceptions that describe a mistake of the caller (flag, config field, path), not a bug.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)
# Records of these packages are shown at INFO by default (besides the callers' own).
LIBRARY_PACKAGES = ("flipjax",)


def debug_enabled(environ: dict[str, str] | None = None) -> bool:
    """Whether ``FLIPJAX_DEBUG`` asks for tracebacks (set, and not 0/false/no/off)."""
    value = (os.environ if environ is None else environ).get(DEBUG_ENV, "")
    return value.strip().lower() not in ("", "0", "false", "no", "off")


def error_line(prog: str, error: BaseException) -> str:
    """``<prog>: error: <message>`` on one line (a multi-line message joined with ``; ``)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{prog}: error: {'; '.join(lines) or type(error).__name__}"


def _usage_error() -> type[BaseException]:
    from absl import app

    return app.UsageError


@contextlib.contextmanager
def user_errors(prog: str,
                errors: tuple[type[BaseException], ...] = USER_ERRORS) -> Iterator[None]:
    """Turns a user error raised inside into :func:`error_line` and exit status 1.

    A ``UsageError`` (a missing or contradictory flag) adds ``(--help lists the flags)``.

    Also a decorator (``@user_errors("prog")``). ``errors`` are caught besides absl's
    ``UsageError``; anything else (a bug) keeps its traceback, and so does everything when
    ``FLIPJAX_DEBUG=1``.

    Raises:
      SystemExit: with the one-line message, which Python prints to stderr on exit.
    """
    usage_error = _usage_error()
    try:
        yield
    except (*errors, usage_error) as e:
        if debug_enabled():
            raise
        hint = " (--help lists the flags)" if isinstance(e, usage_error) else ""
        raise SystemExit(error_line(prog, e) + hint) from None


class QuietFilter(logging.Filter):
    """Passes records at ``level`` and above, and the records of ``packages`` at any level.

    A record belongs to a package when its logger is named after it (``logging.getLogger
    (__name__)``) or when the code that logged it lives in the package's directory (absl's
    ``logging.info`` logs everything, third-party libraries included, through the one
    ``absl`` logger, so the caller's file is what tells them apart).
    """

    def __init__(self, packages: Sequence[str], level: int = logging.WARNING):
        super().__init__()
        self.packages = tuple(dict.fromkeys(packages))
        self.level = level
        self._dirs: tuple[str, ...] | None = None
        self._owned: dict[str, bool] = {}  # by pathname: orbax alone logs hundreds of records

    def _package_dirs(self) -> tuple[str, ...]:
        if self._dirs is None:
            import importlib.util

            dirs = []
            for name in self.packages:
                module = sys.modules.get(name)
                paths = list(getattr(module, "__path__", []) or [])
                if not paths:
                    try:
                        spec = importlib.util.find_spec(name)
                    except (ImportError, ValueError):
                        spec = None
                    paths = list(spec.submodule_search_locations or []) if spec else []
                dirs += [os.path.join(os.path.realpath(p), "") for p in paths]
            self._dirs = tuple(dirs)
        return self._dirs

    def owns(self, record: logging.LogRecord) -> bool:
        """Whether ``record`` comes from one of ``packages``."""
        if record.name.split(".")[0] in self.packages:
            return True
        owned = self._owned.get(record.pathname)
        if owned is None:
            path = os.path.realpath(record.pathname) if record.pathname else ""
            owned = any(path.startswith(d) for d in self._package_dirs())
            self._owned[record.pathname] = owned
        return owned

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level or self.owns(record)


def setup_logging(packages: Sequence[str] = (), verbosity: int | None = None) -> None:
    """Logs through absl's handler on stderr: quiet by default, or at an explicit verbosity.

    Args:
      packages: top-level packages whose records show at INFO (``flipjax`` always does).
      verbosity: an absl verbosity the user asked for (-1 WARNING, 0 INFO, 1 DEBUG), applied
        to every logger; None: the project's records at INFO, everything else at WARNING+.
    """
    from absl import logging as absl_logging

    absl_logging.use_absl_handler()  # what app.run does; here also for argparse programs
    handler = absl_logging.get_absl_handler()
    for f in [f for f in handler.filters if isinstance(f, QuietFilter)]:
        handler.removeFilter(f)
    if verbosity is not None:
        absl_logging.set_verbosity(verbosity)
        return
    absl_logging.set_verbosity(absl_logging.INFO)
    handler.addFilter(QuietFilter((*LIBRARY_PACKAGES, *packages)))


def given_verbosity() -> int | None:
    """absl's ``--verbosity``/``-v`` when it was on the command line, else None."""
    from absl import flags

    flag = flags.FLAGS["verbosity"]
    return int(flag.value) if flag.present else None


def flag_error_message(error: BaseException) -> str:
    """An absl flag error's text, a traceback inside it cut to its last line (ml_collections
    reports a config file's ``get_config`` error with the whole traceback)."""
    text = str(error)
    head, sep, tail = text.partition("Traceback (most recent call last)")
    if not sep or debug_enabled():
        return text
    last = [line.strip() for line in tail.splitlines() if line.strip()][-1:]
    return " ".join([head.strip(), *last])


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (``app.parse_flags_with_usage``) with a bad flag raised as a
    ``UsageError`` (one line under :func:`run`) instead of absl's ``FATAL`` message."""
    from absl import app, flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        raise app.UsageError(flag_error_message(e)) from None


def run(main: Callable[[list[str]], Any], prog: str, *, packages: Sequence[str] = (),
        flags_parser: Callable[[list[str]], Any] | None = None) -> None:
    """``absl.app.run(main)`` with :func:`setup_logging` and :func:`user_errors`.

    Args:
      main: the program, ``argv -> None``.
      prog: its name in error lines (``build_clips``, ``train``).
      packages: top-level packages of the program whose records show at INFO.
      flags_parser: as in ``app.run`` (default :func:`parse_flags`); a user error while
        parsing (a bad flag value, a config file that rejects its argument) is one line too.
    """
    from absl import app

    parse = flags_parser or parse_flags

    def parse_or_exit(argv: list[str]) -> Any:
        with user_errors(prog):
            return parse(argv)

    def quiet_main(argv: list[str]) -> Any:
        setup_logging(packages, given_verbosity())
        with user_errors(prog):
            return main(argv)

    app.run(quiet_main, flags_parser=parse_or_exit)


__all__ = ["DEBUG_ENV", "USER_ERRORS", "QuietFilter", "debug_enabled", "error_line",
           "flag_error_message", "given_verbosity", "parse_flags", "run", "setup_logging",
           "user_errors"]
