"""World models from trained runs: checkpoints written as the trainers write them load back."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flipjax.planning import PlanConfig, WorldModel, hill_climb
from flipjax.planning.world_model import world_model_from_modules
from tests.planning_runs import TEXT_DIM, TEXT_TOKENS


def _inputs(wm, p=2):
    hist = jax.random.uniform(jax.random.key(3), (p, wm.history_frames, 32, 32, 3),
                              minval=-1, maxval=1)
    text = jax.random.normal(jax.random.key(4), (p, TEXT_TOKENS, TEXT_DIM))
    return hist, text, jnp.ones((p, TEXT_TOKENS), bool)


def _close(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.allclose(x, y) for x, y in zip(la, lb, strict=True))


def test_from_checkpoints_loads_the_saved_modules(planning_runs):
    root, params, m = planning_runs
    wm, schedule = WorldModel.from_checkpoints(root / "cvae", root / "dit", root / "value")
    assert _close(wm.action_params, params["cvae"])       # short run: raw params, not EMA
    assert _close(wm.dynamics_params, params["dit"])
    assert _close(wm.value_params, m["ema"])              # settled EMA
    np.testing.assert_allclose(schedule.betas, m["schedule"].betas)
    # history: CVAE 2, DiT 2, value clip of 4 frames needs 3 before the newest.
    assert wm.history_frames == 3 and wm.value_frames == 4 and wm.learned_range

    hist, text, mask = _inputs(wm)
    config = PlanConfig(beams=2, candidates=2, horizon=1, sample_steps=2, schedule=schedule)
    a = hill_climb(wm, hist, text, mask, jax.random.key(1), config)
    assert a.flows.shape == (2, 2, 1, 4, 64, 2) and a.videos.shape == (2, 2, 1, 3, 32, 32, 3)
    assert np.all(np.abs(np.asarray(a.videos)) <= 1.0) and np.all(np.isfinite(a.values))


def test_explicit_ema_choice(planning_runs):
    root, params, _ = planning_runs
    wm, _ = WorldModel.from_checkpoints(root / "cvae", root / "dit", root / "value", ema=False)
    assert _close(wm.value_params, params["value"])
    with pytest.raises(ValueError, match=r"dit has no state\['ema'\]"):
        WorldModel.from_checkpoints(root / "cvae", root / "dit", root / "value", ema=True)


def test_wrong_kind_and_missing_runs_are_named(planning_runs, tmp_path):
    root, _, _ = planning_runs
    with pytest.raises(ValueError, match=r"action=.*'dit' run.*'cvae' run"):
        WorldModel.from_checkpoints(root / "dit", root / "dit", root / "value")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        WorldModel.from_checkpoints(root / "cvae", tmp_path / "nowhere", root / "value")


def test_history_shorter_than_the_models_need_is_refused(planning_runs):
    root, _, _ = planning_runs
    wm, schedule = WorldModel.from_checkpoints(root / "cvae", root / "dit", root / "value")
    hist, text, mask = _inputs(wm)
    with pytest.raises(ValueError, match="needs at least 3 history frames"):
        hill_climb(wm, hist[:, 1:], text, mask, jax.random.key(0),
                   PlanConfig(beams=1, candidates=1, horizon=1, sample_steps=1,
                              schedule=schedule))


def test_modules_that_do_not_fit_are_refused(planning_runs):
    _, params, m = planning_runs
    with pytest.raises(ValueError, match=r"CVAE takes \(32, 32\) frames, the DiT \(64, 64\)"):
        world_model_from_modules(
            cvae=m["cvae"], cvae_params=params["cvae"], dit=m["dit"], dit_params=params["dit"],
            codec=m["codec"], value=m["value"], value_params=params["value"],
            image_size=(64, 64))
