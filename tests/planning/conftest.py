"""Shared planning fixtures: checkpoints of tiny modules laid out as the trainers write them."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from experiments.configs import cvae_small, dit_small, value_clip
from experiments.trainers import cvae as cvae_trainer
from experiments.trainers import dit as dit_trainer
from experiments.trainers import value as value_trainer
from flipjax.checkpoints import Checkpointer

TEXT_TOKENS, TEXT_DIM = 8, 32


def _save_run(workdir, config, params, step, ema=None):
    """A checkpoint laid out as ``loop.train`` writes it (state dict + config in the meta)."""
    state = {"step": step, "params": params}
    if ema is not None:
        state["ema"] = ema
    with Checkpointer(workdir, async_save=False) as ckpt:
        ckpt.save(step, state, meta={"config": config.to_json_best_effort()}, force=True)


@pytest.fixture(scope="session")
def planning_runs(tmp_path_factory):
    """Random-init runlocal CVAE, DiT (pixel codec) and value runs, saved as checkpoints.

    Returns (root with cvae/, dit/, value/; the saved params; the modules, the value run's
    EMA and the DiT's schedule)."""
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
