"""The action module's categorical latent (CVAEConfig.latent_codes): exact KL, draws that
are codes, the straight-through gradient, and the model and loss wired to it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flipjax.models.cvae_latent import categorical_kl, code_draw, gaussian_draw
from flipjax.models.cvae_loss import CVAELossConfig, cvae_loss
from flipjax.models.flow_cvae import CVAEConfig, FlowCVAE
from tests.models.test_flow_cvae_departures import B
from tests.models.test_flow_cvae_departures import _model as _departures_model

K = 6


def test_categorical_kl_known_answers():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(4, K)).astype(np.float32)
    p = rng.normal(size=(4, K)).astype(np.float32)
    qs = np.exp(q) / np.exp(q).sum(-1, keepdims=True)
    ps = np.exp(p) / np.exp(p).sum(-1, keepdims=True)
    np.testing.assert_allclose(categorical_kl(q, p), (qs * np.log(qs / ps)).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(categorical_kl(q, q + 3.0), 0.0, atol=1e-6)  # shift-invariant
    # A certain posterior against a uniform prior costs log K.
    certain = np.full((1, K), -1e4, np.float32)
    certain[0, 2] = 0.0
    np.testing.assert_allclose(categorical_kl(certain, np.zeros((1, K))), np.log(K), rtol=1e-5)
    with pytest.raises(ValueError, match="p_logits"):
        categorical_kl(q, p[:, :3])


def test_code_draws_are_codes_at_the_softmax_frequencies():
    logits = jnp.log(jnp.asarray([[0.6, 0.3, 0.1]]))
    codebook = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    z = jax.vmap(lambda k: code_draw(k, logits, codebook, straight_through=False)[0])(
        jax.random.split(jax.random.key(0), 4000))
    match = np.all(np.asarray(z)[:, None] == np.asarray(codebook)[None], axis=-1)   # S K
    assert np.all(match.sum(-1) == 1)  # every draw is exactly one code
    np.testing.assert_allclose(match.mean(0), [0.6, 0.3, 0.1], atol=0.03)


def test_straight_through_passes_a_gradient_to_the_logits_only_when_asked():
    logits = jnp.asarray([[0.2, -0.1, 0.4]])
    codebook = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    key = jax.random.key(3)

    def f(lg, st):
        return jnp.sum(code_draw(key, lg, codebook, straight_through=st) * jnp.asarray([1.0, 2.0]))

    hard = code_draw(key, logits, codebook, straight_through=False)
    np.testing.assert_allclose(code_draw(key, logits, codebook, straight_through=True), hard,
                               atol=1e-6)  # the forward pass is the drawn code
    assert float(jnp.abs(jax.grad(f)(logits, True)).sum()) > 1e-3
    np.testing.assert_array_equal(jax.grad(f)(logits, False), 0.0)


def test_gaussian_draw_is_the_reparameterised_sample():
    mu, logvar = jnp.asarray([[1.0, -2.0]]), jnp.asarray([[0.0, 2.0 * np.log(3.0)]])
    eps = jax.random.normal(jax.random.key(5), (1, 2))
    np.testing.assert_allclose(gaussian_draw(jax.random.key(5), mu, logvar),
                               mu + jnp.asarray([[1.0, 3.0]]) * eps, rtol=1e-6)


def _model(**kw):
    cfg = dict(learned_prior=True, latent_dim=4, latent_codes=K)
    cfg.update(kw)
    return _departures_model(**cfg)


def test_the_model_draws_codes_from_its_learned_prior():
    m, params, flow, hist, text = _model()
    assert {"codebook", "z_logits", "prior_logits"} <= set(params)
    assert not {"z_mu", "z_logvar", "prior_mu", "prior_logvar"} & set(params)
    book = np.asarray(params["codebook"])
    out = m.apply({"params": params}, flow, hist, text, rngs={"latent": jax.random.key(2)})
    assert out["z_logits"].shape == (B, K) and out["prior_logits"].shape == (B, K)
    s = m.apply({"params": params}, flow[:, :, 0], hist, text, rngs={"latent": jax.random.key(4)},
                method=FlowCVAE.sample)
    for z in (np.asarray(out["z"]), np.asarray(s["z"])):
        assert np.all(np.isclose(z[:, None], book[None], atol=1e-6).all(-1).sum(-1) == 1)
    post = m.apply({"params": params}, flow, hist, text, method=FlowCVAE.encode)
    mode = m.apply({"params": params}, post, method=FlowCVAE.latent_mode)
    np.testing.assert_array_equal(mode, book[np.argmax(np.asarray(post["z_logits"]), -1)])
    with pytest.raises(ValueError, match="z_logits, prior_logits"):
        m.apply({"params": params}, {"z": mode}, method=FlowCVAE.latent_mode)


def test_codes_need_a_learned_prior():
    with pytest.raises(ValueError, match="latent_codes"):
        CVAEConfig.variant("tiny", latent_codes=4).validate()
    with pytest.raises(ValueError, match="latent_codes"):
        CVAEConfig.variant("tiny", learned_prior=True, latent_codes=-1).validate()


@pytest.mark.parametrize("prior_kl", [-1.0, 1.0])
def test_the_loss_trains_the_posterior_the_prior_and_the_codes(prior_kl):
    m, params, flow, hist, text = _model()
    c = CVAELossConfig(kl=0.1, kl_batch_sum=False, robust_kl=False, up_weight=1.0,
                       prior_kl=prior_kl)

    def loss(p):
        out = m.apply({"params": p}, flow, hist, text, rngs={"latent": jax.random.key(3)})
        return cvae_loss(out, flow, hist, 8, c)

    terms = loss(params)
    out = m.apply({"params": params}, flow, hist, text, rngs={"latent": jax.random.key(3)})
    np.testing.assert_allclose(
        terms["kl"], np.mean(categorical_kl(out["z_logits"], out["prior_logits"])), rtol=1e-5)
    g = jax.grad(lambda p: loss(p)["loss"])(params)
    for name in ("z_logits", "prior_logits"):
        assert float(jnp.abs(g[name]["kernel"]).sum()) > 0, name
    assert float(jnp.abs(g["codebook"]).sum()) > 0
    if prior_kl >= 0:   # balanced: the KL's pull on the prior is prior_kl's alone
        g_kl = jax.grad(lambda p: loss(p)["kl"])(params)
        assert float(jnp.abs(g_kl["prior_logits"]["kernel"]).sum()) > 0


def test_mixture_density_against_a_direct_sum():
    from flipjax.models.cvae_latent import gaussian_log_prob, mixture_log_prob
    rng = np.random.default_rng(1)
    z = rng.normal(size=(2, 3)).astype(np.float32)
    logits = rng.normal(size=(2, 4)).astype(np.float32)
    mu = rng.normal(size=(2, 4, 3)).astype(np.float32)
    logvar = rng.normal(scale=0.5, size=(2, 4, 3)).astype(np.float32)
    w = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    var = np.exp(logvar)
    dens = np.prod(np.exp(-0.5 * (z[:, None] - mu) ** 2 / var) / np.sqrt(2 * np.pi * var), -1)
    np.testing.assert_allclose(mixture_log_prob(z, logits, mu, logvar),
                               np.log((w * dens).sum(-1)), rtol=1e-5)
    # One component is its Gaussian.
    np.testing.assert_allclose(mixture_log_prob(z, logits[:, :1], mu[:, :1], logvar[:, :1]),
                               gaussian_log_prob(z, mu[:, 0], logvar[:, 0]), rtol=1e-6)
    with pytest.raises(ValueError, match="mu"):
        mixture_log_prob(z, logits, mu[:, :2], logvar)


def test_mixture_kl_estimate_is_unbiased_for_one_component():
    from flipjax.models.cvae_latent import mixture_kl
    from flipjax.models.cvae_loss import kl_divergence
    q_mu, q_lv = jnp.asarray([[0.5, -1.0]]), jnp.asarray([[-0.5, 0.3]])
    p_mu, p_lv = jnp.asarray([[[0.0, 0.2]]]), jnp.asarray([[[0.4, -0.2]]])
    z = jax.vmap(lambda k: gaussian_draw(k, q_mu, q_lv)[0])(
        jax.random.split(jax.random.key(0), 20000))
    est = jax.vmap(lambda zz: mixture_kl(zz[None], q_mu, q_lv, jnp.zeros((1, 1)), p_mu,
                                         p_lv)[0])(z)
    exact = kl_divergence(q_mu, q_lv, prior=(p_mu[:, 0], p_lv[:, 0]))[0]
    assert abs(float(est.mean()) - float(exact)) < 0.03 * float(exact) + 0.01


def test_mixture_draws_pick_components_at_their_weights():
    from flipjax.models.cvae_latent import mixture_draw
    logits = jnp.log(jnp.asarray([[0.7, 0.3]]))
    mu = jnp.asarray([[[-10.0], [10.0]]])
    lv = jnp.full((1, 2, 1), -4.0)
    z = jax.vmap(lambda k: mixture_draw(k, logits, mu, lv)[0, 0])(
        jax.random.split(jax.random.key(1), 4000))
    assert np.all(np.abs(np.abs(np.asarray(z)) - 10.0) < 1.0)
    np.testing.assert_allclose(np.mean(np.asarray(z) > 0), 0.3, atol=0.03)


def test_the_model_with_a_mixture_prior():
    m, params, flow, hist, text = _model(latent_codes=0, prior_components=3)
    out = m.apply({"params": params}, flow, hist, text, rngs={"latent": jax.random.key(2)})
    assert out["prior_mu"].shape == (B, 3, 4) and out["prior_logits"].shape == (B, 3)
    assert out["z_mu"].shape == (B, 4)
    s = m.apply({"params": params}, flow[:, :, 0], hist, text, rngs={"latent": jax.random.key(4)},
                method=FlowCVAE.sample)
    assert s["flow"].shape == flow.shape
    prior = {k: out[k] for k in ("prior_logits", "prior_mu", "prior_logvar")}
    top = np.argmax(np.asarray(out["prior_logits"]), -1)
    np.testing.assert_array_equal(m.apply({"params": params}, prior, method=FlowCVAE.latent_mode),
                                  np.asarray(out["prior_mu"])[np.arange(B), top])
    c = CVAELossConfig(kl=0.1, kl_batch_sum=False, robust_kl=False, up_weight=1.0)
    g = jax.grad(lambda p: cvae_loss(m.apply({"params": p}, flow, hist, text,
                                             rngs={"latent": jax.random.key(3)}),
                                     flow, hist, 8, c)["kl"])(params)
    for name in ("prior_logits", "prior_mu", "prior_logvar", "z_mu", "z_logvar"):
        assert float(jnp.abs(g[name]["kernel"]).sum()) > 0, name
    for bad in (dict(prior_components=2), dict(learned_prior=True, latent_codes=2,
                                                prior_components=2)):
        with pytest.raises(ValueError, match="prior_components"):
            CVAEConfig.variant("tiny", **bad).validate()


def test_the_prior_can_have_its_own_layers():
    m, params, flow, hist, text = _model(latent_codes=0, prior_layers=1)
    assert "prior_encoder_0" in params and "prior_encoder_1" not in params
    # The prior reads its own layers: changing the encoder's leaves it, changing its own moves it.
    def prior(p):
        return m.apply({"params": p}, flow[:, :, 0], hist, text,
                       method=FlowCVAE.prior)["prior_mu"]

    base = prior(params)
    for name, moves in (("encoder_0", False), ("prior_encoder_0", True)):
        changed = jax.tree.map(lambda x: x * 1.5, params[name])
        diff = float(jnp.abs(prior({**params, name: changed}) - base).max())
        assert (diff > 1e-4) == moves, name
    with pytest.raises(ValueError, match="prior_layers"):
        CVAEConfig.variant("tiny", prior_layers=1).validate()


def test_the_prior_reads_the_query_points_only_when_asked():
    for on in (False, True):
        m, params, flow, hist, text = _model(latent_codes=0, prior_queries=on)
        a = m.apply({"params": params}, flow[:, :, 0], hist, text, method=FlowCVAE.prior)
        b = m.apply({"params": params}, flow[:, :, 0] + 3.0, hist, text, method=FlowCVAE.prior)
        moved = float(jnp.abs(a["prior_mu"] - b["prior_mu"]).max())
        assert (moved > 1e-4) == on
        # Training and sampling read the prior at the same points as FlowCVAE.prior.
        out = m.apply({"params": params}, flow, hist, text, rngs={"latent": jax.random.key(0)})
        np.testing.assert_allclose(out["prior_mu"], a["prior_mu"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="prior_queries"):
        CVAEConfig.variant("tiny", prior_queries=True).validate()
