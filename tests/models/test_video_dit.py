"""Video DiT (FLIP dynamics module): golden parity with the official model, cheap flow
attention equal to the official concatenation, adaLN-Zero init, official parameter counts."""

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flipjax.models import convert_flip_dit as conv
from flipjax.models.layers import MultiHeadAttention
from flipjax.models.video_dit import DiTBlock, FlowCrossAttention, VideoDiT

DATA = pathlib.Path(__file__).resolve().parents[1] / "data"


def rel_err(got, want) -> float:
    want = np.asarray(want)
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


@pytest.fixture(scope="module")
def golden():
    z = np.load(DATA / "flip_official_tiny_seed0.npz")
    c = json.loads(str(z["config_json"]))
    config = dict(input_size=c["latent"], patch_size=2, in_channels=4, hidden_size=c["hidden"],
                  depth=c["depth"], num_heads=c["heads"], learn_sigma=True,
                  flow_horizon=c["flow_horizon"], obs_history=c["dit_history"])
    sd = {k[len("dit/param/"):]: z[k] for k in z.files if k.startswith("dit/param/")}
    module, variables = conv.flip_dit_from_torch(sd, config)
    inputs = {k: z[f"dit/in/{k}"] for k in ("x", "t", "flow", "sentence")}
    apply = jax.jit(lambda v, *a: conv.flip_dit_apply(module, v, *a))
    return dict(z=z, c=c, config=config, sd=sd, module=module, variables=variables,
                inputs=inputs, apply=apply, y=apply(variables, *inputs.values()))


def test_forward_matches_official(golden):
    assert golden["y"].shape == golden["z"]["dit/out/y"].shape
    assert rel_err(golden["y"], golden["z"]["dit/out/y"]) < 1e-4


def test_loss_matches_official(golden):
    i, z = golden["inputs"], golden["z"]
    hist, m = golden["c"]["dit_history"], golden["module"]
    out = jax.jit(lambda v, *a: conv.flip_dit_loss(m, v, *a, history_len=hist))(
        golden["variables"], i["x"], i["t"], i["flow"], i["sentence"], z["dit/loss_in/noise"])
    for k in ("mse", "vb", "loss"):
        assert rel_err(out[k], z[f"dit/loss_out/{k}"]) < 1e-4, k


def test_conditions_once_then_denoise_equals_call(golden):
    m, v, i = golden["module"], golden["variables"], golden["inputs"]
    x = jnp.transpose(jnp.asarray(i["x"]), (0, 1, 3, 4, 2))
    t, flow, text = jnp.asarray(i["t"]), jnp.asarray(i["flow"]), jnp.asarray(i["sentence"])
    mask = jnp.any(text != 0, axis=-1)
    full = golden["y"].transpose(0, 1, 3, 4, 2)
    cond = jax.jit(lambda *a: m.apply(v, *a, method=VideoDiT.encode_conditions))(
        flow, text, mask)
    assert len(cond.flow_kv) == m.depth and cond.flow_kv[0][0].shape == (2, 7, 4, 16)
    denoise = jax.jit(lambda *a: m.apply(v, *a, method=VideoDiT.denoise))
    np.testing.assert_allclose(denoise(x, t, cond), full, atol=1e-5)
    # clean history passed separately: the output covers the frames that follow it
    hist = m.history
    np.testing.assert_allclose(denoise(x[:, hist:], t, cond, x[:, :hist]), full[:, hist:],
                               atol=1e-5)


def test_flow_attention_equals_official_concatenation(key):
    """Per group: fused self-attention over [LN(x_g); flow] keeping the video rows."""
    b, g, n_tok, n_flow, d = 2, 3, 5, 4, 32
    x = jax.random.normal(key, (b, g, n_tok, d))
    flow = jax.random.normal(jax.random.fold_in(key, 1), (b, n_flow, d))
    att = FlowCrossAttention(4, d)
    v = jax.jit(lambda k, a: att.init(k, a, method=MultiHeadAttention.__call__))(key, x[:, 0])

    @jax.jit
    def both(v, x, flow):
        kv = att.apply(v, flow, method=FlowCrossAttention.keys_values)
        ours = att.apply(v, x, kv, method=FlowCrossAttention.attend)
        cat = jnp.concatenate([x, jnp.broadcast_to(flow[:, None], (b, g, n_flow, d))], axis=2)
        official = att.apply(v, cat.reshape(b * g, n_tok + n_flow, d)).reshape(b, g, -1, d)
        return ours, official

    ours, official = both(v, x, flow)
    np.testing.assert_allclose(ours, official[:, :, :n_tok], atol=2e-5)


