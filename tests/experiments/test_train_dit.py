"""The VideoDiT trainer end to end on toy clips: a short run with eval and samples, exact
resume, configs, codec/clip mismatches, and training on a saved autoencoder's latents."""

import dataclasses
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("grain")

from data_pipelines.loader import ClipDataset
from experiments.trainers import dit
from experiments.training import loop
from flipjax import builders
from flipjax import codec as codec_lib
from flipjax.checkpoints import Checkpointer, load_params
from flipjax.models.autoencoder import AutoencoderConfig, AutoencoderKL
from tests.experiments.helpers import BATCH, dit_base, dit_large, dit_small, runlocal_config


def local_config(toy_dirs, total_steps, eval_batches=0):
    c = runlocal_config(dit_small, toy_dirs, total_steps, eval_batches=eval_batches,
                        eval_sample_steps=2)
    c.model.text_layers = 1  # compile time dominates these runs
    return c


def read_gif(path):
    from PIL import Image

    frames = []
    with Image.open(path) as im:
        for i in range(getattr(im, "n_frames", 1)):
            im.seek(i)
            frames.append(np.asarray(im.convert("RGB")))
    return np.stack(frames)


def test_two_steps_checkpoint_eval_and_sample(toy_dirs, tmp_path):
    workdir = tmp_path / "run"
    state = dit.train_and_evaluate(local_config(toy_dirs, 2, eval_batches=1), str(workdir))
    assert int(state.step) == 2 and int(state.skipped) == 0
    with Checkpointer(workdir) as ckpt:
        assert ckpt.latest_step() == 2
    params = load_params(workdir)
    assert {"blocks_0", "language_encoder", "flow_embedder", "x_embedder"} <= set(params)
    # Pixel latents of 32x32 frames, factor 4: 48 channels in, 96 out (learned sigma).
    assert params["final_layer"]["linear"]["kernel"].shape[-1] == 96
    records = loop.read_metrics(workdir)
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in train)
    # The model starts at eps = 0 (zero-initialised output layer): MSE near E[noise^2] = 1.
    assert 0.5 < train[0]["mse"] < 1.5
    (ev,) = [r for r in records if r["split"] == "eval"]
    assert ev["step"] == 2
    for key in ("latent_l2", "psnr", "codec_psnr", "loss", "mse", "vb"):
        assert math.isfinite(ev[key]), key
    assert ev["latent_l2"] > 0 and 0 < ev["psnr"] < dit.PSNR_CAP
    assert ev["codec_psnr"] == dit.PSNR_CAP  # the pixel codec reconstructs exactly
    # The copy reference, recomputed from the first held-out clips (evaluation is unshuffled).
    ds = ClipDataset(toy_dirs[1], history=2, future=3)
    clips_ = [ds[i] for i in range(BATCH)]
    future = np.stack([c["future"] for c in clips_]).astype(np.float64)
    copy = np.stack([c["history"][-1:] for c in clips_]).astype(np.float64)
    mse = np.mean((future - copy) ** 2, axis=(2, 3, 4))
    expected = np.minimum(10 * np.log10(255.0**2 / np.maximum(mse, 1e-30)), dit.PSNR_CAP)
    np.testing.assert_allclose(ev["copy_psnr"], expected.mean(), rtol=1e-4)
    # Two steps from a zero output layer: the model is far below copying the current frame.
    assert 0 < ev["still_flow_psnr"] < ev["copy_psnr"] and ev["psnr"] < ev["copy_psnr"]
    # Over the changed pixels only: the same copy clips, pooled.
    changed = np.any(future != copy, axis=-1)
    moving_mse = np.sum(np.where(changed[..., None], (future - copy) ** 2, 0)) / (
        3 * changed.sum())
    np.testing.assert_allclose(ev["moving_copy_psnr"],
                               10 * np.log10(255.0**2 / moving_mse), rtol=1e-4)
    assert ev["moving_copy_psnr"] < ev["copy_psnr"]
    assert 0 < ev["moving_psnr"] < dit.PSNR_CAP and 0 < ev["moving_still_flow_psnr"]
    assert "warp_psnr" not in ev and "warp_x0_mse" not in ev   # pixel flows: no warp
    # The x0 probe: two steps from eps = 0, so x0 = x_t / sqrt(abar) and its error is
    # (1 - abar) / abar times the eps error (near 1): tiny at t = 5, huge at t = 900.
    abar = np.asarray(builders.build_schedule(local_config(toy_dirs, 2)).alphas_cumprod)
    for t in dit.PROBE_TIMESTEPS:
        assert 0.5 < ev[f"x0_mse_t{t}"] / ((1 - abar[t]) / abar[t]) < 1.5, t
    assert ev["x0_mse_t5"] < ev["copy_x0_mse"] < ev["x0_mse_t900"]
    video = read_gif(workdir / loop.SAMPLES_DIR / "video_00000002.gif")
    # Ground truth | prediction side by side; identical consecutive frames may be merged.
    assert video.shape[1:] == (32, 64, 3) and 1 <= video.shape[0] <= 5


