"""FLIP action module: golden parity with the official ScaleDirectionCVAE, sizes, losses."""

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flipjax import metrics
from flipjax.models import cvae_loss as L
from flipjax.models.convert_flip_cvae import (
    config_from_official,
    flip_cvae_decode,
    flip_cvae_encode,
    flip_cvae_from_torch,
    official_shapes,
    official_text_mask,
)
from flipjax.models.flow_cvae import (
    CVAEConfig,
    FlowCVAE,
    latent_std,
    reconstruct_flow,
)
from flipjax.models.layers import sincos_2d

DATA = pathlib.Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def golden():
    z = np.load(DATA / "flip_official_tiny_seed0.npz")
    cfg = json.loads(str(z["config_json"]))
    official = dict(hidden_size=cfg["hidden"], vae_encoder_layers=cfg["enc_layers"],
                    vae_decoder_layers=cfg["dec_layers"], num_heads=cfg["heads"],
                    flow_horizon=cfg["flow_horizon"], obs_history=cfg["cvae_history"],
                    img_size=cfg["img"], img_patch_size=8)
    sd = {k[len("cvae/param/"):]: z[k] for k in z.files if k.startswith("cvae/param/")}
    inputs = {k[len("cvae/in/"):]: z[k] for k in z.files if k.startswith("cvae/in/")}
    outputs = {k[len("cvae/out/"):]: z[k] for k in z.files if k.startswith("cvae/out/")}
    module, variables = flip_cvae_from_torch(sd, official)
    return dict(official=official, sd=sd, inputs=inputs, outputs=outputs, module=module,
                variables=variables)


def _rel(got, want):
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


def test_golden_parity(golden):
    m, v, i, o = golden["module"], golden["variables"], golden["inputs"], golden["outputs"]
    assert m.config == CVAEConfig.variant("tiny")
    # The fixture pads language tokens, so the key padding mask is exercised.
    assert not bool(np.all(official_text_mask(i["sentence"])))
    enc = flip_cvae_encode(m, v, i["gt_flow"], i["obs_history"], i["sentence"])
    dec = flip_cvae_decode(m, v, i["gt_flow"][:, :, 0], i["obs_history"], i["sentence"], i["z"])
    for name, got in {**enc, **dec}.items():
        assert got.shape == o[name].shape, name
        assert _rel(got, o[name]) < 1e-4, (name, _rel(got, o[name]))


def test_shared_context_training_pass_matches_encode_decode(golden, key):
    m, v, i = golden["module"], golden["variables"], golden["inputs"]
    flow = jnp.asarray(i["gt_flow"])
    hist = jnp.transpose(jnp.asarray(i["obs_history"]), (0, 1, 3, 4, 2))
    text = jnp.asarray(i["sentence"])
    mask = official_text_mask(text)
    out = m.apply(v, flow, hist, text, mask, rngs={"latent": key})
    dec = m.apply(v, flow[:, :, 0], hist, text, mask, out["z"], method=FlowCVAE.decode)
    np.testing.assert_allclose(out["flow"], dec["flow"], rtol=1e-5, atol=1e-5)
    # Same noise, fixed vs official std: z = mu + std * eps with std = exp(0.5 logvar) or
    # exp(exp(0.5 logvar)).
    off = m.apply(v, flow, hist, text, mask, rngs={"latent": key}, official_std=True)
    eps = (out["z"] - out["z_mu"]) / latent_std(out["z_logvar"])
    eps_off = (off["z"] - off["z_mu"]) / latent_std(off["z_logvar"], official_std=True)
    np.testing.assert_allclose(eps, eps_off, rtol=1e-4, atol=1e-5)
    assert _rel(off["z"], np.asarray(out["z"])) > 1e-2
    # Ignoring the padding changes the result: the mask is really applied.
    unmasked = m.apply(v, flow, hist, text, None, method=FlowCVAE.encode)
    assert _rel(unmasked["z_mu"], np.asarray(out["z_mu"])) > 1e-4
    prior = m.apply(v, flow[:, :, 0], hist, text, mask, rngs={"latent": key},
                    method=FlowCVAE.sample)
    assert prior["flow"].shape == flow.shape


