"""flipjax.codec: pixel and autoencoder codecs, their constructors, flow conventions, errors."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flipjax import codec as C
from flipjax import flow_conditioning
from flipjax.checkpoints import Checkpointer
from flipjax.models.autoencoder import AutoencoderConfig, AutoencoderKL


@pytest.fixture(scope="module")
def tiny_ae():
    """A 3-level (factor 4) autoencoder with random weights, and one of frames."""
    cfg = AutoencoderConfig.variant("tiny", block_out_channels=(32, 32, 32), layers_per_block=1)
    frames = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1.0, maxval=1.0)
    params = nn.meta.unbox(AutoencoderKL(cfg).init(jax.random.key(0), frames)["params"])
    return cfg, params, frames


def _ae(cfg, params, method, x):
    return AutoencoderKL(cfg).apply({"params": params}, x, method=method)


def _config_json(cfg):
    # What the autoencoder trainer writes: asdict with the dtype by name.
    return json.dumps(dataclasses.asdict(cfg), default=lambda o: jnp.dtype(o).name)


# ------------------------------------------------------------------------------ pixels


def test_pixel_codec_layout_and_exact_round_trip():
    codec = C.pixel_codec(4)
    assert (codec.factor, codec.channels, codec.scale) == (4, 48, 1.0)
    assert codec.latent_shape((32, 24)) == (8, 6, 48)
    x = jax.random.uniform(jax.random.key(0), (2, 32, 24, 3), minval=-1, maxval=1)
    z = jax.jit(lambda c, x: c.encode(x))(codec, x)
    assert z.shape == (2, 8, 6, 48)
    # Space-to-depth: pixel (4i + p, 4j + q, c) is channel (4p + q) * 3 + c of cell (i, j).
    assert float(z[1, 2, 5, (4 * 3 + 1) * 3 + 2]) == float(x[1, 4 * 2 + 3, 4 * 5 + 1, 2])
    np.testing.assert_array_equal(np.asarray(codec.decode(z)), np.asarray(x))
    video = x.reshape(1, 2, 32, 24, 3)
    np.testing.assert_array_equal(np.asarray(codec.decode_video(codec.encode_video(video))),
                                  np.asarray(video))
    assert jax.tree.leaves(codec) == []  # nothing to pass: no parameters


def test_pixel_codec_scale():
    codec = C.pixel_codec(2, scale=0.5)
    x = jnp.ones((1, 4, 4, 3))
    np.testing.assert_allclose(np.asarray(codec.encode(x)), 0.5)
    np.testing.assert_allclose(np.asarray(codec.decode(codec.encode(x))), 1.0)


# ------------------------------------------------------------------------- autoencoder


def test_autoencoder_codec_is_the_scaled_posterior_mean(tiny_ae):
    cfg, params, frames = tiny_ae
    codec = C.autoencoder_codec(cfg, params)
    assert (codec.factor, codec.channels) == (4, 4)
    assert codec.scale == pytest.approx(0.18215)
    mean, _ = _ae(cfg, params, AutoencoderKL.encode, frames)
    encode = jax.jit(lambda c, x: c.encode(x))
    z = encode(codec, frames)
    np.testing.assert_allclose(np.asarray(z), np.asarray(mean) * 0.18215, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(encode(codec, frames)), np.asarray(z))  # no noise
    want = _ae(cfg, params, AutoencoderKL.decode, z / 0.18215)
    np.testing.assert_allclose(np.asarray(codec.decode(z)), np.asarray(want), rtol=1e-4,
                               atol=1e-5)
    # A scale override applies on both sides.
    other = C.autoencoder_codec(cfg, {"params": params}, scale=1.0)
    np.testing.assert_allclose(np.asarray(other.encode(frames)), np.asarray(mean), rtol=1e-5,
                               atol=1e-6)


def test_autoencoder_params_are_jit_arguments(tiny_ae):
    cfg, params, frames = tiny_ae
    codec = C.autoencoder_codec(cfg, params)
    assert len(jax.tree.leaves(codec)) == len(jax.tree.leaves(params))
    lowered = jax.jit(lambda c, x: c.encode(x)).lower(codec, frames)
    # Every parameter is an argument of the compiled program, not a baked-in constant.
    n_args = len(jax.tree.leaves(lowered.args_info))
    assert n_args == len(jax.tree.leaves(params)) + 1


def test_autoencoder_params_must_fit_the_config(tiny_ae):
    cfg, params, _ = tiny_ae
    bigger = dataclasses.replace(cfg, block_out_channels=(32, 64, 64))
    with pytest.raises(ValueError, match="shape mismatch"):
        C.autoencoder_codec(bigger, params)
    deeper = dataclasses.replace(cfg, layers_per_block=2)
    with pytest.raises(ValueError, match="missing"):
        C.autoencoder_codec(deeper, params)


def test_from_workdir_reads_checkpoint_and_config(tiny_ae, tmp_path):
    cfg, params, frames = tiny_ae
    ema = jax.tree.map(lambda p: 0.5 * p, params)
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(7, {"params": params, "ema": ema, "step": 7})
    want = C.autoencoder_codec(cfg, params).encode(frames)
    # Explicit config, no JSON file.
    got = C.from_workdir(tmp_path, cfg).encode(frames)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=C.AUTOENCODER_CONFIG_FILE):
        C.from_workdir(tmp_path)
    (tmp_path / C.AUTOENCODER_CONFIG_FILE).write_text(_config_json(cfg))
    codec = C.from_workdir(tmp_path)
    assert codec.autoencoder == cfg
    np.testing.assert_allclose(np.asarray(codec.encode(frames)), np.asarray(want), rtol=1e-5,
                               atol=1e-6)
    ema_codec = C.from_workdir(tmp_path, ema=True)
    np.testing.assert_allclose(np.asarray(ema_codec.encode(frames)),
                               np.asarray(C.autoencoder_codec(cfg, ema).encode(frames)),
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(ema_codec.encode(frames)), np.asarray(want))
    # A config JSON that does not describe the saved parameters.
    wrong = dataclasses.replace(cfg, block_out_channels=(32, 64, 64))
    (tmp_path / C.AUTOENCODER_CONFIG_FILE).write_text(_config_json(wrong))
    with pytest.raises(ValueError, match="do not fit the config"):
        C.from_workdir(tmp_path)
    (tmp_path / C.AUTOENCODER_CONFIG_FILE).write_text(json.dumps({"widths": [1]}))
    with pytest.raises(ValueError, match="widths"):
        C.from_workdir(tmp_path)


def test_from_workdir_without_checkpoint(tmp_path, tiny_ae):
    with pytest.raises(FileNotFoundError):
        C.from_workdir(tmp_path, tiny_ae[0])


def test_from_diffusers_dir(tiny_ae, tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    from flipjax.models.convert_sd_vae import sd_vae_to_diffusers

    cfg, params, frames = tiny_ae
    vae = tmp_path / "pipeline" / "vae"
    vae.mkdir(parents=True)
    with pytest.raises(ValueError, match=r"config\.json"):
        C.from_diffusers_dir(vae)
    (vae / "config.json").write_text(json.dumps({
        "_class_name": "AutoencoderKL", "block_out_channels": [32, 32, 32],
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3, "layers_per_block": 1,
        "latent_channels": 4, "norm_num_groups": 32, "scaling_factor": 0.18215}))
    with pytest.raises(ValueError, match="safetensors"):
        C.from_diffusers_dir(vae)
    # safetensors writes a transposed view in memory order: store contiguous copies.
    state = {k: np.ascontiguousarray(v) for k, v in sd_vae_to_diffusers({"params": params}).items()}
    safetensors_numpy.save_file(state, str(vae / "diffusion_pytorch_model.safetensors"))
    codec = C.from_diffusers_dir(tmp_path / "pipeline")  # finds vae/
    want = C.autoencoder_codec(cfg, params).encode(frames)
    np.testing.assert_allclose(np.asarray(codec.encode(frames)), np.asarray(want), rtol=1e-5,
                               atol=1e-6)


# ------------------------------------------------------------------------------ errors


def test_shape_errors_name_the_shape(tiny_ae):
    codec = C.pixel_codec(4)
    with pytest.raises(ValueError, match=r"\[B H W 3\].*\[2, 8, 8, 4\]"):
        codec.encode(jnp.zeros((2, 8, 8, 4)))
    with pytest.raises(ValueError, match="30x30"):
        codec.encode(jnp.zeros((1, 30, 30, 3)))
    with pytest.raises(ValueError, match=r"latents must be \[B H W 48\]"):
        codec.decode(jnp.zeros((1, 2, 2, 4)))
    with pytest.raises(ValueError, match="B T H W C"):
        codec.encode_video(jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="multiples of its factor 4"):
        codec.latent_shape((30, 32))
    ae = C.autoencoder_codec(tiny_ae[0], tiny_ae[1])
    with pytest.raises(ValueError, match=r"\[1, 6, 6, 3\]"):
        ae.encode(jnp.zeros((1, 6, 6, 3)))
    with pytest.raises(ValueError, match="kind"):
        C.LatentCodec("vqgan", 4, 4)
    with pytest.raises(ValueError, match="scale"):
        C.pixel_codec(4, scale=0.0)
    with pytest.raises(ValueError, match="AutoencoderConfig"):
        C.LatentCodec("autoencoder", 8, 4)


# ---------------------------------------------------------------------- conditioning


def test_flow_to_model_units_and_round_trip():
    tracks = jnp.asarray([[[[-0.5, -0.5], [31.5, 15.5], [15.5, 7.5]]]])  # [1 1 3 2], W 32 H 16
    np.testing.assert_array_equal(np.asarray(flow_conditioning.flow_to_model(tracks, (16, 32))),
                                  np.asarray(tracks))
    unit = flow_conditioning.flow_to_model(tracks, (16, 32), "unit")
    np.testing.assert_allclose(np.asarray(unit[0, 0]), [[-1, -1], [1, 1], [0, 0]], atol=1e-6)
    np.testing.assert_allclose(np.asarray(flow_conditioning.flow_from_model(unit, (16, 32), "unit")),
                               np.asarray(tracks), atol=1e-5)
    with pytest.raises(ValueError, match="normalization"):
        flow_conditioning.flow_to_model(tracks, (16, 32), "metres")
    with pytest.raises(ValueError, match=r"\[B N L 2\]"):
        flow_conditioning.flow_to_model(tracks[0], (16, 32))


def test_drop_conditions_nulls_only_dropped_samples():
    flow = jnp.ones((2, 3, 4, 2))
    text = jnp.ones((2, 5, 6))
    mask = jnp.ones((2, 5), bool)
    f, t, m = flow_conditioning.drop_conditions(flow, text, mask, jnp.asarray([True, False]))
    assert float(jnp.abs(f[0]).sum()) == 0 and float(jnp.abs(t[0]).sum()) == 0
    assert not bool(m[0].any())
    np.testing.assert_array_equal(np.asarray(f[1]), 1.0)
    np.testing.assert_array_equal(np.asarray(t[1]), 1.0)
    assert bool(m[1].all())
    with pytest.raises(ValueError, match="drop"):
        flow_conditioning.drop_conditions(flow, text, mask, jnp.asarray([True]))


def test_importing_the_codec_does_not_import_flax():
    # The planner (flax-free by design) imports flow_to_model and receives codecs.
    import subprocess
    import sys

    code = "import sys, flipjax.codec; sys.exit('flax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
