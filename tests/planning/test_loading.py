"""World models from trained runs: checkpoints written as the trainers write them load back."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import cvae_small, dit_small, value_clip
from experiments.trainers import cvae as cvae_trainer
from experiments.trainers import dit as dit_trainer
from experiments.trainers import value as value_trainer
from flipjax.checkpoints import Checkpointer
from flipjax.planning import PlanConfig, WorldModel, hill_climb
from flipjax.planning.loading import world_model_from_modules

TEXT_TOKENS, TEXT_DIM = 8, 32


def _save_run(workdir, config, params, step, ema=None):
    """A checkpoint laid out as ``loop.train`` writes it (state dict + config in the meta)."""
    state = {"step": step, "params": params}
    if ema is not None:
        state["ema"] = ema
    with Checkpointer(workdir, async_save=False) as ckpt:
        ckpt.save(step, state, meta={"config": config.to_json_best_effort()}, force=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Random-init runlocal CVAE, DiT (pixel codec) and value runs, saved as checkpoints."""
    root = tmp_path_factory.mktemp("runs")
    key = jax.random.key(0)
    cc, dc, vc = (m.get_config("runlocal") for m in (cvae_small, dit_small, value_clip))
    cvae = cvae_trainer.make_model(cc)
    codec = dit_trainer.make_codec(dc)
    dit = dit_trainer.make_model(dc, codec)
    value = value_trainer.make_model(vc)
    # Unboxed (no logical-axis metadata), as the trainers keep them in their state.
    params = nn.meta.unbox({
        "cvae": jax.jit(cvae_trainer.make_init_fn(cvae, TEXT_TOKENS))(key),
        "dit": jax.jit(dit_trainer.make_init_fn(dit, TEXT_TOKENS))(key),
        "value": jax.jit(value_trainer.make_init_fn(value, TEXT_TOKENS, TEXT_DIM))(key),
    })
    # The value run's EMA differs from its params, so which one loads is observable.
    ema = jax.tree.map(lambda x: x + 1.0, params["value"])
    # runlocal CVAE: ema_decay 0.9999, and 5 steps leave the EMA at its init: raw params load.
    _save_run(root / "cvae", cc, params["cvae"], 5,
              ema=jax.tree.map(jnp.zeros_like, params["cvae"]))
    _save_run(root / "dit", dc, params["dit"], 5)
    # runlocal value: ema_decay 0.9; 0.9 ** 200 < 0.1, so the EMA loads.
    _save_run(root / "value", vc, params["value"], 200, ema=ema)
    modules = dict(cvae=cvae, dit=dit, value=value, codec=codec, ema=ema,
                   schedule=dit_trainer.make_schedule(dc))
    return root, params, modules


def _inputs(wm, p=2):
    hist = jax.random.uniform(jax.random.key(3), (p, wm.history_frames, 32, 32, 3),
                              minval=-1, maxval=1)
    text = jax.random.normal(jax.random.key(4), (p, TEXT_TOKENS, TEXT_DIM))
    return hist, text, jnp.ones((p, TEXT_TOKENS), bool)


def _close(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.allclose(x, y) for x, y in zip(la, lb, strict=True))


def test_from_checkpoints_loads_the_saved_modules(runs):
    root, params, m = runs
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


def test_explicit_ema_choice(runs):
    root, params, _ = runs
    wm, _ = WorldModel.from_checkpoints(root / "cvae", root / "dit", root / "value", ema=False)
    assert _close(wm.value_params, params["value"])
    with pytest.raises(ValueError, match=r"dit has no state\['ema'\]"):
        WorldModel.from_checkpoints(root / "cvae", root / "dit", root / "value", ema=True)


def test_wrong_kind_and_missing_runs_are_named(runs, tmp_path):
    root, _, _ = runs
    with pytest.raises(ValueError, match=r"action=.*'dit' run.*'cvae' run"):
        WorldModel.from_checkpoints(root / "dit", root / "dit", root / "value")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        WorldModel.from_checkpoints(root / "cvae", tmp_path / "nowhere", root / "value")


def test_history_shorter_than_the_models_need_is_refused(runs):
    root, _, _ = runs
    wm, schedule = WorldModel.from_checkpoints(root / "cvae", root / "dit", root / "value")
    hist, text, mask = _inputs(wm)
    with pytest.raises(ValueError, match="needs at least 3 history frames"):
        hill_climb(wm, hist[:, 1:], text, mask, jax.random.key(0),
                   PlanConfig(beams=1, candidates=1, horizon=1, sample_steps=1,
                              schedule=schedule))


def test_modules_that_do_not_fit_are_refused(runs):
    _, params, m = runs
    with pytest.raises(ValueError, match=r"CVAE takes \(32, 32\) frames, the DiT \(64, 64\)"):
        world_model_from_modules(
            cvae=m["cvae"], cvae_params=params["cvae"], dit=m["dit"], dit_params=params["dit"],
            codec=m["codec"], value=m["value"], value_params=params["value"],
            image_size=(64, 64))