def test_decode_flow_is_query_plus_cumsum(golden):
    o = golden["outputs"]
    q = golden["inputs"]["gt_flow"][:, :, 0]
    steps = np.cumsum(o["scale"] * o["direction"], axis=2)
    want = np.concatenate([q[:, :, None], q[:, :, None] + steps], axis=2)
    np.testing.assert_allclose(reconstruct_flow(jnp.asarray(q), o["scale"], o["direction"]), want,
                               atol=1e-5)
    np.testing.assert_allclose(want, o["flow"], atol=1e-4)


def test_converter_rejects_bad_state_dicts(golden):
    sd, cfg = golden["sd"], golden["official"]
    missing = {k: x for k, x in sd.items() if k != "z_mu.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['z_mu.bias'\]"):
        flip_cvae_from_torch(missing, cfg)
    with pytest.raises(ValueError, match="unexpected keys"):
        flip_cvae_from_torch({**sd, "extra.weight": np.zeros(3)}, cfg)
    bad = {**sd, "flow_encoder.weight": np.zeros((64, 10), np.float32)}
    with pytest.raises(ValueError, match=r"flow_encoder\.weight"):
        flip_cvae_from_torch(bad, cfg)
    with pytest.raises(ValueError, match="obs_history"):
        flip_cvae_from_torch(sd, {k: x for k, x in cfg.items() if k != "obs_history"})
    # Same weights under a DDP prefix load.
    flip_cvae_from_torch({f"module.{k}": x for k, x in sd.items()}, cfg)


def test_converter_handles_any_consistent_config():
    cfg = dict(hidden_size=32, vae_encoder_layers=1, vae_decoder_layers=2, num_heads=2,
               flow_horizon=5, obs_history=3, img_size=[16, 24], img_patch_size=8,
               language_original_dim=16)
    rng = np.random.default_rng(0)
    sd = {k: rng.normal(size=s).astype(np.float32)
          for k, s in official_shapes(config_from_official(cfg)).items()}
    sd["img_pos_embedding"] = sincos_2d(32, 2, 3)[None]
    m, v = flip_cvae_from_torch(sd, cfg)
    sentence = np.concatenate([rng.normal(size=(2, 3, 16)), np.zeros((2, 1, 16))], axis=1)
    obs = rng.normal(size=(2, 3, 3, 16, 24))
    enc = flip_cvae_encode(m, v, rng.normal(size=(2, 4, 5, 2)), obs, sentence)
    assert enc["img_output"].shape == (2, 6, 3 * 3 * 64)
    dec = flip_cvae_decode(m, v, rng.normal(size=(2, 4, 2)), obs, sentence, enc["z_mu"])
    assert dec["flow"].shape == (2, 4, 5, 2)
    with pytest.raises(ValueError, match="sin-cos"):
        flip_cvae_from_torch({**sd, "img_pos_embedding": sd["img_pos_embedding"] + 1}, cfg)


def _count(cfg: CVAEConfig) -> int:
    m = FlowCVAE(cfg)
    args = (jnp.zeros((1, 2, cfg.flow_horizon, 2)), jnp.zeros((1, cfg.history, *cfg.img_size, 3)),
            jnp.zeros((1, 3, cfg.language_dim)))
    shapes = jax.eval_shape(lambda: m.init({"params": jax.random.PRNGKey(0),
                                            "latent": jax.random.PRNGKey(1)}, *args))
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))


def test_parameter_counts_match_the_paper():
    # Official LIBERO recipe: flow_horizon 16, obs_history 16, 128x128 images, 8px patches,
    # 4096-d language; trainable parameters (the frozen sin-cos table excluded).
    assert CVAEConfig.variant("s") == CVAEConfig.variant("S")
    assert _count(CVAEConfig.variant("S")) == 14_939_600
    assert _count(CVAEConfig.variant("B")) == 58_792_784
    assert _count(CVAEConfig.variant("L")) == 72_979_280


def test_bad_shapes_raise(golden):
    m, v, i = golden["module"], golden["variables"], golden["inputs"]
    hist = jnp.zeros((2, 3, 32, 32, 3))  # 3 frames, the model takes 2
    with pytest.raises(ValueError, match="history"):
        m.apply(v, jnp.asarray(i["gt_flow"]), hist, jnp.asarray(i["sentence"]),
                method=FlowCVAE.encode)
    with pytest.raises(ValueError, match="unknown CVAE variant"):
        CVAEConfig.variant("XL")