def test_resume_is_exact(toy_dirs, tmp_path):
    straight = dit.train_and_evaluate(local_config(toy_dirs, 6), str(tmp_path / "a"))
    dit.train_and_evaluate(local_config(toy_dirs, 3), str(tmp_path / "b"))
    resumed = dit.train_and_evaluate(local_config(toy_dirs, 6), str(tmp_path / "b"))
    assert int(resumed.step) == 6
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(straight.params),
                 jax.device_get(resumed.params))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(straight.ema),
                 jax.device_get(resumed.ema))
    losses = [{r["step"]: r["loss"] for r in loop.read_metrics(tmp_path / run)
               if r["split"] == "train"} for run in ("a", "b")]
    assert losses[0] == losses[1] and sorted(losses[0]) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("module,size,hidden", [(dit_small, "S", 384), (dit_base, "B", 768),
                                                (dit_large, "L", 1024)])
def test_configs_build_with_the_recipe(module, size, hidden):
    c = module.get_config()
    assert c.trainer == "dit" and c.model.size == size and not c.runlocal
    assert (c.learning_rate, c.weight_decay, c.ema_decay, c.schedule) == \
        (1e-4, 0.0, 0.9999, "constant")
    assert (c.model.history, c.model.flow_horizon, tuple(c.image_size)) == (4, 16, (128, 128))
    assert (c.model.patch, c.model.learn_sigma, c.diffusion_steps) == (2, True, 1000)
    assert (c.codec.kind, c.codec.scale, c.model.text_dim) == ("autoencoder", 0.18215, 384)
    assert not c.codec.workdir and not c.codec.diffusers_dir
    with pytest.raises(ValueError, match="exactly one of"):
        builders.build_codec(c)  # the codec source must be given on the command line
    # The SD-VAE layout: 128x128 frames -> 16x16x4 latents, 19-frame clips.
    sd_like = codec_lib.LatentCodec("autoencoder", 8, 4, 0.18215,
                                    autoencoder=AutoencoderConfig.variant("sd-vae-ft-ema"))
    model = builders.build_dit(c, sd_like)
    assert model.hidden == hidden and model.latent_size == (16, 16) and model.num_frames == 19
    with pytest.raises(AttributeError):
        c.not_a_field = 1  # locked
    local = module.get_config("runlocal")
    assert local.runlocal and local.total_steps == 50 and local.batch_size == 4
    assert builders.codec_kind(local) == "pixels"
    codec = builders.build_codec(local)
    assert (codec.factor, codec.channels) == (4, 48)
    local_model = builders.build_dit(local, codec)
    assert local_model.hidden == 64 and local_model.latent_size == (8, 8)
    assert local_model.num_frames == 5 and dit.clip_spec(local).future == 3
    # Every departure flag of the config reaches the module (off by default).
    fields = ("flow_gate", "flow_splat", "flow_warp", "flow_residual")
    assert not any(getattr(local_model, f) for f in fields)
    with local.unlocked():
        for field in fields:
            local.model[field] = True
    with pytest.raises(ValueError, match="flow_normalization='unit'"):
        builders.build_dit(local, codec)     # the tracks go on the latent grid
    with local.unlocked():
        local.flow_normalization = "unit"
    flagged = builders.build_dit(local, codec)
    assert all(getattr(flagged, f) for f in fields)
    with pytest.raises(ValueError, match="runlocal"):
        module.get_config("fast")


def test_codec_clip_mismatch_is_a_clear_error(toy_dirs, tmp_path):
    c = local_config(toy_dirs, 1)
    c.codec.factor = 5
    with pytest.raises(ValueError, match=r"frames 32x32 do not fit the pixels codec"):
        dit.train_and_evaluate(c, str(tmp_path / "a"))
    c = local_config(toy_dirs, 1)
    c.codec.factor = 16
    c.model.patch = 4
    with pytest.raises(ValueError, match=r"2x2 latents, which do not split into the DiT's 4x4"):
        dit.train_and_evaluate(c, str(tmp_path / "b"))
    c = local_config(toy_dirs, 1)
    c.image_size = (64, 64)  # the codec fits, the clips (32x32) do not
    with pytest.raises(ValueError, match=r"frames 32x32 != the model's image size \(64, 64\)"):
        dit.train_and_evaluate(c, str(tmp_path / "c"))
    c = local_config(toy_dirs, 1)
    c.codec.workdir = str(tmp_path / "no_run")
    with pytest.raises(ValueError, match=r"no_run has no autoencoder_config\.json"):
        dit.train_and_evaluate(c, str(tmp_path / "d"))
    assert not (tmp_path / "a" / "checkpoints").exists()


