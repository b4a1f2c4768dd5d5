"""Test setup: 8 virtual CPU devices so sharding is tested on any machine."""

import atexit
import os
import shutil
import tempfile

# Must happen before JAX initialises its backends.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A persistent compilation cache for the session, shared with the subprocesses tests launch
# (they inherit the environment): trainers compile the same programs in several tests (resume
# runs, CLI runs), and on a 2-core CI machine compiling dominates their time.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="flipjax_test_jax_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache

import jax
import pytest

jax.config.update("jax_enable_x64", False)
# Subprocesses keep JAX's default threshold (1 s), which still caches the slow compiles.
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


@pytest.fixture(scope="session")
def key():
    return jax.random.PRNGKey(0)


@pytest.fixture(scope="session")
def planning_runs(tmp_path_factory):
    """(root with random-init :runlocal cvae/, dit/, value/ runs; their params; modules), see
    ``tests/planning_runs.py``. Imported lazily: most tests need no models."""
    from tests.planning_runs import make_planning_runs

    return make_planning_runs(tmp_path_factory.mktemp("planning_runs"))
