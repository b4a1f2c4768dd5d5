"""candidate_spread on the analytic world of test_beam_search (its proposals are known)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flipjax.planning.diagnostics import candidate_spread
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
