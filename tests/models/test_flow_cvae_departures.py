"""The CVAE's departures from the official design (CVAEConfig.point_features, unit_coords,
latent_to_queries): what each query token can see."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flipjax.models.flow_cvae import CVAEConfig, FlowCVAE

B, N = 2, 5


def _model(**kw):
    m = FlowCVAE(CVAEConfig.variant("tiny", language_dim=8, **kw))
    rng = np.random.default_rng(0)
    flow = jnp.asarray(rng.uniform(4, 27, (B, N, 4, 2)), jnp.float32)
    hist = jnp.asarray(rng.uniform(-1, 1, (B, 2, 32, 32, 3)), jnp.float32)
    text = jnp.asarray(rng.normal(size=(B, 3, 8)), jnp.float32)
    params = nn.unbox(m.init({"params": jax.random.key(0), "latent": jax.random.key(1)}, flow,
                             hist, text)["params"])
    return m, params, flow, hist, text


def _tokens(m, params, points, hist, z):
    return m.apply({"params": params}, points, hist, z, method=FlowCVAE._query_tokens)


def test_official_defaults_add_no_parameters():
    plain = _model()[1]
    full = _model(point_features=16, latent_to_queries=True)[1]
    assert set(full) - set(plain) == {"point_feature_map", "point_feature_encoder",
                                      "latent_to_query"}
    assert CVAEConfig().point_features == 0 and not CVAEConfig().unit_coords
    assert not CVAEConfig().latent_to_queries


def test_point_features_see_the_image_under_the_point_and_only_near_it():
    m, params, _, hist, _ = _model(point_features=16)
    pts = jnp.asarray([[[10.0, 12.0], [25.0, 5.0]]] * B)
    z = jnp.zeros((B, 64))
    base = _tokens(m, params, pts, hist, z)
    # Two 3x3 convolutions: a pixel two away from (10, 12) is seen, three away is not.
    for (u, v), seen in (((10, 12), True), ((12, 13), True), ((13, 12), False)):
        h2 = hist.at[:, :, v, u].add(0.7)
        changed = np.abs(np.asarray(_tokens(m, params, pts, h2, z) - base)).max(-1)
        assert bool(changed[0, 0] > 1e-4) == seen, (u, v)
        np.testing.assert_allclose(changed[:, 1], 0.0, atol=1e-6)  # the far point never
    # Without the option, the token is the coordinates' embedding alone.
    m0, p0, _, _, _ = _model()
    np.testing.assert_array_equal(_tokens(m0, p0, pts, hist, z),
                                  _tokens(m0, p0, pts, hist.at[:, :, 12, 10].add(0.7), z))


@pytest.mark.parametrize("on", [False, True])
def test_latent_reaches_every_query_token_only_when_asked(on):
    m, params, flow, hist, _ = _model(latent_to_queries=on)
    z0, z1 = jnp.zeros((B, 64)), jnp.ones((B, 64))
    diff = np.abs(np.asarray(_tokens(m, params, flow[:, :, 0], hist, z1)
                             - _tokens(m, params, flow[:, :, 0], hist, z0))).max(-1)
    assert np.all(diff > 1e-4) if on else np.all(diff == 0)


def test_unit_coords_map_the_frame_corners_to_plus_minus_one():
    m, params, _, hist, _ = _model(unit_coords=True)
    corners = jnp.asarray([[[0.0, 0.0], [31.0, 31.0], [0.0, 31.0]]] * B)
    tok = _tokens(m, params, corners, hist, jnp.zeros((B, 64)))
    enc = params["query_point_encoder"]
    unit = jnp.asarray([[-1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    np.testing.assert_allclose(tok[0], unit @ enc["kernel"] + enc["bias"], atol=1e-5)


def test_every_option_trains_end_to_end():
    m, params, flow, hist, text = _model(point_features=8, unit_coords=True,
                                         latent_to_queries=True)
    out = m.apply({"params": params}, flow, hist, text, rngs={"latent": jax.random.key(2)})
    assert out["flow"].shape == (B, N, 4, 2)
    np.testing.assert_allclose(out["flow"][:, :, 0], flow[:, :, 0])

    def loss(p):
        o = m.apply({"params": p}, flow, hist, text, rngs={"latent": jax.random.key(2)})
        return jnp.mean((o["flow"] - flow) ** 2)
    grads = jax.grad(loss)(params)
    for name in ("point_feature_map", "point_feature_encoder", "latent_to_query"):
        leaves = jax.tree_util.tree_leaves(grads[name])
        assert any(float(jnp.abs(g).max()) > 0 for g in leaves), name


def test_free_nats_make_small_kls_free():
    from flipjax.models import cvae_loss

    mu = jnp.asarray([[0.1, 0.0], [3.0, 0.0]])  # KL 0.005 and 4.5 nats
    logvar = jnp.zeros((2, 2))
    kl = cvae_loss.kl_divergence(mu, logvar)
    np.testing.assert_allclose(kl, [0.005, 4.5], rtol=1e-5)
    got = cvae_loss.kl_loss(mu, logvar, batch_sum=False, robust=False, free_nats=1.0)
    assert float(got) == pytest.approx((1.0 + 4.5) / 2)
    # The example under the threshold gets no gradient; the other one its full KL gradient.
    g = jax.grad(lambda m: cvae_loss.kl_loss(m, logvar, batch_sum=False, robust=False,
                                             free_nats=1.0))(mu)
    np.testing.assert_allclose(g, [[0.0, 0.0], [1.5, 0.0]], atol=1e-6)
    assert float(cvae_loss.kl_loss(mu, logvar, free_nats=0.0)) == pytest.approx(
        float(cvae_loss.kl_loss(mu, logvar)))


def test_dilated_point_features_see_further():
    # Layer i dilated by 2**i: 3 layers reach 1 + 2 * (1 + 2 + 4) = 15 pixels; 2 plain ones 5.
    from flipjax.models.flow_cvae import PointFeatureMap

    def reach(**kw):
        m = PointFeatureMap(4, **kw)
        x = jnp.zeros((1, 32, 32, 3))
        params = m.init(jax.random.key(0), x)
        grad = jax.grad(lambda img: m.apply(params, img)[0, 16, 16].sum())(x)
        cols = np.nonzero(np.abs(np.asarray(grad[0, 16, :, :])).sum(-1))[0]
        return cols.max() - cols.min() + 1

    assert reach() == 5
    assert reach(layers=3, dilation=2) == 15
    with pytest.raises(ValueError, match="point_feature"):
        CVAEConfig.variant("tiny", point_features=8, point_feature_layers=0).validate()


def test_relative_flow_encodes_start_in_unit_and_displacements_in_pixels():
    m, params, flow, hist, text = _model(relative_flow=True)
    plain = FlowCVAE(CVAEConfig.variant("tiny", language_dim=8))
    # Same parameters, so the relative encoder must equal the official one fed the transform.
    start = 2.0 * flow[:, :, :1] / 31.0 - 1.0
    moved = jnp.concatenate([start, flow[:, :, 1:] - flow[:, :, :1]], axis=2)
    rel = m.apply({"params": params}, flow, hist, text, method=FlowCVAE.encode)
    ref = plain.apply({"params": params}, moved, hist, text, method=FlowCVAE.encode)
    np.testing.assert_allclose(rel["z_mu"], ref["z_mu"], atol=1e-5)
    # Shifting a whole trajectory keeps its displacements: only the start token input moves.
    shifted = m.apply({"params": params}, flow + 3.0, hist, text, method=FlowCVAE.encode)
    assert not np.allclose(shifted["z_mu"], rel["z_mu"])
    assert set(params) == set(_model()[1])  # no new parameters


def test_learned_prior_kl_and_sampling():
    from flipjax.models.cvae_loss import kl_divergence
    m, params, flow, hist, text = _model(learned_prior=True)
    assert {"prior_token", "prior_mu", "prior_logvar"} <= set(params)
    out = m.apply({"params": params}, flow, hist, text, rngs={"latent": jax.random.key(3)})
    mu, logvar = out["prior_mu"], out["prior_logvar"]
    assert mu.shape == (B, 64) and float(jnp.abs(mu).max()) > 1e-3  # not the fixed N(0, I)
    # The prior sees no flow: it is the same for any trajectories.
    other = m.apply({"params": params}, flow + 2.0, hist, text,
                    rngs={"latent": jax.random.key(3)})
    np.testing.assert_allclose(other["prior_mu"], mu, atol=1e-6)
    # Sampling draws z ~ N(prior_mu, exp(prior_logvar)): many draws recover its moments.
    draws = jax.vmap(lambda k: m.apply({"params": params}, flow[:, :, 0], hist, text,
                                       rngs={"latent": k}, method=FlowCVAE.sample)["z"])(
        jax.random.split(jax.random.key(4), 512))
    np.testing.assert_allclose(draws.mean(0), mu, atol=0.25)
    np.testing.assert_allclose(draws.std(0), jnp.exp(0.5 * logvar), rtol=0.15)
    # ... and not the fixed N(0, I): the draws sit around the prior's mean.
    assert float(jnp.abs(draws.mean(0)).max()) > 0.5
    # KL against itself is 0, and against N(0, I) it is the standard form.
    np.testing.assert_allclose(kl_divergence(mu, logvar, prior=(mu, logvar)), 0.0, atol=1e-4)
    zero = jnp.zeros_like(mu)
    np.testing.assert_allclose(kl_divergence(mu, logvar, prior=(zero, zero)),
                               kl_divergence(mu, logvar), rtol=1e-5)


def test_kl_warmup_ramps_the_kl_weight_from_zero():
    from flipjax.models.cvae_loss import CVAELossConfig, kl_weight
    c = CVAELossConfig(kl=0.3, kl_warmup_steps=100)
    got = [float(kl_weight(c, s)) for s in (0, 50, 100, 5000)]
    np.testing.assert_allclose(got, [0.0, 0.15, 0.3, 0.3], rtol=1e-6)
    assert float(kl_weight(c)) == pytest.approx(0.3)     # evaluation: the full weight
    assert float(kl_weight(CVAELossConfig(kl=0.3), 0)) == pytest.approx(0.3)  # official


def test_kl_balancing_splits_the_pull_on_the_posterior_and_the_prior():
    from flipjax.models.cvae_loss import CVAELossConfig, _kl_objective, kl_loss
    rng = np.random.default_rng(3)
    q = [jnp.asarray(rng.normal(size=(4, 3)), jnp.float32) for _ in range(2)]
    p = [jnp.asarray(rng.normal(size=(4, 3)), jnp.float32) for _ in range(2)]

    def grads(c):
        def f(q, p):
            out = {"z_mu": q[0], "z_logvar": q[1], "prior_mu": p[0], "prior_logvar": p[1]}
            kl = kl_loss(q[0], q[1], c.kl_batch_sum, c.robust_kl, prior=tuple(p))
            return _kl_objective(out, kl, c, None)
        return jax.grad(f, argnums=(0, 1))(q, p)

    plain_q, plain_p = grads(CVAELossConfig(kl=0.1, robust_kl=False))
    # Equal weights: the plain term's gradients on both sides.
    even_q, even_p = grads(CVAELossConfig(kl=0.1, prior_kl=0.1, robust_kl=False))
    for a, b in zip(plain_q + plain_p, even_q + even_p, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # The prior's pull scales alone; the posterior's does not move.
    bal_q, bal_p = grads(CVAELossConfig(kl=0.1, prior_kl=1.0, robust_kl=False))
    for a, b in zip(plain_q, bal_q, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(plain_p, bal_p, strict=True):
        np.testing.assert_allclose(10.0 * a, b, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(plain_p[0]).max()) > 1e-3
    # prior_kl 0: the prior is left alone.
    _, none_p = grads(CVAELossConfig(kl=0.1, prior_kl=0.0, robust_kl=False))
    assert all(float(jnp.abs(g).max()) == 0.0 for g in none_p)


def test_a_narrow_latent_enters_the_decoder_through_a_projection():
    m, params, flow, hist, text = _model(latent_dim=4, learned_prior=True)
    out = m.apply({"params": params}, flow, hist, text, rngs={"latent": jax.random.key(0)})
    assert out["z"].shape == out["z_mu"].shape == out["prior_mu"].shape == (B, 4)
    assert params["latent_in"]["kernel"].shape == (4, 64)
    s = m.apply({"params": params}, flow[:, :, 0], hist, text, rngs={"latent": jax.random.key(1)},
                method=FlowCVAE.sample)
    assert s["z"].shape == (B, 4) and s["flow"].shape == flow.shape
    with pytest.raises(ValueError, match="z"):
        m.apply({"params": params}, flow[:, :, 0], hist, text, None, jnp.zeros((B, 64)),
                method=FlowCVAE.decode)
    assert "latent_in" not in _model()[1]
    with pytest.raises(ValueError, match="latent_dim"):
        CVAEConfig.variant("tiny", latent_dim=-1).validate()


def test_context_point_features_reach_the_image_tokens():
    def token_change(**kw):
        m, params, _, hist, text = _model(point_features=8, **kw)
        img, _ = m.apply({"params": params}, hist, text, method=FlowCVAE.embed_context)
        # Pixel (row 20, col 17) lies in patch (2, 2); the 5 px feature map carries it into
        # patch (2, 1) (columns 8-15), which the patch embedding alone never sees.
        img2, _ = m.apply({"params": params}, hist.at[:, :, 20, 17].add(0.5), text,
                          method=FlowCVAE.embed_context)
        return np.abs(np.asarray(img2 - img)).max(-1)[0], params
    on, params = token_change(context_point_features=True)
    off, p0 = token_change()
    assert on[10] > 1e-4 and off[10] > 1e-4
    assert on[9] > 1e-4 and off[9] == 0.0
    assert set(params) - set(p0) == {"context_feature_encoder"}
    with pytest.raises(ValueError, match="context_point_features"):
        CVAEConfig.variant("tiny", context_point_features=True).validate()


def test_best_of_many_scores_and_trains_only_the_best_sample():
    from flipjax.models.cvae_loss import best_of_many_ade
    gt = jnp.zeros((2, 1, 3, 2), jnp.float32)
    # Example 0: sample 1 is off by 1 px per step, sample 0 by 3; example 1 the other way.
    off = jnp.asarray([[3.0, 1.0], [1.0, 3.0]], jnp.float32)             # K B
    samples = jnp.zeros((2, 2, 1, 3, 2), jnp.float32).at[..., 1:, 0].set(off[:, :, None, None])
    assert float(best_of_many_ade(samples, gt)) == pytest.approx(1.0)
    g = jax.grad(best_of_many_ade)(samples, gt)
    assert float(jnp.abs(g[0, 0]).sum()) == 0.0 and float(jnp.abs(g[1, 0]).sum()) > 0
    assert float(jnp.abs(g[1, 1]).sum()) == 0.0 and float(jnp.abs(g[0, 1]).sum()) > 0
    with pytest.raises(ValueError, match="gt_flow"):
        best_of_many_ade(samples, gt[:, :, :2])


def test_the_trainer_adds_the_best_of_many_term_only_when_asked():
    import dataclasses

    from experiments.trainers.cvae import make_loss_fn
    from flipjax.models.cvae_loss import CVAELossConfig
    m, params, flow, hist, text = _model(learned_prior=True, latent_dim=4)
    batch = {"tracks": flow, "history": jnp.round((hist + 1) * 127.5).astype(jnp.uint8),
             "text_tokens": text, "text_mask": jnp.ones(text.shape[:2], bool)}
    base = CVAELossConfig(up_weight=1.0, kl=0.1, kl_batch_sum=False, robust_kl=False)
    key = jax.random.key(0)
    _, plain_terms = make_loss_fn(m, base)(params, batch, key)
    assert "best_of_many" not in plain_terms
    many = dataclasses.replace(base, best_of_many=4, best_of_many_weight=2.0)
    loss, terms = make_loss_fn(m, many)(params, batch, key)
    # The rest of the objective is the plain one with the posterior's share of the key.
    rest, _ = make_loss_fn(m, base)(params, batch, jax.random.split(key)[0])
    assert float(terms["best_of_many"]) > 0
    assert float(loss) == pytest.approx(float(rest) + 2.0 * float(terms["best_of_many"]),
                                        rel=1e-5)
