"""Checkpoints of tiny random-init modules, laid out as the trainers write them (for the
planning tests, the plan CLI tests and the notebook test; see the ``planning_runs`` fixture)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from experiments.trainers import cvae as cvae_trainer
from experiments.trainers import dit as dit_trainer
from experiments.trainers import value as value_trainer
from flipjax import builders
from flipjax.checkpoints import Checkpointer
from tests.experiments.helpers import cvae_small, dit_small, value_clip

TEXT_TOKENS, TEXT_DIM = 16, 32


def save_run(workdir: Path, config: Any, params: Any, step: int, ema: Any = None) -> None:
    """A checkpoint laid out as ``loop.train`` writes it (state dict + config in the meta)."""
    state = {"step": step, "params": params}
    if ema is not None:
        state["ema"] = ema
    with Checkpointer(workdir, async_save=False) as ckpt:
        ckpt.save(step, state, meta={"config": config.to_json_best_effort()}, force=True)


def random_params(init: Any, key: jax.Array, seed: int) -> Any:
    """Params of ``init``'s shapes drawn on the host: no init program to compile."""
    shapes = nn.meta.unbox(jax.eval_shape(init, key))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def make_planning_runs(root: Path) -> tuple[Path, dict, dict]:
    """Random :runlocal CVAE, DiT (pixel codec) and value runs under ``root``.

    Returns:
      (root with cvae/, dit/, value/; the saved params by run; the modules, the value run's
      EMA and the DiT's schedule).
    """
    key = jax.random.key(0)
    cc, dc, vc = (m.get_config("runlocal") for m in (cvae_small, dit_small, value_clip))
    cvae = builders.build_cvae(cc)
    codec = builders.build_codec(dc)
    dit = builders.build_dit(dc, codec)
    value = builders.build_value(vc)
    params = {
        "cvae": random_params(cvae_trainer.make_init_fn(cvae, TEXT_TOKENS), key, 0),
        "dit": random_params(dit_trainer.make_init_fn(dit, TEXT_TOKENS), key, 1),
        "value": random_params(value_trainer.make_init_fn(value, TEXT_TOKENS, TEXT_DIM), key,
                               2),
    }
    # The value run's EMA differs from its params, so which one loads is observable.
    ema = jax.tree.map(lambda x: x + 0.01, params["value"])
    # runlocal CVAE: ema_decay 0.9999, and 5 steps leave the EMA at its init: raw params load.
    save_run(root / "cvae", cc, params["cvae"], 5,
             ema=jax.tree.map(np.zeros_like, params["cvae"]))
    save_run(root / "dit", dc, params["dit"], 5)
    # runlocal value: ema_decay 0.9; 0.9 ** 200 < 0.1, so the EMA loads.
    save_run(root / "value", vc, params["value"], 200, ema=ema)
    modules = dict(cvae=cvae, dit=dit, value=value, codec=codec, ema=ema,
                   schedule=builders.build_schedule(dc))
    return root, params, modules
