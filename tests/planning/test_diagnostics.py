"""candidate_spread, flow_response and value_preference on the analytic world of
test_beam_search (its proposals, clips and values are known)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flipjax.planning import PlanConfig
from flipjax.planning.diagnostics import candidate_spread, flow_response, value_preference
from tests.planning.test_beam_search import QUERIES, frame_of, make_world

P = 3
HISTORY = frame_of(jnp.zeros((P, 1, 2)))
TEXT, MASK = jnp.zeros((P, 2, 4)), jnp.ones((P, 2), bool)
Q = jnp.broadcast_to(QUERIES, (P, *QUERIES.shape))


def test_a_single_action_gives_no_spread_and_its_own_displacement():
    world = make_world(action_params={"actions": jnp.array([[3.0, 4.0]])})
    out = candidate_spread(world, HISTORY, Q, TEXT, MASK, jax.random.PRNGKey(0), 4)
    assert float(out["spread_px"]) == pytest.approx(0.0, abs=1e-6)
    assert float(out["displacement_px"]) == pytest.approx(5.0, abs=1e-5)


def test_different_actions_spread():
    world = make_world(action_params={"actions": jnp.array([[2.0, 0.0], [-2.0, 0.0]])})
    out = candidate_spread(world, HISTORY, Q, TEXT, MASK, jax.random.PRNGKey(0), 6)
    # Pairs that differ are 4 px apart at the last step, 2 px at the middle one, 0 at step 0.
    assert 0.0 < float(out["spread_px"]) <= 2.0 + 1e-5
    assert float(out["displacement_px"]) == pytest.approx(2.0, abs=1e-5)
    assert np.isfinite(float(out["spread_px"]))


def test_bad_inputs():
    world = make_world()
    with pytest.raises(ValueError, match="candidates must be >= 2"):
        candidate_spread(world, HISTORY, Q, TEXT, MASK, jax.random.PRNGKey(0), 1)
    with pytest.raises(ValueError, match="queries"):
        candidate_spread(world, HISTORY, Q[:2], TEXT, MASK, jax.random.PRNGKey(0), 2)


def test_value_preference_counts_rows_and_margins():
    world = make_world()  # value = -distance of the frame's position to text_tokens[:, 0, :2]
    goals = jnp.array([[1.0, 1.0], [2.0, -1.0], [0.0, 3.0]])
    text = jnp.zeros((P, 2, 4)).at[:, 0, :2].set(goals)
    at_goal = frame_of(goals[:, None])  # P 1 H W 3, value 0
    off = frame_of(goals[:, None] + jnp.array([[[3.0, 4.0]], [[0.0, 1.0]], [[0.0, 0.0]]]))
    out = value_preference(world, at_goal, off, text, MASK)
    # Rows 0 and 1 prefer the goal (by 5 and 1); row 2 ties, which is not a preference.
    assert float(out["accuracy"]) == pytest.approx(2 / 3)
    assert float(out["margin"]) == pytest.approx(2.0, abs=1e-4)
    swapped = value_preference(world, off, at_goal, text, MASK)
    assert float(swapped["accuracy"]) == pytest.approx(0.0)


def test_value_preference_bad_inputs():
    world = make_world()
    clips = frame_of(jnp.zeros((P, 1, 2)))
    with pytest.raises(ValueError, match="other"):
        value_preference(world, clips, clips[:2], TEXT, MASK)
    with pytest.raises(ValueError, match="preferred"):
        value_preference(world, frame_of(jnp.zeros((P, 2, 2))), clips, TEXT, MASK)


def _tracks(starts, moves, length=3):
    """float[P 2 L 2]: query 0 moves from ``starts`` by ``moves`` per step, query 1 stays."""
    steps = jnp.arange(length, dtype=jnp.float32)[None, :, None]
    q0 = starts[:, None] + steps * moves[:, None]
    q1 = jnp.broadcast_to(starts[:, None] + 5.0, q0.shape)
    return jnp.stack([q0, q1], axis=1)


def test_flow_response_of_a_world_that_follows_its_flow():
    starts = jnp.array([[0.0, 0.0], [1.0, -1.0], [2.0, 2.0]])
    moves = jnp.array([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]])
    flows = _tracks(starts, moves)
    history = frame_of(jnp.broadcast_to(starts[:, None], (P, 2, 2)))
    future = frame_of(flows[:, 0, 1:])  # the frames the true tracks describe
    config = PlanConfig(sample_steps=4)
    out = {k: float(v) for k, v in flow_response(
        make_world(), history, flows, future, TEXT, MASK, jax.random.PRNGKey(0), config).items()}
    # The analytic dynamics renders its flow exactly: with the true flow it reproduces the
    # future, with every track held still it reproduces the current frame, i.e. copying.
    assert out["psnr_true_flow"] > 60.0
    assert out["psnr_still_flow"] == pytest.approx(out["psnr_copy"], abs=0.05)
    assert out["psnr_copy"] < 40.0
    assert out["change"] == pytest.approx(out["future_change"], rel=1e-3)
    assert out["change"] > 0.0


def test_flow_response_of_a_still_world_and_bad_inputs():
    starts = jnp.zeros((P, 2))
    flows = _tracks(starts, jnp.ones((P, 2)))
    history = frame_of(jnp.zeros((P, 2, 2)))
    out = flow_response(make_world(), history, flows, frame_of(jnp.zeros((P, 2, 2))), TEXT,
                        MASK, jax.random.PRNGKey(0), PlanConfig(sample_steps=4))
    # The truth does not move but the flow does: only the still flow reproduces it.
    assert float(out["future_change"]) == 0.0 and float(out["psnr_copy"]) > 100.0
    assert float(out["psnr_still_flow"]) > 60.0 > float(out["psnr_true_flow"])
    with pytest.raises(ValueError, match="future"):
        flow_response(make_world(), history, flows, frame_of(jnp.zeros((P, 3, 2))), TEXT, MASK,
                      jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="flows"):
        flow_response(make_world(), history, flows[:2], frame_of(jnp.zeros((P, 2, 2))), TEXT,
                      MASK, jax.random.PRNGKey(0))
