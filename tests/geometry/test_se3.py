"""SE(3)/SO(3): known answers, round trips, edge angles, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flipjax.geometry import se3

vec3 = st.lists(st.floats(-1.0, 1.0, allow_nan=False), min_size=3, max_size=3)


def test_exp_known_answer_rotation_about_z():
    T = se3.exp(jnp.array([0.1, 0.2, 0.3, 0.0, 0.0, np.pi / 2]))
    np.testing.assert_allclose(T[:3, :3], [[0, -1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-6)
    np.testing.assert_allclose(T[3], [0, 0, 0, 1])
    # Pure translation twist is a translation by rho.
    np.testing.assert_allclose(se3.exp(jnp.array([0.1, -0.2, 0.3, 0, 0, 0]))[:3, 3],
                               [0.1, -0.2, 0.3], atol=1e-7)


@settings(max_examples=60, deadline=None)
@given(rho=vec3, axis=vec3, angle=st.floats(0.0, 3.1))
def test_log_exp_round_trip(rho, axis, angle):
    axis = np.asarray(axis)
    if np.linalg.norm(axis) < 1e-3:
        axis = np.array([1.0, 0.0, 0.0])
    phi = angle * axis / np.linalg.norm(axis)
    twist = jnp.asarray(np.concatenate([rho, phi]), jnp.float32)
    T = se3.exp(twist)
    np.testing.assert_allclose(se3.log(T), twist, atol=2e-4)
    np.testing.assert_allclose(T[:3, :3] @ T[:3, :3].T, np.eye(3), atol=1e-5)


@pytest.mark.parametrize("angle", [0.0, 1e-8, 1e-5, 1e-3, np.pi - 1e-3, np.pi - 1e-6, np.pi])
def test_so3_log_edge_angles(angle):
    axis = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
    R = se3.so3_exp(jnp.asarray(angle * axis, jnp.float32))
    phi = np.asarray(se3.so3_log(R))
    assert np.all(np.isfinite(phi))
    np.testing.assert_allclose(np.asarray(se3.so3_exp(jnp.asarray(phi))), np.asarray(R), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(phi), angle, atol=1e-3)


def test_inverse_compose_apply():
    T = se3.exp(jnp.array([[0.1, -0.4, 0.2, 0.3, 0.2, -0.9], [1.0, 0.0, 0.0, 0.0, 2.0, 0.0]]))
    np.testing.assert_allclose(se3.compose(T, se3.inverse(T)), np.broadcast_to(np.eye(4), T.shape),
                               atol=1e-6)
    pts = jnp.array([[[0.1, 0.2, 0.3], [1.0, -1.0, 2.0]]] * 2)
    back = se3.apply(se3.inverse(T), se3.apply(T, pts))
    np.testing.assert_allclose(back, pts, atol=1e-6)
    homog = np.einsum("bij,bnj->bni", np.asarray(T), np.concatenate([pts, np.ones((2, 2, 1))], -1))
    np.testing.assert_allclose(se3.apply(T, pts), homog[..., :3], atol=1e-6)


def test_error_metrics_known_answers():
    a = se3.exp(jnp.array([0.0, 0, 0, 0, 0, 0]))
    b = se3.exp(jnp.array([0.3, 0.4, 0.0, 0, np.radians(30.0), 0]))
    assert float(se3.rotation_error_deg(a, b)) == pytest.approx(30.0, abs=1e-3)
    assert float(se3.translation_error(a, se3.make(jnp.eye(3), jnp.array([0.3, 0.4, 0.0])))) \
        == pytest.approx(0.5, abs=1e-6)
    assert float(se3.rotation_error_deg(b, b)) == pytest.approx(0.0, abs=1e-3)


def test_exp_gradient_finite_at_identity():
    g = jax.grad(lambda x: jnp.sum(se3.exp(x)))(jnp.zeros(6))
    assert np.all(np.isfinite(g))


def test_matmul_matches_numpy():
    a = np.random.default_rng(0).normal(size=(5, 4, 3)).astype(np.float32)
    b = np.random.default_rng(1).normal(size=(5, 3, 2)).astype(np.float32)
    np.testing.assert_allclose(se3.matmul(a, b), a @ b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn,args,match", [
    (se3.exp, (jnp.zeros(5),), r"twist: expected shape \[... 6\]"),
    (se3.log, (jnp.zeros((3, 3)),), r"T: expected shape \[... 4 4\]"),
    (se3.so3_exp, (jnp.zeros(3, jnp.int32),), "expected a float array"),
    (se3.so3_log, (jnp.zeros((4, 4)),), r"R: expected shape \[... 3 3\]"),
    (se3.inverse, (jnp.zeros((4, 3)),), r"T: expected shape"),
    (se3.compose, (jnp.eye(4), jnp.eye(3)), r"b: expected shape"),
    (se3.apply, (jnp.eye(4), jnp.zeros((5, 2))), r"points: expected shape \[... N 3\]"),
    (se3.make, (jnp.eye(3), jnp.zeros(4)), r"t: expected shape"),
    (se3.hat, (jnp.zeros(4),), r"phi: expected shape"),
    (se3.rotation_error_deg, (jnp.eye(4), jnp.zeros((2, 2))), r"b: expected shape"),
    (se3.translation_error, (jnp.eye(3), jnp.eye(4)), r"a: expected shape"),
    (se3.matmul, (jnp.eye(3), jnp.eye(4)), "cannot multiply"),
])
def test_bad_input_errors(fn, args, match):
    with pytest.raises(ValueError, match=match):
        fn(*args)
