"""flipjax.console: the programs' quiet console (own INFO records, third-party warnings) and
one-line user errors (tracebacks with FLIPJAX_DEBUG=1). The train CLI's own errors are
tested in tests/experiments/test_loop.py."""

import logging
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
from absl import app

from flipjax import console

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _record(name="absl", level=logging.INFO, pathname="/elsewhere/lib.py"):
    return logging.LogRecord(name, level, pathname, 1, "message", None, None)


def test_quiet_filter_keeps_own_records_and_third_party_warnings():
    quiet = console.QuietFilter(("flipjax",))
    own_file = str(ROOT / "flipjax" / "checkpoints.py")
    assert quiet.filter(_record(pathname=own_file))  # absl.logging.info in flipjax
    assert quiet.filter(_record(name="flipjax.checkpoints"))  # logging.getLogger(__name__)
    assert quiet.filter(_record(level=logging.DEBUG, pathname=own_file))
    assert not quiet.filter(_record())  # orbax, tfds: absl.logging.info elsewhere
    assert not quiet.filter(_record(name="jax._src.xla_bridge"))
    assert not quiet.filter(_record(pathname=str(ROOT / "flipjax_other" / "x.py")))
    assert quiet.filter(_record(level=logging.WARNING))
    assert quiet.filter(_record(name="jax", level=logging.ERROR))


def test_error_line_is_one_line():
    assert console.error_line("prog", ValueError("bad\n  value\n")) == "prog: error: bad; value"
    assert console.error_line("prog", FileNotFoundError()) == "prog: error: FileNotFoundError"


def test_flag_error_message_cuts_an_embedded_traceback(monkeypatch):
    monkeypatch.delenv(console.DEBUG_ENV, raising=False)
    text = ("flag --config=c.py:X: Error whilst parsing config file:\n\nTraceback (most recent "
            "call last):\n  File \"c.py\", line 3\n    raise ValueError(...)\n"
            "ValueError: unknown variant 'X'\n")
    assert console.flag_error_message(ValueError(text)) == (
        "flag --config=c.py:X: Error whilst parsing config file: ValueError: unknown variant 'X'")
    assert console.flag_error_message(ValueError("flag --n=x: not an int")) == (
        "flag --n=x: not an int")
    monkeypatch.setenv(console.DEBUG_ENV, "1")
    assert console.flag_error_message(ValueError(text)) == text


def test_user_errors_exit_with_one_line(monkeypatch):
    monkeypatch.delenv(console.DEBUG_ENV, raising=False)
    for error in (ValueError("no such field"), FileNotFoundError("nowhere")):
        with pytest.raises(SystemExit) as e, console.user_errors("prog"):
            raise error
        assert e.value.code == f"prog: error: {error}"
    with pytest.raises(SystemExit) as e, console.user_errors("prog"):
        raise app.UsageError("--out is required")
    assert e.value.code == "prog: error: --out is required (--help lists the flags)"
    with pytest.raises(KeyError), console.user_errors("prog"):
        raise KeyError("a bug keeps its traceback")

    @console.user_errors("prog")
    def main():
        raise ValueError("as a decorator")

    with pytest.raises(SystemExit, match="prog: error: as a decorator"):
        main()
    monkeypatch.setenv(console.DEBUG_ENV, "1")
    with pytest.raises(ValueError), console.user_errors("prog"):
        raise ValueError("with FLIPJAX_DEBUG=1 the exception itself")


@pytest.mark.parametrize("value, on", [("", False), ("0", False), ("false", False),
                                       ("1", True), ("yes", True)])
def test_debug_enabled(value, on):
    assert console.debug_enabled({console.DEBUG_ENV: value}) is on


# A program run through console.run, with its own package and a "third-party" module that log
# through absl (as orbax and tfds do) and through Python loggers (as JAX does).
_PROGRAM = {
    "ownpkg/__init__.py": """
        from absl import logging
        def log():
            logging.info("OWN-INFO")
            logging.debug("OWN-DEBUG")
        """,
    "thirdparty.py": """
        from absl import logging
        def log():
            logging.info("THIRD-INFO")
            logging.warning("THIRD-WARNING")
        """,
    "prog.py": """
        import logging
        import ownpkg, thirdparty
        from flipjax import console
        def main(argv):
            ownpkg.log()
            thirdparty.log()
            logging.getLogger("flipjax.fake").info("FLIPJAX-INFO")
            logging.getLogger("jax._src.fake").info("JAX-INFO")
            console.setup_logging(("ownpkg",), console.given_verbosity())  # again: no change
            ownpkg.log()
            raise ValueError("bad input")
        console.run(main, "prog", packages=("ownpkg",))
        """,
}


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    root = tmp_path_factory.mktemp("program")
    for name, text in _PROGRAM.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))

    def run(*args):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(ROOT)])}
        env.pop(console.DEBUG_ENV, None)
        res = subprocess.run([sys.executable, str(root / "prog.py"), *args], env=env,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 1, res.stderr
        lines = res.stderr.strip().splitlines()
        assert lines[-1] == "prog: error: bad input" and "Traceback" not in res.stderr, lines
        return [line.rsplit("] ", 1)[-1] for line in lines[:-1]]

    return run


def test_third_party_info_is_quiet_by_default(program):
    assert program() == ["OWN-INFO", "THIRD-WARNING", "FLIPJAX-INFO", "OWN-INFO"]


def test_verbosity_flag_applies_to_every_logger(program):
    assert program("--verbosity=0") == ["OWN-INFO", "THIRD-INFO", "THIRD-WARNING",
                                        "FLIPJAX-INFO", "JAX-INFO", "OWN-INFO"]
    assert program("-v", "1") == ["OWN-INFO", "OWN-DEBUG", "THIRD-INFO", "THIRD-WARNING",
                                  "FLIPJAX-INFO", "JAX-INFO", "OWN-INFO", "OWN-DEBUG"]
    assert program("--verbosity=-1") == ["THIRD-WARNING"]
