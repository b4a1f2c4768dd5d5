"""The SD-VAE frame codec: parity with diffusers' AutoencoderKL, the real config's size,
shapes, the converter's checks, bf16 and remat options."""

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flipjax.models.autoencoder import (
    AutoencoderConfig,
    AutoencoderKL,
    num_parameters,
)
from flipjax.models.convert_sd_vae import (
    sd_vae_decode,
    sd_vae_encode,
    sd_vae_from_diffusers,
    sd_vae_to_diffusers,
)

DATA = pathlib.Path(__file__).resolve().parents[1] / "data"
SD_VAE_FT_EMA_PARAMS = 83_653_863  # sum(p.numel() for p in diffusers' model.parameters())


@pytest.fixture(scope="module")
def golden():
    z = np.load(DATA / "sd_vae_tiny_seed0.npz")
    state = {k.removeprefix("param/"): z[k] for k in z.files if k.startswith("param/")}
    return z, state, str(z["config_json"])


@pytest.fixture(scope="module")
def converted(golden):
    _, state, config = golden
    return sd_vae_from_diffusers(state, config)


def random_variables(module: AutoencoderKL, x, seed: int = 0) -> dict:
    """Random parameters of the right shapes, without compiling ``init`` (XLA takes ~20 s on
    CPU to compile the threefry draws of every parameter)."""
    shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), x))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), jnp.float32), shapes)


def rel_err(ours, theirs) -> float:
    theirs = np.asarray(theirs)
    return float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max())


# ------------------------------------------------------------------------------------------
# Parity with diffusers
# ------------------------------------------------------------------------------------------


def test_encode_matches_diffusers(golden, converted):
    z, _, _ = golden
    mean, logvar = sd_vae_encode(*converted, z["in/x_nchw"])
    assert mean.shape == z["out/mean"].shape and logvar.shape == z["out/logvar"].shape
    assert rel_err(mean, z["out/mean"]) <= 1e-4
    assert rel_err(logvar, z["out/logvar"]) <= 1e-4


def test_decode_matches_diffusers(golden, converted):
    z, _, _ = golden
    out = sd_vae_decode(*converted, z["in/z_nchw"])
    assert out.shape == z["out/decoded_nchw"].shape
    assert rel_err(out, z["out/decoded_nchw"]) <= 1e-4


def test_fixture_config_is_the_tiny_named_config(golden, converted):
    module, _ = converted
    assert module.config == AutoencoderConfig.variant("tiny")
    assert json.loads(golden[2])["block_out_channels"] == [32, 64, 64]


def test_legacy_attention_names_load_identically(golden, converted):
    _, state, config = golden
    legacy = {}
    for k, v in state.items():
        for new, old in ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."),
                         (".to_out.0.", ".proj_attn.")):
            k = k.replace(new, old)
        legacy[k] = v
    assert any(".proj_attn." in k for k in legacy)
    _, variables = sd_vae_from_diffusers(legacy, config)
    jax.tree.map(np.testing.assert_array_equal, variables, converted[1])


# ------------------------------------------------------------------------------------------
# The real sd-vae-ft-ema configuration (abstract only: nothing of its size is allocated)
# ------------------------------------------------------------------------------------------


def test_sd_vae_ft_ema_parameter_count():
    assert num_parameters(AutoencoderConfig.variant("sd-vae-ft-ema")) == SD_VAE_FT_EMA_PARAMS


def test_sd_vae_ft_ema_config_from_diffusers_json():
    cfg = AutoencoderConfig.from_diffusers({
        "_class_name": "AutoencoderKL", "_diffusers_version": "0.4.2", "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
        "out_channels": 3, "sample_size": 256, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "force_upcast": True, "scaling_factor": 0.18215})
    assert cfg == AutoencoderConfig.variant("sd-vae-ft-ema")
    assert cfg.downsample_factor == 8


def test_sd_vae_ft_ema_shapes_downsample_by_8():
    module = AutoencoderKL(AutoencoderConfig.variant("sd-vae-ft-ema"))
    x = jax.ShapeDtypeStruct((2, 64, 96, 3), jnp.float32)
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    mean, logvar = jax.eval_shape(lambda v, x: module.apply(v, x, method=module.encode),
                                  variables, x)
    assert mean.shape == logvar.shape == (2, 8, 12, 4)
    out = jax.eval_shape(lambda v, z: module.apply(v, z, method=module.decode), variables, mean)
    assert out.shape == (2, 64, 96, 3) and out.dtype == jnp.float32


# ------------------------------------------------------------------------------------------
# Converter checks
# ------------------------------------------------------------------------------------------


def test_converter_reports_missing_key(golden):
    _, state, config = golden
    state = dict(state)
    del state["encoder.mid_block.attentions.0.to_k.bias"]
    with pytest.raises(ValueError, match=r"missing \(1\)[\s\S]*attentions\.0\.to_k\.bias"):
        sd_vae_from_diffusers(state, config)


def test_converter_reports_unexpected_key(golden):
    _, state, config = golden
    state = {**state, "encoder.down_blocks.3.resnets.0.conv1.weight": np.zeros((8, 8, 3, 3))}
    with pytest.raises(ValueError, match=r"unexpected \(1\)[\s\S]*down_blocks\.3\.resnets"):
        sd_vae_from_diffusers(state, config)


def test_converter_reports_shape_mismatch(golden):
    _, state, config = golden
    state = {**state, "decoder.conv_out.weight": np.zeros((3, 64, 3, 3), np.float32)}
    with pytest.raises(ValueError, match=r"shape mismatch[\s\S]*expected \[3, 32, 3, 3\]"):
        sd_vae_from_diffusers(state, config)