def test_output_is_exactly_zero_at_init(golden, key):
    m, i = golden["module"], golden["inputs"]
    x = jnp.transpose(jnp.asarray(i["x"]), (0, 1, 3, 4, 2))
    text = jnp.asarray(i["sentence"])
    v = jax.jit(m.init)(key, x, i["t"], i["flow"], text, jnp.any(text != 0, axis=-1))
    y = golden["apply"](v, *i.values())
    assert y.shape == golden["y"].shape and not np.any(np.asarray(y))
    kernel = v["params"]["blocks_1"]["cross_attn"]["query"]["kernel"]
    assert isinstance(kernel, nn.Partitioned) and kernel.names == ("embed", "heads", "kv")


# Official trainable counts (sin-cos buffers excluded), 16x16x4 latents of 128x128 frames,
# flow horizon 16, 4 history frames, 4096-d language. Only the flow horizon, channels, patch
# and widths change the count; latent size, history and sentence length do not.
@pytest.mark.parametrize("size,count", [("S", 31_267_232), ("B", 173_479_712),
                                        ("L", 399_156_256)])
def test_parameter_counts_match_official(size, count):
    m = VideoDiT.variant(size, latent_size=(16, 16), flow_horizon=16, history=4)
    shapes = nn.unbox(conv.abstract_variables(m, text_len=24)["params"])
    n = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes))
    assert n == count
    assert round(n / 1e6, 2) == {"S": 31.27, "B": 173.48, "L": 399.16}[size]


def test_bf16_with_remat_tracks_float32(golden):
    m, i = golden["module"].clone(dtype=jnp.bfloat16, remat=True), golden["inputs"]
    y = jax.jit(lambda v, *a: conv.flip_dit_apply(m, v, *a))(golden["variables"], *i.values())
    assert y.dtype == jnp.float32 and rel_err(y, golden["y"]) < 5e-2


