"""The frame-autoencoder trainer on toy clips: both configs, decoder freezing, pretrained
initialisation (flipjax workdir and diffusers files), exact resume, config errors."""

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("grain")

from experiments import train as train_cli
from experiments.trainers import autoencoder
from experiments.training import loop
from flipjax import builders
from flipjax.checkpoints import Checkpointer, load_params
from flipjax.models import autoencoder_json
from flipjax.models.autoencoder import AutoencoderConfig
from tests.experiments.helpers import autoencoder_finetune, autoencoder_sd, runlocal_config

# Smaller than the :runlocal codec (3 levels, 2 ResNets each): XLA's CPU compile time, which
# dominates these runs, grows with the number of layers.
TEST_MODEL = dict(block_out_channels=(32, 32), layers_per_block=1)


def _split(params):
    """(encoder side, decoder side) of an AutoencoderKL parameter tree, as numpy."""
    params = jax.device_get(params)
    enc = {k: v for k, v in params.items() if k in autoencoder.ENCODER_MODULES}
    dec = {k: v for k, v in params.items() if k not in autoencoder.ENCODER_MODULES}
    return enc, dec


def _leaves_equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                    strict=True))


def local_config(module, toy_dirs, total_steps, eval_batches=0, **fields):
    c = runlocal_config(module, toy_dirs, total_steps, eval_batches=eval_batches)
    c.model.update(TEST_MODEL)
    for k, v in fields.items():
        c[k] = v
    return c


@pytest.fixture(scope="module")
def full_run(toy_dirs, tmp_path_factory):
    """2 steps of autoencoder_sd:runlocal with evaluation: (config, workdir, final state)."""
    workdir = tmp_path_factory.mktemp("full")
    config = local_config(autoencoder_sd, toy_dirs, 2, eval_batches=1)
    state = autoencoder.train_and_evaluate(config, str(workdir))
    return config, workdir, state


def _check_run(config, workdir, steps):
    with Checkpointer(workdir) as ckpt:
        assert ckpt.latest_step() == steps
    records = loop.read_metrics(workdir)
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    assert all(math.isfinite(r["loss"]) and r["rec_loss"] > 0 for r in train)
    (ev,) = [r for r in records if r["split"] == "eval"]
    assert 0 < ev["psnr"] < 60 and ev["latent_std"] > 0 and math.isfinite(ev["loss"])
    assert ev["scale_for_unit_std"] == pytest.approx(0.18215 / ev["latent_std"])
    (png,) = (workdir / loop.SAMPLES_DIR).glob("reconstruction_*.png")
    from PIL import Image

    # eval_samples rows of input | reconstruction.
    assert Image.open(png).size == (2 * 32, config.eval_samples * 32)
    # The model config file rebuilds the run's AutoencoderConfig.
    raw = json.loads((workdir / autoencoder_json.CONFIG_FILE).read_text())
    assert raw["dtype"] == "float32" and raw["block_out_channels"] == [32, 32]
    assert autoencoder_json.read(workdir) == builders.autoencoder_config(config)


def test_full_runlocal_trains_evaluates_and_writes_config(full_run):
    config, workdir, state = full_run
    assert config.mode == "full" and int(state.step) == 2
    _check_run(config, workdir, 2)
    assert train_cli.get_trainer("autoencoder") is autoencoder.train_and_evaluate


def test_decoder_mode_from_workdir_freezes_the_encoder(full_run, toy_dirs, tmp_path):
    _, source, _ = full_run
    pretrained = load_params(source)  # the full run keeps no EMA: init falls back to params
    config = local_config(autoencoder_finetune, toy_dirs, 2, eval_batches=1,
                          init_from=str(source))
    state = autoencoder.train_and_evaluate(config, str(tmp_path))
    _check_run(config, tmp_path, 2)
    enc0, dec0 = _split(pretrained)
    enc, dec = _split(state.params)
    # Started from the pretrained run and kept its encoder bit for bit ...
    assert set(enc) == {"encoder", "quant_conv"} and _leaves_equal(enc, enc0)
    # ... while every decoder-side tensor moved.
    for path, (a, b) in zip(jax.tree_util.tree_flatten_with_path(dec)[0],
                            zip(jax.tree.leaves(dec), jax.tree.leaves(dec0), strict=True),
                            strict=True):
        assert not np.array_equal(a, b), jax.tree_util.keystr(path[0])
    # Evaluation reads the frozen side from the live params, the rest from the EMA.
    params = autoencoder.eval_params(state, "decoder")
    assert params["encoder"] is state.params["encoder"]
    assert params["decoder"] is state.ema["decoder"]


