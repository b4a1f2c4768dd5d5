"""hill_climb on an analytic world model whose optimum is known (no networks).

The world: a frame is a constant image that encodes a point's position p = (u, v) as colour
(p / SCALE, 0); the codec is the exact space-to-depth pixel codec. The action module moves the
point by one of 5 unit actions (stay, +-u, +-v), drawn per row from the key, and its flows are
the query points shifted by p (read from the pixel history) plus the action over L steps. The
denoiser returns the exact eps of the clip that shows p (read from the LATENT history) moved by
the flow, using the training schedule's alpha_bar at the timestep label it gets, so the
sampler reproduces that clip (up to float error) only if the labels are the original training
timesteps. The value of a clip is minus the distance of its last frame's point to the goal,
which the instruction carries in text_tokens[:, 0, :2].
"""

import dataclasses
import itertools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from flipjax.codec import pixel_codec
from flipjax.models import diffusion
from flipjax.planning import PlanConfig, WorldModel, hill_climb, rollout_candidates
from flipjax.sharding import BATCH_AXES, create_mesh

SCALE = 8.0
SIZE = 8
L = 3  # flow steps (current frame + 2 generated frames per planning step)
ACTIONS = np.array([[0, 0], [1, 0], [-1, 0], [0, 1], [0, -1]], np.float32)
TRAIN = diffusion.linear_schedule(1000)
CODEC = pixel_codec(4)
QUERIES = jnp.array([[0.0, 0.0], [3.0, 5.0]], jnp.float32)
# Float error of the exact-eps sampler (x0 = 1/sqrt(alpha_bar) x_t - ... at alpha_bar ~ 4e-5)
# is ~1e-5 in positions; 1e-3 is far below the 1-pixel action grid.
TOL = 1e-3


def frame_of(pos):
    """float[... 2] positions -> float[... SIZE SIZE 3] frames."""
    rgb = jnp.concatenate([pos / SCALE, jnp.zeros_like(pos[..., :1])], axis=-1)
    return jnp.broadcast_to(rgb[..., None, None, :], (*pos.shape[:-1], SIZE, SIZE, 3))


def pos_of_frames(frames):
    return frames[..., :2].mean(axis=(-3, -2)) * SCALE


def latent_of(pos):
    z = CODEC.encode(frame_of(pos).reshape(-1, SIZE, SIZE, 3))
    return z.reshape(*pos.shape[:-1], *z.shape[1:])


def pos_of_latents(z):
    # Pixel-codec channels are (row, col, rgb) with rgb fastest.
    return jnp.stack([z[..., 0::3].mean(axis=(-3, -2, -1)),
                      z[..., 1::3].mean(axis=(-3, -2, -1))], axis=-1) * SCALE


def propose(params, frames, queries, text_tokens, text_mask, key):
    actions = params["actions"]
    d = actions[jax.random.randint(key, (frames.shape[0],), 0, actions.shape[0])]
    p = pos_of_frames(frames[:, -1])
    frac = jnp.arange(L, dtype=jnp.float32) / (L - 1)
    return queries[:, :, None] + p[:, None, None] + frac[:, None] * d[:, None, None]


def encode_conditions(params, flows, text_tokens, text_mask):
    return {"disp": flows[:, 0, 1:] - flows[:, 0, :1]}


def null_conditions(params, flows, text_tokens, text_mask):
    return {"disp": jnp.zeros_like(flows[:, 0, 1:])}


def denoise(params, x, t, cond, history):
    x0 = latent_of(pos_of_latents(history[:, -1])[:, None] + cond["disp"])
    ab = jnp.asarray(params["alphas_cumprod"], jnp.float32)[t][:, None, None, None, None]
    return (x - jnp.sqrt(ab) * x0) / jnp.sqrt(1.0 - ab)


def value(params, frames, text_tokens, text_mask):
    return -jnp.linalg.norm(pos_of_frames(frames[:, -1]) - text_tokens[:, 0, :2], axis=-1)


def make_world(**overrides):
    kw = dict(propose=propose, encode_conditions=encode_conditions, denoise=denoise,
              encode=lambda p, x: CODEC.encode(x), decode=lambda p, z: CODEC.decode(z),
              value=value, action_params={"actions": jnp.asarray(ACTIONS)},
              dynamics_params={"alphas_cumprod": jnp.asarray(TRAIN.alphas_cumprod)},
              null_conditions=null_conditions, learned_range=False)
    return WorldModel(**{**kw, **overrides})


WORLD = make_world()