def test_config_rejects_other_block_types(golden):
    cfg = json.loads(golden[2])
    cfg["down_block_types"][1] = "AttnDownEncoderBlock2D"
    with pytest.raises(ValueError, match="DownEncoderBlock2D"):
        AutoencoderConfig.from_diffusers(cfg)
    with pytest.raises(ValueError, match="norm_num_groups"):
        AutoencoderConfig(block_out_channels=(32, 48), norm_num_groups=32)


def test_other_config_round_trips_through_diffusers_names(key):
    # Not the fixture's shapes: 2 levels, 1 layer, 8 groups, 4 -> 2 channels, 8 latents.
    cfg = {"in_channels": 4, "out_channels": 2, "latent_channels": 8,
           "block_out_channels": [16, 32], "down_block_types": ["DownEncoderBlock2D"] * 2,
           "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1,
           "norm_num_groups": 8, "some_future_key": 1}
    module = AutoencoderKL(AutoencoderConfig.from_diffusers(cfg))
    x = jax.random.normal(key, (1, 8, 8, 4))
    variables = random_variables(module, x)
    state = sd_vae_to_diffusers(variables)
    assert state["encoder.conv_in.weight"].shape == (16, 4, 3, 3)
    assert state["decoder.mid_block.attentions.0.to_out.0.weight"].shape == (32, 32)
    assert len(state) == len(jax.tree.leaves(variables))
    module2, variables2 = sd_vae_from_diffusers(state, cfg)
    assert module2.config == module.config
    jax.tree.map(np.testing.assert_array_equal, variables2, variables)
    recon = sd_vae_decode(module2, variables2, jnp.zeros((1, 8, 4, 4)))
    assert recon.shape == (1, 2, 8, 8)


# ------------------------------------------------------------------------------------------
# Module behaviour and options
# ------------------------------------------------------------------------------------------


def test_scaled_latents_round_trip_the_scaling(golden, converted):
    z, _, _ = golden
    module, variables = converted
    x = jnp.asarray(z["in/x_nchw"]).transpose(0, 2, 3, 1)

    @jax.jit  # one compilation for all the entry points
    def run(v, x, k):
        mean, _ = module.apply(v, x, method=module.encode)
        lat = module.apply(v, x, method=module.encode_to_latents)
        return dict(
            mean=mean, lat=lat,
            dec_lat=module.apply(v, lat, method=module.decode_latents),
            dec_mean=module.apply(v, mean, method=module.decode),
            sample=module.apply(v, x, k, method=module.encode_to_latents),
            call=module.apply(v, x, k, sample_posterior=True))

    r = run(variables, x, jax.random.key(1))
    np.testing.assert_allclose(r["lat"], r["mean"] * 0.18215, rtol=1e-6)
    np.testing.assert_allclose(r["dec_lat"], r["dec_mean"], atol=1e-5)
    assert not np.allclose(r["sample"], r["lat"])
    recon, mean2, _ = r["call"]
    assert recon.shape == x.shape
    np.testing.assert_array_equal(mean2, r["mean"])
    with pytest.raises(ValueError, match="PRNG key"):
        jax.eval_shape(lambda v, x: module.apply(v, x, sample_posterior=True), variables, x)


def test_bad_shapes_raise(converted):
    module, variables = converted
    with pytest.raises(ValueError, match="NHWC"):
        module.apply(variables, jnp.zeros((1, 3, 32, 32)), method=module.encode)
    with pytest.raises(ValueError, match="multiples of 4"):
        module.apply(variables, jnp.zeros((1, 30, 32, 3)), method=module.encode)
    with pytest.raises(ValueError, match="NCHW"):
        sd_vae_decode(module, variables, jnp.zeros((4, 8, 8)))


def test_bfloat16_compute_keeps_float32_params(golden):
    z, state, config = golden
    module, variables = sd_vae_from_diffusers(state, config, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
    mean, _ = sd_vae_encode(module, variables, z["in/x_nchw"])
    out = sd_vae_decode(module, variables, z["in/z_nchw"])
    assert mean.dtype == out.dtype == jnp.float32
    assert rel_err(mean, z["out/mean"]) < 5e-2
    assert rel_err(out, z["out/decoded_nchw"]) < 5e-2


def test_remat_gives_the_same_gradients(key):
    # Through the decoder only (it has the same blocks as the encoder) to keep compiles short.
    z = jax.random.normal(key, (1, 4, 4, 4))
    small = dict(block_out_channels=(8,), layers_per_block=1, norm_num_groups=4)
    plain = AutoencoderKL(AutoencoderConfig.variant("tiny", **small))
    remat = AutoencoderKL(AutoencoderConfig.variant("tiny", **small, remat=True))
    variables = random_variables(plain, jnp.zeros((1, 4, 4, 3)))

    @jax.jit
    def grads(v):
        loss = lambda m: lambda v: jnp.mean(jnp.square(m.apply(v, z, method=m.decode)))
        return jax.grad(loss(plain))(v), jax.grad(loss(remat))(v)

    g_plain, g_remat = grads(variables)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 g_remat, g_plain)


def test_parameters_carry_logical_axes(key):
    module = AutoencoderKL(AutoencoderConfig.variant("tiny"))
    p = jax.eval_shape(module.init, key, jnp.zeros((1, 4, 4, 3)))["params"]
    assert p["encoder"]["mid_block"]["attentions_0"]["to_q"]["kernel"].names == ("embed", "mlp")
    assert p["decoder"]["up_blocks_0"]["resnets_0"]["norm1"]["scale"].names == ("embed",)
    assert p["decoder"]["conv_out"]["kernel"].names == (None, None, "embed", None)