def test_losses():
    rng = np.random.default_rng(0)
    flow = jnp.asarray(np.cumsum(rng.normal(size=(2, 3, 5, 2)) * 3, axis=2), jnp.float32)
    scale, direction = L.flow_targets(flow)
    np.testing.assert_allclose(reconstruct_flow(flow[:, :, 0], scale, direction), flow, atol=1e-4)
    assert float(L.direction_loss(direction, direction)) == 0.0
    assert float(L.scale_loss(scale, scale)) == 0.0
    assert float(L.weighted_ade(flow, flow)) == 0.0
    # Up-weighting: squared error 1 (below 2) counts once, 4 (above) counts 100 times.
    t = jnp.zeros((1, 1, 2, 1))
    p = jnp.asarray([[[[1.0], [2.0]]]])
    assert float(L.scale_loss(p, t)) == pytest.approx((1 + 100 * 4) / 2)
    assert float(L.scale_loss(p, t, up_weight=1.0)) == pytest.approx(2.5)
    shifted = flow.at[:, :, 1:].add(jnp.asarray([0.6, 0.0]))  # distance 0.6 < 1
    assert float(L.weighted_ade(shifted, flow)) == pytest.approx(0.6, rel=1e-5)
    assert float(L.weighted_ade(flow.at[:, :, 1:].add(2.0), flow)) == pytest.approx(
        100 * 2 * math.sqrt(2), rel=1e-5)
    # KL of N(0, I) is zero (both formulas); the robust form is sqrt(1 + KL^2) - 1.
    zeros = jnp.zeros((4, 8))
    assert float(L.kl_loss(zeros, zeros)) == 0.0
    assert float(jnp.max(jnp.abs(L.kl_divergence(zeros, zeros, official_std=True)))) < 1e-6
    mu, zeros = jnp.ones((2, 8)), jnp.zeros((2, 8))
    assert float(L.kl_loss(mu, zeros, robust=False)) == pytest.approx(8.0)
    assert float(L.kl_loss(mu, zeros)) == pytest.approx(math.sqrt(65) - 1)
    assert float(L.kl_loss(mu, zeros, batch_sum=False, robust=False)) == pytest.approx(4.0)
    # The fixed std is exp(0.5 logvar); the official one exponentiates it again.
    np.testing.assert_allclose(latent_std(zeros), 1.0)
    np.testing.assert_allclose(latent_std(zeros, official_std=True), math.e, rtol=1e-6)
    # Gradients stay finite at a perfect prediction (sqrt at zero).
    g = jax.grad(lambda f: L.weighted_ade(f, flow))(flow)
    assert bool(jnp.all(jnp.isfinite(g)))


def test_total_loss_of_a_training_pass(golden, key):
    m, v, i = golden["module"], golden["variables"], golden["inputs"]
    flow = jnp.asarray(i["gt_flow"])
    hist = jnp.transpose(jnp.asarray(i["obs_history"]), (0, 1, 3, 4, 2))
    text = jnp.asarray(i["sentence"])
    out = m.apply(v, flow, hist, text, official_text_mask(text), rngs={"latent": key})
    losses = L.cvae_loss(out, flow, hist, m.config.patch)
    c = L.CVAELossConfig()
    want = (10 * losses["direction"] + 10 * losses["scale"] + 1e-4 * losses["kl"]
            + losses["ade"] + 1e-5 * (losses["img_recon"] + losses["flow_recon"]))
    assert float(losses["loss"]) == pytest.approx(float(want), rel=1e-6)
    assert c.up_weight == 100.0 and all(bool(jnp.isfinite(x)) for x in losses.values())
    assert L.patchify(hist, 8).shape == out["img_output"].shape


def test_metrics():
    gt = jnp.zeros((1, 1, 4, 2)).at[0, 0, :, 0].set(jnp.arange(4.0) * 3)
    pred = gt.at[0, 0, 1:, 1].add(jnp.asarray([1.0, 3.0, 5.0]))
    assert float(metrics.ade(pred, gt)) == pytest.approx(3.0)
    # <=2: 1/3, <=4: 2/3, <=8: 3/3.
    assert float(metrics.less_than_delta_ratio(pred, gt)) == pytest.approx(2 / 3)
    valid = jnp.asarray([[[True, False, False]]])
    assert float(metrics.ade(pred, gt, valid)) == pytest.approx(1.0)
    assert bool(jnp.all(metrics.moving_steps(gt)))