def test_trains_on_a_saved_autoencoder_checkpoint(toy_dirs, tmp_path):
    # 48 latent channels: the DiT then has the pixel-codec runs' shapes, so its compiled
    # train step comes from the cache and only the encoder is new.
    cfg = AutoencoderConfig.variant("tiny", block_out_channels=(32, 32, 32), layers_per_block=1,
                           latent_channels=48)
    params = nn.meta.unbox(AutoencoderKL(cfg).init(jax.random.key(3),
                                                   jnp.zeros((1, 32, 32, 3)))["params"])
    ae_dir = tmp_path / "autoencoder"
    with Checkpointer(ae_dir, async_save=False) as ckpt:
        ckpt.save(5, {"params": params, "ema": params, "step": 5})
    (ae_dir / codec_lib.AUTOENCODER_CONFIG_FILE).write_text(
        json.dumps(dataclasses.asdict(cfg), default=lambda o: jnp.dtype(o).name))
    c = local_config(toy_dirs, 2)
    c.codec.workdir = str(ae_dir)  # kind "auto" -> autoencoder
    workdir = tmp_path / "dit"
    state = dit.train_and_evaluate(c, str(workdir))
    assert int(state.step) == 2
    assert state.params["final_layer"]["linear"]["kernel"].shape[-1] == 96
    train = [r for r in loop.read_metrics(workdir) if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in train)
    # The batches are the autoencoder's latents of the clips.
    codec = builders.build_codec(c)
    assert codec.kind == "autoencoder" and codec.latent_shape((32, 32)) == (8, 8, 48)
    assert codec.scale == pytest.approx(0.18215)


def test_prediction_reaches_the_loss_and_bad_values_are_refused():
    import ml_collections

    from flipjax.models import diffusion
    from flipjax.models.video_dit import VideoDiT
    m = VideoDiT.variant("tiny", latent_size=(4, 4), in_channels=4, flow_horizon=3, history=2,
                         text_dim=8, text_layers=1, text_heads=2)
    latents = jnp.full((2, m.num_frames, 4, 4, 4), 3.0)
    flow = jnp.zeros((2, 5, 3, 2))
    text, mask = jnp.zeros((2, 3, 8)), jnp.ones((2, 3), bool)
    params = nn.unbox(m.init(jax.random.key(0), latents, jnp.zeros((2,), jnp.int32), flow,
                             text, mask))["params"]
    schedule = diffusion.linear_schedule(1000)
    # adaLN-Zero: the untrained DiT outputs 0, so the MSE is E[noise^2] = 1 against eps and
    # E[x0^2] = 9 against x0.
    mse = {p: float(jnp.mean(dit.diffusion_terms(m, schedule, params, latents, flow, text, mask,
                                                 jax.random.key(1), p)["mse"]))
           for p in ("eps", "x0")}
    assert 0.6 < mse["eps"] < 1.4 and mse["x0"] == pytest.approx(9.0, rel=1e-3)
    assert dit.prediction_of(ml_collections.ConfigDict()) == "eps"
    with pytest.raises(ValueError, match="prediction"):
        dit.prediction_of(ml_collections.ConfigDict({"prediction": "score"}))


def test_flow_residual_needs_x0_prediction():
    import ml_collections

    from experiments.trainers.dit import prediction_of
    c = ml_collections.ConfigDict({"prediction": "eps", "model": {"flow_residual": True}})
    with pytest.raises(ValueError, match="flow_residual"):
        prediction_of(c)
    c.prediction = "x0"
    assert prediction_of(c) == "x0"


@pytest.mark.slow  # the anchor itself: test_video_dit_departures; no warp key: the run above
def test_an_untrained_flow_residual_model_samples_the_warp_baseline(toy_dirs, tmp_path):
    c = local_config(toy_dirs, 1, eval_batches=1)
    with c.unlocked():
        c.flow_normalization, c.prediction, c.learning_rate = "unit", "x0", 0.0
        c.model.flow_residual = True
    dit.train_and_evaluate(c, str(tmp_path / "run"))
    (ev,) = [r for r in loop.read_metrics(tmp_path / "run") if r["split"] == "eval"]
    # A zero output layer adds nothing to the warp, whatever the noise: the samples are the
    # warp baseline, which differs from the still flow's warp.
    assert ev["psnr"] == pytest.approx(ev["warp_psnr"], abs=1e-3)
    assert ev["moving_psnr"] == pytest.approx(ev["moving_warp_psnr"], abs=1e-3)
    assert ev["psnr"] != pytest.approx(ev["still_flow_psnr"], abs=1e-2)
    for t in dit.PROBE_TIMESTEPS:   # one call at any noise level predicts the warp too
        assert ev[f"x0_mse_t{t}"] == pytest.approx(ev["warp_x0_mse"], rel=1e-4)