def test_resume_is_exact(full_run, toy_dirs, tmp_path):
    # The full run stopped at step 2; a copy of it resumed to 4 must equal a straight 4.
    _, source, _ = full_run
    shutil.copytree(source, tmp_path / "b")
    straight = autoencoder.train_and_evaluate(local_config(autoencoder_sd, toy_dirs, 4),
                                              str(tmp_path / "a"))
    resumed = autoencoder.train_and_evaluate(local_config(autoencoder_sd, toy_dirs, 4),
                                             str(tmp_path / "b"))
    assert int(resumed.step) == 4
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(straight.params),
                 jax.device_get(resumed.params))
    jax.tree.map(np.testing.assert_array_equal, load_params(tmp_path / "b"),
                 jax.device_get(straight.params))
    losses = [{r["step"]: r["loss"] for r in loop.read_metrics(tmp_path / d)
               if r["split"] == "train"} for d in ("a", "b")]
    assert losses[0] == losses[1] and sorted(losses[0]) == [1, 2, 3, 4]


def test_init_from_diffusers_directory_and_safetensors_file(full_run, tmp_path):
    from safetensors.numpy import save_file

    from flipjax.models.convert_sd_vae import sd_vae_to_diffusers

    _, source, _ = full_run
    params = load_params(source)
    directory = tmp_path / "sd-vae" / "vae"
    directory.mkdir(parents=True)
    # sd_vae_to_diffusers must hand out contiguous arrays: safetensors writes raw buffers.
    weights = sd_vae_to_diffusers({"params": params})
    assert all(v.flags.c_contiguous for v in weights.values())
    save_file(weights, str(directory / "diffusion_pytorch_model.safetensors"))
    model_cfg = autoencoder_json.read(source)
    (directory / "config.json").write_text(json.dumps({
        "_class_name": "AutoencoderKL", "block_out_channels": [32, 32],
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1,
        "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32,
        "scaling_factor": model_cfg.scaling_factor}))
    for init_from in (tmp_path / "sd-vae",  # a pipeline directory: vae/ is found
                      directory / "diffusion_pytorch_model.safetensors"):
        config = autoencoder_finetune.get_config("runlocal")
        config.model.update(TEST_MODEL)
        config.init_from = str(init_from)
        loaded = autoencoder.load_pretrained(config)
        assert _leaves_equal(loaded, jax.device_get(params))
    # A different architecture in config.json is refused before any weight is read.
    (directory / "config.json").write_text(json.dumps({
        "block_out_channels": [32, 32], "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1,
        "latent_channels": 8}))
    config.init_from = str(directory)
    with pytest.raises(ValueError, match=r"another architecture.*latent_channels"):
        autoencoder.check_init_from(config)


def test_finetune_needs_init_from_outside_runlocal(tmp_path):
    config = autoencoder_finetune.get_config()
    with pytest.raises(ValueError, match=r"config\.init_from is empty"):
        autoencoder.train_and_evaluate(config, str(tmp_path / "run"))
    config.init_from = str(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"init_from .*missing does not exist"):
        autoencoder.train_and_evaluate(config, str(tmp_path / "run"))
    (tmp_path / "weights.bin").write_bytes(b"")
    config.init_from = str(tmp_path / "weights.bin")
    with pytest.raises(ValueError, match=r"only \.safetensors"):
        autoencoder.train_and_evaluate(config, str(tmp_path / "run"))
    # Failing at start: nothing was written.
    assert not (tmp_path / "run").exists()


