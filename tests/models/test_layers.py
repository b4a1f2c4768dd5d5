"""Shared blocks: sin-cos tables match the official FLIP buffers, attention invariants."""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flipjax.models import layers

DATA = pathlib.Path(__file__).resolve().parents[1] / "data"


def test_sincos_tables_match_official_buffers():
    z = np.load(DATA / "flip_official_tiny_seed0.npz")
    np.testing.assert_allclose(layers.sincos_2d(64, 4, 4), z["cvae/param/img_pos_embedding"][0],
                               atol=1e-6)
    np.testing.assert_allclose(layers.sincos_2d(64, 4, 4), z["dit/param/pos_embed"][0],
                               atol=1e-6)
    np.testing.assert_allclose(layers.sincos_1d(64, np.arange(5)), z["dit/param/temp_embed"][0],
                               atol=1e-6)


def test_attention_with_precomputed_keys_values_is_identical(key):
    x = jax.random.normal(key, (2, 5, 32))
    ctx = jax.random.normal(jax.random.fold_in(key, 1), (2, 7, 32))
    att = layers.MultiHeadAttention(4, 32)
    v = att.init(key, x, ctx)
    kv = att.apply(v, ctx, method=layers.MultiHeadAttention.keys_values)
    np.testing.assert_array_equal(att.apply(v, x, kv=kv), att.apply(v, x, ctx))


def test_masked_keys_do_not_change_the_output(key):
    x = jax.random.normal(key, (1, 6, 16))
    att = layers.MultiHeadAttention(2, 16)
    v = att.init(key, x)
    valid = jnp.array([[True] * 4 + [False] * 2])
    out = att.apply(v, x, mask=layers.padding_mask(valid))
    x2 = x.at[:, 4:].set(100.0)
    out2 = att.apply(v, x2, mask=layers.padding_mask(valid))
    np.testing.assert_allclose(out[:, :4], out2[:, :4], atol=1e-5)


def test_parameters_carry_logical_axes(key):
    v = layers.PostLNEncoderLayer(4, 64).init(key, jnp.ones((1, 3, 32)))
    boxed = v["params"]["attn"]["query"]["kernel"]
    assert isinstance(boxed, nn.Partitioned) and boxed.names == ("embed", "heads", "kv")
