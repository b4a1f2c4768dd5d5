"""Closed-loop Meta-World evaluation in the real simulator (MuJoCo, offscreen EGL/OSMesa).

The test bodies (``tests/experiments/metaworld_cases.py``) run in a spawned interpreter shared
by this module: the suite loads TensorFlow, which cannot share a process with Mesa's OpenGL
(``tests/sim_support.py``).
"""

from __future__ import annotations

import pytest

from tests.sim_support import fresh_process_pool, in_fresh_process, require_sim

require_sim()

from tests.experiments import metaworld_cases as cases  # noqa: E402


@pytest.fixture(scope="module")
def pool():
    with fresh_process_pool() as p:
        yield p


def test_oracle_solves_button_press(pool):
    in_fresh_process(cases.oracle_solves_button_press, pool=pool)


def test_oracle_tracks_follow_the_object_in_later_renders(pool):
    in_fresh_process(cases.oracle_tracks_follow_the_object_in_later_renders, pool=pool)


def test_cli_writes_results_and_resumes(pool, tmp_path):
    in_fresh_process(cases.cli_writes_results_and_resumes, str(tmp_path), pool=pool)


@pytest.mark.slow
def test_avdc_mode_solves_button_press(pool):
    in_fresh_process(cases.avdc_mode_solves_button_press, pool=pool)


@pytest.mark.slow
def test_model_mode_runs_with_tiny_random_models(pool, planning_runs, tmp_path):
    in_fresh_process(cases.model_mode_runs_with_tiny_random_models, str(planning_runs[0]),
                     str(tmp_path), pool=pool)
