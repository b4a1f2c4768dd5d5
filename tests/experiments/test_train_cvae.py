"""The FlowCVAE trainer end to end on toy clips: CLI run, exact resume, configs, dispatch."""

import math
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("grain")

from experiments import train as train_cli
from experiments.trainers import cvae
from experiments.training import clips, loop
from flipjax import builders
from flipjax.checkpoints import Checkpointer, load_params
from tests.experiments.helpers import BATCH, cvae_base, cvae_large, cvae_small, runlocal_config

ROOT = pathlib.Path(__file__).resolve().parents[2]


def local_config(toy_dirs, total_steps, eval_batches=0):
    return runlocal_config(cvae_small, toy_dirs, total_steps, eval_batches=eval_batches)


def test_cli_runlocal_writes_checkpoint_and_metrics(toy_dirs, tmp_path):
    workdir = tmp_path / "run"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu"}
    res = subprocess.run(
        [sys.executable, "-m", "experiments.train",
         "--config=experiments/configs/cvae.py:S,runlocal", f"--workdir={workdir}",
         "--config.total_steps=6", f"--config.batch_size={BATCH}", "--config.log_every=3",
         f"--config.data_dir={toy_dirs[0]}", f"--config.eval_data_dir={toy_dirs[1]}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "step 6/6 | loss" in res.stderr and "examples/s | ETA" in res.stderr
    assert "parameters:" in res.stderr
    records = loop.read_metrics(workdir)
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [3, 6]
    assert all(math.isfinite(r["loss"]) for r in train)
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [6]
    assert 0.0 <= evals[0]["prior_ltdr"] <= 1.0 and evals[0]["prior_ade"] >= 0.0
    assert evals[0]["still_ade"] >= 0.0 and evals[0]["prior_spread"] >= 0.0
    sample = np.asarray(Image.open(workdir / "samples" / "flows_00000006.png"))
    assert sample.shape == (240, 480, 3)
    with Checkpointer(workdir) as ckpt:
        assert ckpt.latest_step() == 6
    params = load_params(workdir)
    assert {"encoder_0", "decoder_0", "cls_token"} <= set(params)


def test_eval_references_have_known_values():
    """``still_*`` scores a no-motion prediction; ``prior_spread`` compares two prior draws."""
    import jax.numpy as jnp

    from flipjax.models.flow_cvae import CVAEConfig, FlowCVAE

    model = FlowCVAE(CVAEConfig.variant("tiny", language_dim=8))
    b, n, lh = 2, 6, 4
    # Half the points move 3 px per step along x, the rest stay put.
    step = np.where(np.arange(n)[None, :, None] < n // 2, 3.0, 0.0) * np.arange(lh)[None, None]
    start = np.random.default_rng(0).uniform(4, 28, (b, n, 1, 2))
    tracks = np.broadcast_to(start, (b, n, lh, 2)).copy()
    tracks[..., 0] += step[0]
    batch = {"history": jnp.zeros((b, 2, 32, 32, 3), jnp.uint8),
             "tracks": jnp.asarray(tracks, jnp.float32),
             "text_tokens": jnp.ones((b, 3, 8), jnp.float32),
             "text_mask": jnp.ones((b, 3), bool)}
    x = cvae.convert_batch(batch)
    params = model.init({"params": jax.random.key(0), "latent": jax.random.key(1)}, x["flow"],
                        x["history"], x["text_tokens"], x["text_mask"])["params"]
    metrics, flows = cvae.make_eval_step(model, (2.0, 4.0))(params, batch, jax.random.key(2))
    # Still predictions miss a moving point by 3, 6, 9 px at steps 1..3 (mean 6).
    assert float(metrics["still_ade_moving"]) == pytest.approx(6.0)
    assert float(metrics["still_ade"]) == pytest.approx(3.0)
    # LTDR at 2 and 4 px: static points always within, moving ones never (3, 6, 9 > 2) or
    # once (3 < 4).
    assert float(metrics["still_ltdr_moving"]) == pytest.approx((0 + 1 / 3) / 2)
    assert flows.shape == (b, n, lh, 2)
    # An untrained decoder reads its latent, so two prior draws differ.
    assert float(metrics["prior_spread"]) > 0.0
    # The best of 8 draws per clip is at least as close as the first one on its moving steps.
    assert float(metrics["best_of_8_ade_moving"]) <= float(metrics["prior_ade_moving"]) + 1e-5


def test_loss_weights_come_from_the_config():
    from flipjax.models.cvae_loss import CVAELossConfig

    c = cvae_small.get_config("runlocal")
    assert cvae.loss_config(c) == CVAELossConfig()  # the official weights
    c.loss.kl = 1e-2
    assert cvae.loss_config(c).kl == 1e-2
    c.loss = {"kl": 1e-2, "klx": 1.0}
    with pytest.raises(ValueError, match=r"unknown fields \['klx'\]"):
        cvae.loss_config(c)


def test_resume_is_exact(toy_dirs, tmp_path):
    straight = cvae.train_and_evaluate(local_config(toy_dirs, 6), str(tmp_path / "a"))
    cvae.train_and_evaluate(local_config(toy_dirs, 3), str(tmp_path / "b"))
    resumed = cvae.train_and_evaluate(local_config(toy_dirs, 6), str(tmp_path / "b"))
    assert int(resumed.step) == 6
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(straight.params),
                 jax.device_get(resumed.params))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(straight.ema),
                 jax.device_get(resumed.ema))
    # The checkpoint on disk holds the same parameters.
    jax.tree.map(np.testing.assert_array_equal, load_params(tmp_path / "b"),
                 jax.device_get(straight.params))
    losses_a = {r["step"]: r["loss"] for r in loop.read_metrics(tmp_path / "a")
                if r["split"] == "train"}
    losses_b = {r["step"]: r["loss"] for r in loop.read_metrics(tmp_path / "b")
                if r["split"] == "train"}
    assert losses_a == losses_b and sorted(losses_a) == [1, 2, 3, 4, 5, 6]


def test_unknown_trainer_lists_available():
    assert "cvae" in train_cli.available_trainers()
    assert "loop" not in train_cli.available_trainers()
    with pytest.raises(ValueError, match=r"unknown trainer 'nope'.*cvae"):
        train_cli.get_trainer("nope")
    assert train_cli.get_trainer("cvae") is cvae.train_and_evaluate


@pytest.mark.parametrize("module,hidden", [(cvae_small, 384), (cvae_base, 768),
                                           (cvae_large, 768)])
def test_configs_build_without_data(module, hidden):
    c = module.get_config()
    assert c.trainer == "cvae" and not c.runlocal and not c.build_toy_data_if_missing
    assert c.learning_rate == 1e-4 and c.ema_decay == 0.9999
    assert builders.cvae_config(c).hidden == hidden
    with pytest.raises(AttributeError):
        c.not_a_field = 1  # locked
    local = module.get_config("runlocal")
    assert local.runlocal and builders.cvae_config(local).hidden == 64
    assert local.total_steps == 50 and local.batch_size == 4
    with pytest.raises(ValueError, match="runlocal"):
        module.get_config("fast")


def test_width_and_depth_overrides_replace_the_sizes_own():
    c = cvae_small.get_config("runlocal")
    tiny = builders.cvae_config(c)
    with c.unlocked():
        c.model.hidden, c.model.decoder_layers = 128, 5
    wide = builders.cvae_config(c)
    assert (wide.hidden, wide.decoder_layers) == (128, 5)
    assert (wide.encoder_layers, wide.num_heads) == (tiny.encoder_layers, tiny.num_heads)


def test_empty_data_dir_is_a_clear_error(tmp_path):
    c = cvae_small.get_config()
    with pytest.raises(ValueError, match="data_dir"):
        clips.data_dirs(c, tmp_path)


def test_parameter_overview_counts_modules():
    params = {"a": {"w": np.zeros((2, 3))}, "b": np.zeros(4)}
    text = loop.parameter_overview(params)
    assert text.splitlines()[0] == "parameters: 10"
    assert "a" in text and "60.0%" in text


def test_prior_mean_ade_adds_the_decode_at_the_prior_mean():
    """``loss.prior_mean_ade`` adds the plain ADE of the flow decoded at the prior's mean."""
    import jax.numpy as jnp

    from flipjax.models.cvae_loss import CVAELossConfig, weighted_ade
    from flipjax.models.flow_cvae import CVAEConfig, FlowCVAE

    model = FlowCVAE(CVAEConfig.variant("tiny", language_dim=8, learned_prior=True,
                                        latent_dim=4))
    rng = np.random.default_rng(0)
    b, n = 2, 5
    batch = {"history": jnp.asarray(rng.integers(0, 255, (b, 2, 32, 32, 3)), jnp.uint8),
             "tracks": jnp.asarray(rng.uniform(4, 28, (b, n, 4, 2)), jnp.float32),
             "text_tokens": jnp.ones((b, 3, 8), jnp.float32),
             "text_mask": jnp.ones((b, 3), bool)}
    x = cvae.convert_batch(batch)
    params = model.init({"params": jax.random.key(0), "latent": jax.random.key(1)}, x["flow"],
                        x["history"], x["text_tokens"], x["text_mask"])["params"]
    key = jax.random.key(2)
    base, _ = cvae.make_loss_fn(model, CVAELossConfig())(params, batch, key)
    loss, terms = cvae.make_loss_fn(model, CVAELossConfig(prior_mean_ade=2.0))(params, batch,
                                                                                key)
    out = model.apply({"params": params}, x["flow"], x["history"], x["text_tokens"],
                      x["text_mask"], rngs={"latent": key})
    mean = model.apply({"params": params}, x["flow"][:, :, 0], x["history"], x["text_tokens"],
                       x["text_mask"], out["prior_mu"], method=FlowCVAE.decode)["flow"]
    want = float(weighted_ade(mean, x["flow"], up_weight=1.0))
    assert float(terms["prior_mean_ade"]) == pytest.approx(want, rel=1e-5)
    assert float(loss) == pytest.approx(float(base) + 2.0 * want, rel=1e-5)
    plain = FlowCVAE(CVAEConfig.variant("tiny", language_dim=8))
    p2 = plain.init({"params": jax.random.key(0), "latent": jax.random.key(1)}, x["flow"],
                    x["history"], x["text_tokens"], x["text_mask"])["params"]
    with pytest.raises(ValueError, match="learned_prior"):
        cvae.make_loss_fn(plain, CVAELossConfig(prior_mean_ade=1.0))(p2, batch, key)