def test_remat_block_gives_the_same_gradients(key):
    x = jax.random.normal(key, (2, 3, 4, 16))
    c = jax.random.normal(jax.random.fold_in(key, 1), (2, 16))
    flow = jax.random.normal(jax.random.fold_in(key, 2), (2, 5, 2, 8))
    plain, remat = DiTBlock(16, 2), nn.remat(DiTBlock)(16, 2)
    params = jax.jit(plain.init)(key, x, c, (flow, flow))["params"]
    # adaLN-Zero zeroes most gradients at init; perturb so every path carries signal
    params = jax.tree_util.tree_map(lambda p: p + 0.05, params)

    def grad(module):
        def loss(p, x):
            return jnp.sum(module.apply({"params": p}, x, c, (flow, flow)) ** 2)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

    for a, b in zip(jax.tree_util.tree_leaves(grad(plain)), jax.tree_util.tree_leaves(grad(remat)),
                    strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_converter_rejects_bad_state_dicts(golden):
    sd, config = golden["sd"], golden["config"]
    missing = {k: a for k, a in sd.items() if k != "blocks.2.cross_attn.qkv.weight"}
    with pytest.raises(ValueError, match=r"missing.*blocks\.2\.cross_attn\.qkv\.weight"):
        conv.flip_dit_from_torch(missing, config)
    with pytest.raises(ValueError, match=r"unexpected.*blocks\.9\.mlp\.fc1\.weight"):
        conv.flip_dit_from_torch({**sd, "blocks.9.mlp.fc1.weight": sd["blocks.0.mlp.fc1.weight"]},
                                 config)
    bad = {**sd, "flow_embedder.0.weight": np.zeros((64, 10), np.float32)}
    with pytest.raises(ValueError, match=r"flow_embedder\.0\.weight"):
        conv.flip_dit_from_torch(bad, config)
    with pytest.raises(ValueError, match="temp_embed"):
        conv.flip_dit_from_torch(sd, {**config, "obs_history": 3})
    with pytest.raises(ValueError, match="unknown keys"):
        conv.flip_dit_from_torch(sd, {**config, "hiden_size": 64})


def test_bad_shapes_raise(golden):
    m, v, i = golden["module"], golden["variables"], golden["inputs"]
    x = jnp.transpose(jnp.asarray(i["x"]), (0, 1, 3, 4, 2))
    text = jnp.asarray(i["sentence"])
    mask = jnp.ones(text.shape[:2], bool)
    with pytest.raises(ValueError, match="frames"):
        m.apply(v, x[:, 1:], i["t"], i["flow"], text, mask)
    with pytest.raises(ValueError, match="flow"):
        m.apply(v, x, i["t"], i["flow"][:, :, :3], text, mask)
    with pytest.raises(ValueError, match="text_mask"):
        m.apply(v, x, i["t"], i["flow"], text, mask[:, :2])


def test_official_concat_mode_gives_the_same_output(golden):
    """flow_attention="concat" (the official replication, the benchmark's cost baseline) is the
    same function as the shared flow keys/values."""
    m = golden["module"].clone(flow_attention="concat")
    y = jax.jit(lambda v, *a: conv.flip_dit_apply(m, v, *a))(golden["variables"],
                                                           *golden["inputs"].values())
    assert rel_err(y, golden["z"]["dit/out/y"]) < 1e-4
    with pytest.raises(ValueError, match="flow_attention"):
        VideoDiT.variant("tiny", flow_attention="nope").init(
            jax.random.PRNGKey(0), jnp.zeros((1, 19, 16, 16, 4)), jnp.zeros((1,)),
            jnp.zeros((1, 2, 16, 2)), jnp.zeros((1, 3, 4096)), jnp.ones((1, 3), bool))


def test_converter_handles_any_consistent_config():
    """A state dict in the official layout for another config (not the fixture's) loads and
    lands where it should: made from the converter's own torch-shape rules, random values."""
    from flax import traverse_util

    from flipjax.models.layers import sincos_1d, sincos_2d

    config = dict(input_size=4, patch_size=2, in_channels=3, hidden_size=48, depth=2,
                  num_heads=3, learn_sigma=False, flow_horizon=3, obs_history=1,
                  language_dim=20, language_heads=4)
    module = conv.module_from_config(config)
    flat = traverse_util.flatten_dict(conv.abstract_variables(module)["params"], sep="/",
                                      is_leaf=lambda _, x: isinstance(x, nn.meta.AxisMetadata))
    rng = np.random.default_rng(0)
    sd = {}
    for tk, paths, torch_shape, _ in conv._rules(module):
        shapes = [tuple(flat[p].unbox().shape if isinstance(flat[p], nn.meta.AxisMetadata)
                        else flat[p].shape) for p in paths]
        sd[tk] = rng.normal(0, 0.2, torch_shape(shapes)).astype(np.float32)
    sd["pos_embed"] = sincos_2d(48, 2, 2)[None]
    sd["temp_embed"] = sincos_1d(48, np.arange(module.num_frames))[None]
    m, v = conv.flip_dit_from_torch(sd, config)
    p = v["params"]
    np.testing.assert_array_equal(nn.meta.unbox(p["t_embedder"]["fc1"]["kernel"]),
                                  sd["t_embedder.mlp.0.weight"].T)
    np.testing.assert_array_equal(nn.meta.unbox(p["x_embedder"]["proj"]["kernel"]),
                                  sd["x_embedder.proj.weight"].transpose(2, 3, 1, 0))
    x = rng.normal(size=(1, module.num_frames, 3, 4, 4)).astype(np.float32)
    flow = rng.normal(size=(1, 5, 3, 2)).astype(np.float32)
    sentence = rng.normal(size=(1, 2, 20)).astype(np.float32)
    y = conv.flip_dit_apply(m, v, x, np.array([10]), flow, sentence)
    assert y.shape == (1, module.num_frames, 3, 4, 4) and np.isfinite(np.asarray(y)).all()
    y2 = conv.flip_dit_apply(m.clone(flow_attention="concat"), v, x, np.array([10]), flow,
                             sentence)
    np.testing.assert_allclose(y, y2, rtol=1e-4, atol=1e-4)
    bad = dict(sd, temp_embed=sd["temp_embed"][:, :-1])
    with pytest.raises(ValueError):
        conv.flip_dit_from_torch(bad, config)
