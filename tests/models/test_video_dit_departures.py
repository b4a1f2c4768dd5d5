"""The DiT's flow-attention departures (VideoDiT.flow_attention="cross", flow_gate)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flipjax.models.video_dit import VideoDiT

B, N = 2, 6


def _setup(**kw):
    m = VideoDiT.variant("tiny", latent_size=(4, 4), in_channels=4, flow_horizon=3, history=2,
                         text_dim=8, text_layers=1, text_heads=2, **kw)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(B, m.num_frames, 4, 4, 4)), jnp.float32)
    t = jnp.asarray([3, 500])
    flow = jnp.asarray(rng.uniform(0, 16, (B, N, 3, 2)), jnp.float32)
    text, mask = jnp.asarray(rng.normal(size=(B, 3, 8)), jnp.float32), jnp.ones((B, 3), bool)
    params = nn.unbox(jax.jit(m.init)(jax.random.key(0), x, t, flow, text, mask))
    # adaLN-Zero leaves every block silent at init: randomise the parameters so the flow's
    # effect is visible, keeping any flow gate at its initial zero.
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [v if "flow_gate" in jax.tree_util.keystr(p) else
             v + 0.05 * jax.random.normal(k, v.shape)
             for (p, v), k in zip(leaves, keys, strict=True)]
    params = jax.tree_util.tree_unflatten(tree, noisy)

    @jax.jit
    def run(p, f):
        return m.apply(p, x, t, f, text, mask)
    return params, flow, run


def _set_gates(params, value):
    return jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.full_like(v, value) if "flow_gate" in jax.tree_util.keystr(p) else v,
        params)


@pytest.mark.parametrize("mode", ["shared", "cross"])
def test_a_closed_gate_hides_the_flow_and_an_open_one_shows_it(mode):
    params, flow, run = _setup(flow_attention=mode, flow_gate=True)
    other = flow[:, ::-1] * 0.5 + 3.0
    np.testing.assert_allclose(run(params, flow), run(params, other), atol=1e-6)
    opened = _set_gates(params, 0.5)
    assert float(jnp.abs(run(opened, flow) - run(opened, other)).max()) > 1e-3


def test_cross_attention_has_its_own_softmax_over_the_flow_tokens():
    # Repeating every flow token leaves a softmax over the flow tokens alone unchanged, but
    # shifts a softmax shared with the group's own tokens towards the flow.
    twice = lambda f: jnp.concatenate([f, f], axis=1)
    params, flow, run = _setup(flow_attention="cross")
    np.testing.assert_allclose(run(params, flow), run(params, twice(flow)), atol=1e-5)
    params, flow, run = _setup(flow_attention="shared")
    assert float(jnp.abs(run(params, flow) - run(params, twice(flow))).max()) > 1e-4


def test_unknown_flow_attention_is_refused():
    with pytest.raises(ValueError, match="flow_attention must be one of"):
        _setup(flow_attention="nope")


def test_sincos_at_patch_centres_is_the_grid_embedding():
    from flipjax.models.flow_tokens import sincos_2d_at
    from flipjax.models.layers import sincos_2d
    rows, cols = np.meshgrid(np.arange(3), np.arange(5), indexing="ij")
    cells = jnp.asarray(np.stack([cols, rows], -1).reshape(-1, 2), jnp.float32)
    np.testing.assert_allclose(sincos_2d_at(16, cells), sincos_2d(16, 3, 5), atol=1e-5)


def test_positional_flow_tokens_carry_the_position_of_their_path():
    from flipjax.models.flow_tokens import FlowEmbedder
    from flipjax.models.layers import sincos_2d
    emb = FlowEmbedder(16, embedding="positional", grid=(4, 4))
    # A still track at the centre of patch (row 1, col 2) of a 4x4 grid: unit x = (2*2 + 1)/4
    # - 1, y = (2*1 + 1)/4 - 1; its MLP reads zero displacements.
    still = jnp.tile(jnp.asarray([[[[0.25, -0.25]]]]), (1, 1, 3, 1))
    params = emb.init(jax.random.key(0), still)
    mlp_only = emb.apply(params, jnp.tile(jnp.asarray([[[[-0.75, -0.75]]]]), (1, 1, 3, 1)))
    mlp_only = mlp_only - sincos_2d(16, 4, 4)[0]
    np.testing.assert_allclose(emb.apply(params, still)[0, 0] - mlp_only[0, 0],
                               sincos_2d(16, 4, 4)[1 * 4 + 2], atol=1e-5)
    # Moving the whole track moves only the position part.
    shifted = still + jnp.asarray([0.5, 0.0])
    np.testing.assert_allclose(emb.apply(params, shifted)[0, 0] - mlp_only[0, 0],
                               sincos_2d(16, 4, 4)[1 * 4 + 3], atol=1e-5)


def test_unknown_flow_embedding_is_refused():
    with pytest.raises(ValueError, match="flow_embedding"):
        _setup(flow_embedding="fourier")


def test_splat_carries_a_token_to_where_its_track_ends():
    from flipjax.models.flow_tokens import splat_along_tracks
    current = jnp.arange(9 * 2, dtype=jnp.float32).reshape(1, 9, 2)   # 3x3 grid, D = 2
    # Track 0 goes from patch (row 0, col 0) to (row 1, col 2); track 1 stays at (2, 2) but
    # ends half-way between (2, 1) and (2, 2).
    cells = jnp.asarray([[[[0, 0], [2, 1]], [[2, 2], [1.5, 2]]]], jnp.float32)
    moved, weight = splat_along_tracks(current, cells, (3, 3))
    assert moved.shape == (1, 1, 9, 2) and weight.shape == (1, 1, 9, 1)
    np.testing.assert_allclose(moved[0, 0, 5], current[0, 0])
    np.testing.assert_allclose(weight[0, 0, :, 0], [0, 0, 0, 0, 0, 1, 0, 0.5, 0.5])
    np.testing.assert_allclose(moved[0, 0, 7], current[0, 8])
    np.testing.assert_allclose(moved[0, 0, 0], 0.0)   # nothing lands there


@pytest.mark.parametrize("field", ["flow_splat", "flow_warp"])
def test_flow_splat_and_warp_start_silent_and_read_the_flow_once_trained(field):
    params, flow, run = _setup(**{field: True}, flow_gate=True)
    unit = flow / 8.0 - 1.0
    moved = unit.at[:, :, 1:].add(0.4)
    # Zero-initialised projection (and closed gates): the flow is invisible at init ...
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.zeros_like(v) if field in jax.tree_util.keystr(p) else v, params)
    np.testing.assert_allclose(run(params, unit), run(params, moved), atol=1e-6)
    # ... and visible through the splat (warp) alone once its projection is non-zero
    # (random: a constant added to every channel would vanish in the next LayerNorm).
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: jax.random.normal(jax.random.key(2), v.shape)
        if field in jax.tree_util.keystr(p) else v, params)
    assert float(jnp.abs(run(params, unit) - run(params, moved)).max()) > 1e-3


def test_warp_moves_latents_finer_than_a_patch_and_fills_from_the_current_frame():
    from flipjax.models.flow_tokens import unit_to_cells, warp_latents
    rng = np.random.default_rng(3)
    current = jnp.asarray(rng.normal(size=(1, 4, 4, 3)), jnp.float32)
    # One track per latent cell (unit coordinates of the 4x4 latent centres), patch 2.
    rows, cols = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    start = np.stack([(cols.ravel() + 0.5) / 2 - 1, (rows.ravel() + 0.5) / 2 - 1], -1)
    still = np.repeat(start[None, :, None], 2, axis=2)
    cells = unit_to_cells(jnp.asarray(still, jnp.float32), (2, 2))
    out = warp_latents(current, cells, 2)
    assert out.shape == (1, 1, 4, 4, 4)
    np.testing.assert_allclose(out[0, 0, ..., :3], current[0], atol=1e-5)  # still = copy
    np.testing.assert_allclose(out[0, 0, ..., 3], 1.0, atol=1e-5)
    # Every track one latent cell (half a patch) to the right: column c lands in c + 1; the
    # first column receives nothing and everything moved away, so it takes the frame's mean.
    moved = still.copy()
    moved[:, :, 1, 0] += 0.5
    out = warp_latents(current, unit_to_cells(jnp.asarray(moved, jnp.float32), (2, 2)), 2)
    np.testing.assert_allclose(out[0, 0, :, 1:, :3], current[0, :, :3], atol=1e-5)
    np.testing.assert_allclose(out[0, 0, :, 0, :3],
                               np.broadcast_to(np.mean(current[0], (0, 1)), (4, 3)), atol=1e-2)
    np.testing.assert_allclose(out[0, 0, :, 0, 3], 0.0, atol=1e-6)


def test_warp_puts_a_moved_object_on_top_and_leaves_background_behind():
    from flipjax.models.flow_tokens import FRONT_GAIN, unit_to_cells, warp_latents
    # A 6x6 latent frame: background 0, a 2x2 object of value 5 at rows 2-3, cols 0-1.
    current = np.zeros((1, 6, 6, 1), np.float32)
    current[0, 2:4, 0:2] = 5.0
    rows, cols = np.meshgrid(np.arange(6), np.arange(6), indexing="ij")
    start = np.stack([(cols.ravel() + 0.5) / 3 - 1, (rows.ravel() + 0.5) / 3 - 1], -1)
    tracks = np.repeat(start[None, :, None], 2, axis=2)
    on = ((rows >= 2) & (rows < 4) & (cols < 2)).ravel()
    tracks[0, on, 1, 0] += 3 * (2 / 6)            # the object's tracks: 3 cells right
    out = np.asarray(warp_latents(jnp.asarray(current),
                                  unit_to_cells(jnp.asarray(tracks, jnp.float32), (6, 6)), 1))
    frame = out[0, 0, ..., 0]
    # Where it lands it outweighs the still background there (1 + FRONT_GAIN against 1).
    np.testing.assert_allclose(frame[2:4, 3:5], 5.0 * (1 + FRONT_GAIN) / (2 + FRONT_GAIN),
                               atol=1e-5)
    # Where it was, the background it uncovered, not a copy of the object.
    np.testing.assert_allclose(frame[2:4, 0:2], 0.0, atol=1e-2)
    # The rest of the frame is untouched.
    rest = np.ones((6, 6), bool)
    rest[2:4, 0:2] = rest[2:4, 3:5] = False
    np.testing.assert_allclose(frame[rest], 0.0, atol=1e-6)


def test_flow_residual_starts_at_the_warped_current_frame():
    from flipjax.models.flow_tokens import unit_to_cells, warp_latents
    m = VideoDiT.variant("tiny", latent_size=(4, 4), in_channels=4, flow_horizon=3, history=2,
                         text_dim=8, text_layers=1, text_heads=2, learn_sigma=False,
                         flow_residual=True)
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(B, m.num_frames, 4, 4, 4)), jnp.float32)
    flow = jnp.asarray(rng.uniform(-0.9, 0.9, (B, N, 3, 2)), jnp.float32)
    text, mask = jnp.asarray(rng.normal(size=(B, 3, 8)), jnp.float32), jnp.ones((B, 3), bool)
    t = jnp.asarray([3, 500])
    params = nn.unbox(m.init(jax.random.key(0), x, t, flow, text, mask))
    out = m.apply(params, x, t, flow, text, mask)
    # adaLN-Zero: the untrained network adds nothing, so the x0 prediction is the warp of the
    # current frame on the futures (whatever the noisy input) and zero on the history.
    want = warp_latents(x[:, 1], unit_to_cells(flow, (2, 2)), m.patch)[..., :4]
    np.testing.assert_allclose(out[:, 2:], want, atol=1e-5)
    np.testing.assert_allclose(out[:, :2], 0.0, atol=1e-6)
    assert float(jnp.abs(want - x[:, 1:2]).max()) > 1e-2    # the flow moved something



def test_residual_gate_copies_what_the_flow_holds_still():
    from flipjax.models.flow_tokens import motion_mask, unit_to_cells
    m = VideoDiT.variant("tiny", latent_size=(8, 8), in_channels=4, flow_horizon=3, history=2,
                         text_dim=8, text_layers=1, text_heads=2, learn_sigma=False,
                         flow_residual=True, residual_gate=True)
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(B, m.num_frames, 8, 8, 4)), jnp.float32)
    # One track per token at its centre (4x4 tokens of 2x2 cells), all still but one that
    # moves two latent cells right in the top-left corner.
    c = (np.arange(4) + 0.5) / 4 * 2 - 1
    grid = np.stack(np.meshgrid(c, c, indexing="xy"), -1).reshape(-1, 2)
    flow = np.repeat(grid[None, :, None], 3, axis=2)
    flow[:, 0, 1:, 0] += 0.5                          # a quarter of the frame: 2 latent cells
    flow = jnp.asarray(np.broadcast_to(flow, (B, 16, 3, 2)), jnp.float32)
    text, mask = jnp.asarray(rng.normal(size=(B, 3, 8)), jnp.float32), jnp.ones((B, 3), bool)
    t = jnp.asarray([3, 500])
    params = nn.unbox(m.init(jax.random.key(0), x, t, flow, text, mask))
    # A network whose output is not zero (adaLN-Zero would hide the gate).
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape),
                          params)
    out = np.asarray(m.apply(params, x, t, flow, text, mask))
    gate = np.asarray(motion_mask(unit_to_cells(flow, (4, 4)), m.patch, (8, 8)))[..., 0]
    assert gate[:, :, 6:, 6:].max() == 0.0 and gate[:, :, 0, 0].min() == 1.0
    still = np.broadcast_to(gate == 0.0, (out.shape[0], 2, 8, 8))
    current = np.broadcast_to(np.asarray(x[:, 1:2]), out[:, 2:].shape)
    # Far from the moving track the futures are the current frame exactly, whatever the
    # network says; near it the network's correction shows.
    np.testing.assert_array_equal(out[:, 2:][still], current[still])
    assert np.abs(out[:, 2:][~still] - current[~still]).max() > 1e-2


def test_residual_gate_needs_flow_residual():
    from experiments.configs import dit as dit_configs
    from flipjax import builders, codec
    cfg = dit_configs.get_config("runlocal")
    with cfg.unlocked():
        cfg.model.residual_gate = True
    with pytest.raises(ValueError, match="residual_gate"):
        builders.build_dit(cfg, codec.pixel_codec(int(cfg.codec.factor)))