def test_bad_fields_fail_at_start(tmp_path):
    for field, value, match in (("mode", "encoder", "config.mode"),
                                ("recon_loss", "lpips", "recon_loss"),
                                ("image_size", (30, 32), "multiples"),
                                ("frames_per_clip", 0, "frames_per_clip")):
        config = autoencoder_sd.get_config("runlocal")
        config[field] = value
        with pytest.raises(ValueError, match=match):
            autoencoder.train_and_evaluate(config, str(tmp_path))


def test_configs_build_with_recipe_values():
    sd, ft = autoencoder_sd.get_config(), autoencoder_finetune.get_config()
    assert sd.trainer == ft.trainer == "autoencoder"
    assert (sd.mode, ft.mode) == ("full", "decoder")
    assert builders.autoencoder_config(sd).block_out_channels == (128, 256, 512, 512)
    assert builders.autoencoder_config(ft) == builders.autoencoder_config(sd)
    assert tuple(sd.image_size) == (128, 128) and sd.kl_weight == 1e-6
    assert (sd.b1, sd.b2, sd.weight_decay, sd.ema_decay) == (0.5, 0.9, 0.0, None)
    # LDM's rate rule follows the effective batch.
    assert sd.learning_rate == pytest.approx(64 * 4.5e-6)
    sd.batch_size, sd.grad_accum_steps = 12, 2
    assert sd.learning_rate == pytest.approx(24 * 4.5e-6)
    assert ft.learning_rate == 1e-5 and ft.ema_decay == 0.999 and ft.init_from == ""
    with pytest.raises(AttributeError):
        ft.not_a_field = 1  # locked
    for module in (autoencoder_sd, autoencoder_finetune):
        local = module.get_config("runlocal")
        assert local.runlocal and local.total_steps == 50 and local.batch_size == 4
        assert tuple(local.image_size) == (32, 32) and local.toy_horizon == 4
        assert local.toy_text_dim == 32 and local.toy_grid == 8
        assert builders.autoencoder_config(local).block_out_channels == (32, 64, 64)
        with pytest.raises(ValueError, match="runlocal"):
            module.get_config("fast")


def test_loss_known_answers():
    target = jnp.zeros((2, 8, 8, 3))
    zeros = jnp.zeros((2, 2, 2, 4))
    loss, terms = autoencoder.autoencoder_loss(target + 0.5, target, zeros, zeros)
    assert float(terms["rec_loss"]) == pytest.approx(0.5) and float(terms["kl"]) == 0.0
    _, terms = autoencoder.autoencoder_loss(target - 0.5, target, zeros, zeros,
                                            recon_loss="l2")
    assert float(terms["rec_loss"]) == pytest.approx(0.25)
    # KL of N(1, 1) to N(0, 1) is 1/2 per element; 16 elements per image.
    loss, terms = autoencoder.autoencoder_loss(target + 0.5, target, zeros + 1, zeros,
                                               kl_weight=0.1)
    assert float(terms["kl"]) == pytest.approx(8.0)
    assert float(loss) == pytest.approx(0.5 + 0.1 * 8.0 / (8 * 8 * 3))
    np.testing.assert_allclose(
        autoencoder.kl_divergence(zeros, zeros + jnp.log(2.0)),
        [16 * 0.5 * (2 - 1 - math.log(2))] * 2, rtol=1e-6)


def test_model_config_json_round_trip_and_errors(tmp_path):
    cfg = AutoencoderConfig(block_out_channels=(32, 64), dtype=jnp.bfloat16, remat=True)
    path = autoencoder_json.write(cfg, tmp_path)
    assert autoencoder_json.read(path) == cfg
    path.write_text(json.dumps({**json.loads(path.read_text()), "extra": 1}))
    with pytest.raises(ValueError, match=r"unknown fields.*extra"):
        autoencoder_json.read(tmp_path)
    with pytest.raises(ValueError, match="not a flipjax autoencoder workdir"):
        autoencoder_json.read(tmp_path / "nowhere")
