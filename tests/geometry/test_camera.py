"""Camera: projection round trips, known intrinsics, bilinear lookup, masks, bad input."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flipjax.geometry import camera


def test_intrinsics_from_fov_known_answer():
    K = camera.intrinsics_from_fov(90.0, 100, 200)
    np.testing.assert_allclose(K, [[100.0, 0, 99.5], [0, 100.0, 49.5], [0, 0, 1]], rtol=1e-6)


def test_project_known_answer_and_behind_camera():
    K = jnp.array([[100.0, 0, 50], [0, 200.0, 40], [0, 0, 1]])
    uv, front = camera.project(jnp.array([[0.5, -0.25, 2.0], [0.0, 0.0, -1.0]]), K)
    np.testing.assert_allclose(uv[0], [75.0, 15.0])
    assert bool(front[0]) and not bool(front[1])
    assert np.all(np.isfinite(uv))


@settings(max_examples=50, deadline=None)
@given(u=st.floats(-20, 150), v=st.floats(-20, 150), z=st.floats(0.05, 20.0),
       skew=st.floats(-5, 5))
def test_unproject_project_round_trip(u, v, z, skew):
    K = jnp.array([[110.0, skew, 63.5], [0, 95.0, 60.0], [0, 0, 1]])
    X = camera.unproject(jnp.array([u, v], jnp.float32), jnp.float32(z), K)
    assert float(X[2]) == pytest.approx(z, rel=1e-6)
    uv, front = camera.project(X, K)
    assert bool(front)
    np.testing.assert_allclose(uv, [u, v], atol=2e-3 * max(1.0, abs(u), abs(v)) / 10 + 1e-3)


def test_batched_K_pairs_with_leading_axis():
    K = jnp.stack([camera.intrinsics_from_fov(60.0, 64, 64), camera.intrinsics_from_fov(90.0, 64, 64)])
    X = jnp.broadcast_to(jnp.array([0.1, 0.1, 1.0]), (2, 5, 3))
    uv, _ = camera.project(X, K)
    np.testing.assert_allclose(uv[0, 0], camera.project(X[0, 0], K[0])[0], atol=1e-5)
    np.testing.assert_allclose(uv[1, 3], camera.project(X[1, 3], K[1])[0], atol=1e-5)
    with pytest.raises(ValueError, match=r"batched K \[2, 3, 3\]"):
        camera.project(jnp.zeros((3, 5, 3)), K)


def test_bilinear_sample_known_answer():
    img = jnp.arange(12.0).reshape(3, 4)  # value = 4 v + u
    vals, inside = camera.bilinear_sample(img, jnp.array([[1.5, 0.5], [3.0, 2.0], [3.2, 0.0]]))
    np.testing.assert_allclose(vals[:2], [3.5, 11.0], atol=1e-6)
    assert inside.tolist() == [True, True, False]
    rgb = jnp.stack([img, 2 * img], -1)
    v2, _ = camera.bilinear_sample(rgb, jnp.array([[1.5, 0.5]]))
    np.testing.assert_allclose(v2[0], [3.5, 7.0], atol=1e-6)


def test_depth_lookup_refuses_to_blend_missing_depth():
    depth = jnp.ones((4, 4)).at[1, 2].set(0.0).at[3, 3].set(jnp.nan)
    z, valid = camera.depth_lookup(depth, jnp.array([[0.5, 0.5], [1.5, 0.5], [2.0, 2.0],
                                                     [2.5, 2.5], [10.0, 1.0]]))
    assert valid.tolist() == [True, False, True, False, False]
    np.testing.assert_allclose(z, [1.0, 0.0, 1.0, 0.0, 0.0])


def test_in_image_bounds_and_nan():
    px = jnp.array([[-0.5, -0.5], [127.5, 127.5], [127.6, 3.0], [jnp.nan, 1.0]])
    assert camera.in_image(px, (128, 128)).tolist() == [True, True, False, False]
    assert camera.in_image(px, (128, 128), margin=1.0).tolist() == [False, False, False, False]


@pytest.mark.parametrize("call,match", [
    (lambda: camera.project(jnp.zeros((4, 2)), jnp.eye(3)), r"points: expected shape \[... 3\]"),
    (lambda: camera.project(jnp.zeros((4, 3)), jnp.eye(4)), r"K: expected shape"),
    (lambda: camera.unproject(jnp.zeros((4, 2)), jnp.zeros(3), jnp.eye(3)), r"depth: expected shape"),
    (lambda: camera.bilinear_sample(jnp.zeros(5), jnp.zeros((1, 2))), r"image: expected shape"),
    (lambda: camera.depth_lookup(jnp.zeros((2, 2, 1)), jnp.zeros((1, 2))), r"depth: expected shape"),
    (lambda: camera.in_image(jnp.zeros((3, 2)), (0, 5)), "image_size"),
    (lambda: camera.intrinsics_from_fov(0.0, 4, 4), "fov_deg"),
])
def test_bad_input_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