def problems(starts, goals, th=2):
    starts = jnp.asarray(starts, jnp.float32)
    history = frame_of(jnp.broadcast_to(starts[:, None], (len(starts), th, 2)))
    text = jnp.zeros((len(starts), 2, 4), jnp.float32).at[:, 0, :2].set(jnp.asarray(goals))
    return history, text, jnp.ones((len(starts), 2), bool)


def best_return(start, goal, horizon, gamma):
    best = -np.inf
    for seq in itertools.product(range(len(ACTIONS)), repeat=horizon):
        p = np.cumsum(ACTIONS[list(seq)], axis=0) + np.asarray(start)
        dist = np.linalg.norm(p - np.asarray(goal), axis=1)
        best = max(best, -np.sum(gamma ** np.arange(horizon) * dist))
    return best


STARTS, GOALS = [(0.0, 0.0), (1.0, -1.0)], [(2.0, 1.0), (-1.0, 0.0)]
SEARCH = PlanConfig(beams=4, candidates=8, horizon=3, replace_every=1, discount=0.9,
                    sample_steps=4)
NO_VALUE = PlanConfig(beams=4, candidates=8, horizon=3, replace_every=1, discount=0.9,
                      sample_steps=4, use_value=False)
SMALL = PlanConfig(beams=2, candidates=3, horizon=2, replace_every=1, discount=0.9,
                   sample_steps=3, sampler="ddpm")


@pytest.fixture(scope="module")
def searched():
    history, text, mask = problems(STARTS, GOALS)
    key = jax.random.PRNGKey(1)
    return (hill_climb(WORLD, history, text, mask, key, SEARCH, queries=QUERIES),
            hill_climb(WORLD, history, text, mask, key, NO_VALUE, queries=QUERIES))


def check_consistent(plan, starts, gamma):
    """Videos follow the flows from the start, values score them, returns sum the values."""
    flows = np.asarray(plan.flows)  # P B H L N 2
    p, b, h = flows.shape[:3]
    pos = np.asarray(pos_of_frames(plan.videos))  # P B H F 2
    np.testing.assert_allclose(pos, np.asarray(pos_of_latents(plan.latents)), atol=TOL)
    start = np.broadcast_to(np.asarray(starts)[:, None], (p, b, 2))
    for step in range(h):
        # The flows start where the beam's pixel history ends; the frames move along them.
        np.testing.assert_allclose(flows[:, :, step, 0, 0], start, atol=TOL)
        np.testing.assert_allclose(pos[:, :, step], flows[:, :, step, 1:, 0], atol=TOL)
        start = pos[:, :, step, -1]
    disc = gamma ** np.arange(h)
    np.testing.assert_allclose(plan.returns, np.sum(np.asarray(plan.values) * disc, -1),
                               atol=1e-5)


def test_finds_known_optimum_and_beats_no_value(searched):
    plan, nv = searched
    assert plan.flows.shape == (2, 4, 3, L, 2, 2)
    assert plan.latents.shape == (2, 4, 3, L - 1, 2, 2, 48)
    assert plan.videos.shape == (2, 4, 3, L - 1, SIZE, SIZE, 3)
    assert plan.values.shape == (2, 4, 3) and plan.returns.shape == (2, 4)
    check_consistent(plan, STARTS, 0.9)
    check_consistent(nv, STARTS, 0.9)
    best = np.asarray(plan.best)
    np.testing.assert_array_equal(best, np.argmax(plan.returns, axis=1))
    for i, (start, goal) in enumerate(zip(STARTS, GOALS, strict=True)):
        optimum = best_return(start, goal, 3, 0.9)
        assert plan.returns[i, best[i]] == pytest.approx(optimum, abs=TOL)
        # Both goals are reachable in 3 moves: the optimal plan ends on the goal.
        final = pos_of_frames(plan.videos[i, best[i], -1, -1])
        np.testing.assert_allclose(final, goal, atol=TOL)
    nv_best = np.asarray(nv.returns)[np.arange(2), np.asarray(nv.best)]
    np.testing.assert_array_equal(nv.best, 0)
    guided = np.asarray(plan.returns)[np.arange(2), best]
    assert np.all(nv_best < guided - 0.5), (nv_best, guided)


