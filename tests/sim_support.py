"""Simulator tests: skip cleanly when MuJoCo cannot render here, and render only in child
processes.

TensorFlow and Mesa's software OpenGL both carry LLVM; in one process, whichever loads second
crashes it. The suite loads TensorFlow (RLDS tests), so no test renders in the pytest process:
the GL probe and every rendering test body run in fresh spawned interpreters.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
_PROBE = ("from data_pipelines.metaworld import sim\n"
          "import metaworld, mujoco\n"
          "m = mujoco.MjModel.from_xml_string('<mujoco><worldbody><geom size=\"1\"/>"
          "</worldbody></mujoco>')\n"
          "r = mujoco.Renderer(m, 8, 8)\n"
          "r.update_scene(mujoco.MjData(m))\n"
          "assert r.render().shape == (8, 8, 3)\n"
          "r.close()\n")
_probe_result: list[str] = []


def render_problem() -> str:
    """Why simulator rendering cannot run here ("" when it can); probed once, in a child."""
    if not _probe_result:
        try:
            run = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True,
                                 text=True, timeout=180)
            lines = run.stderr.strip().splitlines() or ["?"]
            _probe_result.append("" if run.returncode == 0 else lines[-1])
        except subprocess.TimeoutExpired:
            _probe_result.append("the rendering probe timed out")
    return _probe_result[0]


def require_sim() -> None:
    """Skips the calling test module, saying why, unless the sim extra imports and renders."""
    for module in ("mujoco", "metaworld"):
        pytest.importorskip(module, reason=f"simulator tests need the 'sim' extra ({module})")
    problem = render_problem()
    if problem:
        pytest.skip(f"no offscreen OpenGL context (MUJOCO_GL="
                    f"{os.environ.get('MUJOCO_GL', 'egl')}): {problem}",
                    allow_module_level=True)


def fresh_process_pool() -> concurrent.futures.ProcessPoolExecutor:
    """A one-worker pool of a spawned interpreter (not forked from this TensorFlow-laden
    process); tests of one module share it, so JAX compiles once. Shut it down when done."""
    context = multiprocessing.get_context("spawn")
    return concurrent.futures.ProcessPoolExecutor(1, mp_context=context)


def in_fresh_process(fn: Callable[..., Any], *args: Any,
                     pool: concurrent.futures.ProcessPoolExecutor | None = None,
                     **kwargs: Any) -> Any:
    """Runs module-level ``fn(*args, **kwargs)`` in ``pool`` (a new spawned interpreter when
    None) and returns its result; an exception there (a failed assertion included) is raised
    here."""
    if pool is not None:
        return pool.submit(fn, *args, **kwargs).result()
    with fresh_process_pool() as own:
        return own.submit(fn, *args, **kwargs).result()
