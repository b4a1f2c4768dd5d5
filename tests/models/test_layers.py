"""Shared blocks: sin-cos tables match the official FLIP buffers, attention invariants."""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 2e-6), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_attention_matches_the_einsum_path(key, dtype, atol, masked):
    """jax.nn.dot_product_attention (the models' path) against the einsum reference, values
    and gradients, with and without a key padding mask broadcast from [B 1 1 S]."""
    ks = jax.random.split(key, 4)
    q, k, v = (jax.random.normal(kk, (2, 5, 3, 8)).astype(dtype) for kk in ks[:3])
    mask = layers.padding_mask(jax.random.uniform(ks[3], (2, 5)) > 0.4) if masked else None
    if masked:
        mask = mask.at[:, :, :, 0].set(True)   # every row keeps a key
    out = layers.dot_product_attention(q, k, v, mask)
    ref = layers.reference_attention(q, k, v, mask)
    assert out.dtype == ref.dtype == dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               atol=atol)

    def grads(fn):
        return jax.grad(lambda a, b, c: jnp.sum(fn(a, b, c, mask).astype(jnp.float32) ** 2),
                        argnums=(0, 1, 2))(q, k, v)

    for g, r in zip(grads(layers.dot_product_attention), grads(layers.reference_attention),
                    strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32),
                                   atol=10 * atol)


def test_attention_masks_of_fewer_axes_broadcast_and_bad_settings_are_refused(key):
    q = jax.random.normal(key, (1, 4, 2, 8))
    keep = jnp.array([True, True, False, True])
    np.testing.assert_allclose(layers.dot_product_attention(q, q, q, keep),
                               layers.reference_attention(q, q, q, keep), atol=2e-6)
    with pytest.raises(ValueError, match="implementation"):
        layers.dot_product_attention(q, q, q, implementation="flash")
    with pytest.raises(ValueError, match="broadcast"):
        layers.dot_product_attention(q, q, q, jnp.ones((1, 1, 1, 4, 4), bool))


def test_parameters_carry_logical_axes(key):
    v = layers.PostLNEncoderLayer(4, 64).init(key, jnp.ones((1, 3, 32)))
    boxed = v["params"]["attn"]["query"]["kernel"]
    assert isinstance(boxed, nn.Partitioned) and boxed.names == ("embed", "heads", "kv")