def test_same_key_same_plan_different_key_different_candidates(searched):
    _, nv = searched
    history, text, mask = problems(STARTS, GOALS)
    again = hill_climb(WORLD, history, text, mask, jax.random.PRNGKey(1), NO_VALUE,
                       queries=QUERIES)
    for a, b in zip(jax.tree.leaves(nv), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
    other = hill_climb(WORLD, history, text, mask, jax.random.PRNGKey(2), NO_VALUE,
                       queries=QUERIES)
    assert not np.allclose(other.flows, nv.flows)


def test_replacement_copies_whole_beam_state():
    history, text, mask = problems([(0.0, 0.0)], [(2.0, 1.0)])
    key = jax.random.PRNGKey(3)
    cfg = PlanConfig(beams=3, candidates=4, horizon=2, replace_every=1, discount=1.0,
                     sample_steps=3)
    plan = hill_climb(WORLD, history, text, mask, key, cfg, queries=QUERIES)
    keep = hill_climb(WORLD, history, text, mask, key,
                      dataclasses.replace(cfg, replace_every=0), queries=QUERIES)
    v0 = np.asarray(keep.values[0, :, 0])
    worst, best = int(np.argmin(v0)), int(np.argmax(v0))
    assert v0[worst] < v0[best] - 0.1, v0  # the case is not trivial
    # After step 0 the worst beam became a copy of the best; the others are untouched.
    src = np.arange(3)
    src[worst] = best
    for name in ("flows", "latents", "videos", "values"):
        got, want = np.asarray(getattr(plan, name))[0, :, 0], np.asarray(getattr(keep, name))[0]
        np.testing.assert_allclose(got, want[src, 0], atol=1e-6, err_msg=name)
    # Step 1 of the replaced beam continues from the best beam's pixel and latent history (the
    # flows start at, and the frames move on from, the best beam's last position) and its
    # return carries the best beam's step-0 value.
    check_consistent(plan, [(0.0, 0.0)], 1.0)
    np.testing.assert_allclose(plan.flows[0, worst, 1, 0, 0],
                               pos_of_frames(keep.videos[0, best, 0, -1]), atol=TOL)
    assert float(plan.returns[0, worst]) == pytest.approx(
        v0[best] + float(plan.values[0, worst, 1]), abs=1e-5)


def propose_at_queries(params, frames, queries, text_tokens, text_mask, key):
    """Flows that start at the queries (as the CVAE's do): each row's action from there."""
    del frames, text_tokens, text_mask
    actions = params["actions"]
    d = actions[jax.random.randint(key, (queries.shape[0],), 0, actions.shape[0])]
    frac = jnp.arange(L, dtype=jnp.float32) / (L - 1)
    return queries[:, :, None] + frac[:, None] * d[:, None, None]


@pytest.mark.parametrize("replace_every", [0, 1])
def test_followed_queries_chain_the_kept_tracks(replace_every):
    """With ``follow_queries`` each step queries where the kept tracks of the step before
    ended, clipped to the frame (through beam replacement too); without it, the same points."""
    world = make_world(propose=propose_at_queries)
    history, text, mask = problems([(0.0, 0.0), (1.0, -1.0)], GOALS)
    cfg = PlanConfig(beams=3, candidates=4, horizon=4, replace_every=replace_every,
                     discount=0.9, sample_steps=2)
    queries = jnp.array([[0.0, 0.0], [3.0, 5.0], [7.0, 7.0]], jnp.float32)
    key = jax.random.PRNGKey(5)
    fixed = np.asarray(hill_climb(world, history, text, mask, key, cfg, queries=queries).flows)
    np.testing.assert_allclose(fixed[:, :, :, 0], np.broadcast_to(
        queries, fixed[:, :, :, 0].shape), atol=1e-6)
    flows = np.asarray(hill_climb(world, history, text, mask, key,
                                  dataclasses.replace(cfg, follow_queries=True),
                                  queries=queries).flows)                       # P B H L N 2
    np.testing.assert_allclose(flows[:, :, 0, 0], fixed[:, :, 0, 0], atol=1e-6)
    np.testing.assert_allclose(flows[:, :, 1:, 0], np.clip(flows[:, :, :-1, -1], 0, SIZE - 1),
                               atol=1e-6)
    # The points do move (the case is not trivial), and some reach the frame's border.
    assert np.abs(flows[:, :, -1, 0] - queries).max() >= 2.0
    assert np.any(flows[:, :, :-1, -1] != np.clip(flows[:, :, :-1, -1], 0, SIZE - 1))


def test_values_are_per_candidate():
    r = 4
    starts = jnp.asarray([[0.0, 0.0], [1.0, 2.0], [-2.0, 1.0], [0.0, -1.0]])
    pix = frame_of(jnp.broadcast_to(starts[:, None], (r, 2, 2)))
    lat = latent_of(jnp.broadcast_to(starts[:, None], (r, 2, 2)))
    key_a, key_f = jax.random.split(jax.random.PRNGKey(4))
    flows = propose(WORLD.action_params, pix, jnp.broadcast_to(QUERIES, (r, 2, 2)), None, None,
                    key_a)
    text = jnp.zeros((r, 2, 4)).at[:, 0, :2].set(jnp.asarray([[2.0, 1.0]] * r))
    mask = jnp.ones((r, 2), bool)
    cfg = PlanConfig(sample_steps=3, value_on="clip")
    run = jax.jit(rollout_candidates, static_argnames="config")
    lat_out, frames, values = run(WORLD, lat, pix, flows, text, mask, key_f, config=cfg)
    # Known answer, with no rescaling over the batch: the mean over the 2 generated frames.
    pos = starts[:, None] + (flows[:, 0, 1:] - flows[:, 0, :1])
    want = -jnp.linalg.norm(pos - text[:, None, 0, :2], axis=-1).mean(axis=1)
    np.testing.assert_allclose(values, want, atol=TOL)
    # Other candidates (their flows, histories and goals) changed: row 0 is unchanged.
    flows2 = flows.at[1:].add(3.0)
    pix2, lat2 = pix.at[1:].set(pix[1:] * 0.5), lat.at[1:].set(lat[1:] * 0.5)
    text2 = text.at[1:, 0, :2].set(-3.0)
    lat_b, frames_b, values_b = run(WORLD, lat2, pix2, flows2, text2, mask, key_f, config=cfg)
    np.testing.assert_allclose(values_b[0], values[0], atol=1e-6)
    np.testing.assert_allclose(frames_b[0], frames[0], atol=1e-6)
    np.testing.assert_allclose(lat_b[0], lat_out[0], atol=1e-6)
    assert np.all(np.abs(values_b[1:] - values[1:]) > 0.1)


def test_guidance_extrapolates_towards_the_condition():
    r = 2
    starts = jnp.asarray([[0.0, 0.0], [1.0, 1.0]])
    pix = frame_of(jnp.broadcast_to(starts[:, None], (r, 2, 2)))
    lat = latent_of(jnp.broadcast_to(starts[:, None], (r, 2, 2)))
    flows = jnp.broadcast_to(QUERIES[None, :, None], (r, 2, L, 2)) + starts[:, None, None]
    flows = flows + (jnp.arange(L) / (L - 1))[:, None] * jnp.asarray([1.0, -1.0])
    text, mask = jnp.zeros((r, 2, 4)), jnp.ones((r, 2), bool)
    key = jax.random.PRNGKey(5)
    _, frames, _ = rollout_candidates(WORLD, lat, pix, flows, text, mask, key,
                                      PlanConfig(sample_steps=3, guidance_scale=2.0))
    # eps is affine in the condition here, so DDIM lands on null + 2 (cond - null).
    want = starts[:, None] + 2.0 * (flows[:, 0, 1:] - flows[:, 0, :1])
    np.testing.assert_allclose(pos_of_frames(frames), want, atol=TOL)
    with pytest.raises(ValueError, match="null_conditions"):
        rollout_candidates(make_world(null_conditions=None), lat, pix, flows, text, mask, key,
                           PlanConfig(sample_steps=3, guidance_scale=2.0))


def test_batched_problems_equal_a_loop():
    starts, goals = [(0.0, 0.0), (1.0, -1.0), (-1.0, 2.0)], [(2.0, 1.0), (-1.0, 0.0), (0, 0)]
    history, text, mask = problems(starts, goals)
    keys = jax.random.split(jax.random.PRNGKey(6), 3)
    plan = hill_climb(WORLD, history, text, mask, keys, SMALL)  # default 8x8 query grid
    assert plan.flows.shape == (3, 2, 2, L, 64, 2)
    check_consistent(plan, starts, 0.9)
    for i in range(3):
        one = hill_climb(WORLD, history[i:i + 1], text[i:i + 1], mask[i:i + 1], keys[i:i + 1],
                         SMALL)
        for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(plan), strict=True):
            np.testing.assert_allclose(a[0], b[i], atol=1e-5)


