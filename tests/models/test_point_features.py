"""The action module's point feature map: instruction FiLM and coordinate channels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flipjax.models.point_features import PointFeatureMap


def _text(seed, b=2, lt=5, dl=8):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(b, lt, dl)), jnp.float32)


def test_language_film_starts_as_the_plain_map_and_then_reads_the_instruction():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 6)), jnp.float32)
    plain = PointFeatureMap(4, layers=2)
    film = PointFeatureMap(4, layers=2, language=True)
    params = film.init(jax.random.key(0), x, _text(1))
    convs = {"params": {k: v for k, v in params["params"].items() if k.startswith("conv")}}
    # Zero-initialised modulation: the instruction changes nothing before training.
    np.testing.assert_allclose(film.apply(params, x, _text(1)), plain.apply(convs, x),
                               atol=1e-6)
    trained = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(2), p.shape),
                           params)
    a, b = film.apply(trained, x, _text(1)), film.apply(trained, x, _text(3))
    assert float(jnp.abs(a - b).max()) > 1e-2
    # Padding tokens do not count: a masked token may hold anything.
    mask = jnp.asarray([[True] * 3 + [False] * 2] * 2)
    t1, t2 = _text(1), _text(1).at[:, 3:].set(100.0)
    np.testing.assert_allclose(film.apply(trained, x, t1, mask), film.apply(trained, x, t2, mask),
                               atol=1e-5)


def test_coordinate_channels_tell_pixels_apart_in_a_uniform_image():
    x = jnp.ones((1, 8, 8, 3))
    m = PointFeatureMap(4, layers=1, coords=True)
    params = m.init(jax.random.key(0), x)
    out = np.asarray(m.apply(params, x))
    # Away from the padded border a plain convolution of a uniform image is uniform.
    assert np.abs(out[0, 2, 2] - out[0, 5, 5]).max() > 1e-3
    plain = PointFeatureMap(4, layers=1)
    p2 = plain.init(jax.random.key(0), x)
    flat = np.asarray(plain.apply(p2, x))
    np.testing.assert_allclose(flat[0, 2, 2], flat[0, 5, 5], atol=1e-6)


def test_language_map_without_text_is_refused():
    m = PointFeatureMap(4, language=True)
    with pytest.raises(ValueError, match="text"):
        m.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


@pytest.mark.parametrize("flag", ["point_feature_language", "point_feature_coords"])
def test_cvae_flags_need_point_features(flag):
    from flipjax.models.flow_cvae import CVAEConfig
    with pytest.raises(ValueError, match=flag):
        CVAEConfig.variant("tiny", **{flag: True}).validate()