def test_sharded_equals_unsharded():
    mesh = create_mesh()
    assert mesh.shape["data"] == 8
    rng = np.random.default_rng(0)
    starts = rng.integers(-2, 3, (8, 2)).astype(np.float32)
    goals = rng.integers(-2, 3, (8, 2)).astype(np.float32)
    history, text, mask = problems(starts, goals)
    key = jax.random.PRNGKey(7)
    plain = hill_climb(WORLD, history, text, mask, key, SMALL, queries=QUERIES)
    sharded = hill_climb(WORLD, history, text, mask, key, SMALL, queries=QUERIES, mesh=mesh)
    assert sharded.returns.sharding.is_equivalent_to(
        NamedSharding(mesh, PartitionSpec(BATCH_AXES)), 2)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(sharded), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match=r"history of shape \[4, 2, 8, 8, 3\].*8 batch shards"):
        hill_climb(WORLD, history[:4], text[:4], mask[:4], key, SMALL, mesh=mesh)


@pytest.mark.parametrize("field, bad, match", [
    ("history", np.zeros((2, 8, 8, 3), np.float32), r"history: expected shape \[P Th Hi Wi 3\]"),
    ("history", np.zeros((2, 2, 8, 8, 4), np.float32), r"history.*\[2, 2, 8, 8, 4\]"),
    ("text_tokens", np.zeros((3, 2, 4), np.float32), r"text_tokens.*P=2.*\[3, 2, 4\]"),
    ("text_mask", np.ones((2, 2), np.float32), r"text_mask: expected a bool array"),
    ("text_mask", np.ones((2, 3), bool), r"text_mask.*Lt=2.*\[2, 3\]"),
    ("queries", np.zeros((2, 5, 3), np.float32), r"queries.*\[2, 5, 3\]"),
    ("queries", np.zeros((3, 5, 2), np.float32), r"queries.*P=2.*\[3, 5, 2\]"),
    ("key", jax.random.split(jax.random.PRNGKey(0), 3), r"key.*\[3, 2\]"),
])
def test_bad_shapes_raise(field, bad, match):
    history, text, mask = problems(STARTS, GOALS)
    args = dict(history=history, text_tokens=text, text_mask=mask, key=jax.random.PRNGKey(0),
                queries=QUERIES)
    args[field] = bad
    with pytest.raises(ValueError, match=match):
        hill_climb(WORLD, config=SMALL, **args)


def test_bad_models_and_settings_raise():
    history, text, mask = problems(STARTS, GOALS)
    key = jax.random.PRNGKey(0)
    bad_propose = make_world(propose=lambda p, f, q, t, m, k: jnp.zeros((f.shape[0], 2, 2)))
    with pytest.raises(ValueError, match=r"propose must return flows.*got shape \[6, 2, 2\]"):
        hill_climb(bad_propose, history, text, mask, key, SMALL, queries=QUERIES)
    with pytest.raises(ValueError, match=r"value_frames=4.*history of shape \[2, 2, 8, 8, 3\]"):
        hill_climb(make_world(value_frames=4), history, text, mask, key, SMALL)
    with pytest.raises(ValueError, match="value_on"):
        PlanConfig(value_on="first")
    with pytest.raises(ValueError, match="sampler"):
        PlanConfig(sampler="euler")
    with pytest.raises(ValueError, match="beams"):
        PlanConfig(beams=0)
    with pytest.raises(ValueError, match="prediction"):
        make_world(prediction="score")
    # Configs are static jit arguments: equal settings hash alike despite the numpy schedule.
    assert PlanConfig(sample_steps=4) == PlanConfig(sample_steps=4)
    assert hash(PlanConfig(sample_steps=4)) == hash(PlanConfig(sample_steps=4))
    assert PlanConfig(sample_steps=4) != PlanConfig(sample_steps=5)


def test_planning_does_not_import_flax():
    code = "import sys, flipjax.planning; assert 'flax' not in sys.modules, 'flax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_only_the_latent_history_the_dynamics_reads_is_encoded():
    """The analytic denoise reads only the newest latent frame: keeping one latent frame gives
    the same plan from 3 history frames, and encode never sees the older ones."""
    history, text, mask = problems(STARTS, GOALS, th=3)
    history = history.at[:, 0].set(jnp.nan)  # an older frame the dynamics never needs
    seen = []

    def encode(p, x):
        seen.append(x.shape[0])
        return CODEC.encode(x)

    world = make_world(encode=encode, history_frames=3, latent_history_frames=1)
    key = jax.random.PRNGKey(2)
    plan = hill_climb(world, history, text, mask, key, SMALL, queries=QUERIES)
    full = hill_climb(WORLD, history.at[:, 0].set(history[:, 1]), text, mask, key, SMALL,
                      queries=QUERIES)
    assert seen == [1]  # traced once, on the newest frame only
    for a, b in zip(jax.tree.leaves(plan), jax.tree.leaves(full), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="latent_history_frames must be in"):
        make_world(history_frames=2, latent_history_frames=3)
