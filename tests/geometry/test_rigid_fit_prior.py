"""The robust fit's motion prior (FitConfig.prior_translation / prior_rotation): a small,
distant object tracked with pixel noise, as the toy planner's blocks at 32x32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flipjax import geometry
from flipjax.geometry import camera, se3

K = jnp.asarray([[30.0, 0.0, 15.5], [0.0, 30.0, 15.5], [0.0, 0.0, 1.0]])
MOVE = jnp.asarray([0.03, -0.01, 0.0])  # 3 cm sideways: about 1.5 px at 0.6 m


def _problems(n, noise_px, seed=0):
    """n problems: 12 points on a 3 cm block at 0.6 m (about 1.5 px across), moved by MOVE,
    tracked with Gaussian pixel noise."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    pts = jnp.asarray([0.0, 0.0, 0.6]) + 0.015 * jax.random.uniform(k1, (n, 12, 3), minval=-1.0)
    moved = pts + MOVE
    uv = camera.project(moved, K)[0] + noise_px * jax.random.normal(k2, (n, 12, 2))
    return pts, uv


def _fit(pts, uv, cfg):
    return jax.jit(jax.vmap(lambda x, u: geometry.fit_rigid(x, u, K, config=cfg)))(pts, uv)


def test_no_prior_is_the_default_fit_exactly():
    pts, uv = _problems(4, 0.3)
    a = _fit(pts, uv, geometry.FitConfig())
    b = _fit(pts, uv, geometry.FitConfig(prior_translation=0.0, prior_rotation=0.0))
    np.testing.assert_array_equal(np.asarray(a.transform), np.asarray(b.transform))


def test_exact_tracks_are_still_fitted_closely():
    pts, uv = _problems(8, 0.0)
    fit = _fit(pts, uv, geometry.FitConfig(prior_translation=0.1, prior_rotation=0.3))
    centre = pts.mean(1)
    moved = jnp.einsum("nij,nj->ni", fit.transform[:, :3, :3], centre) + fit.transform[:, :3, 3]
    # The lateral motion is what the pixels measure: within 10% of it.
    err = np.linalg.norm(np.asarray(moved - centre - MOVE)[:, :2], axis=-1)
    assert np.max(err) < 0.1 * float(jnp.linalg.norm(MOVE))


def test_prior_removes_spurious_depth_motion_from_noisy_tracks():
    pts, uv = _problems(64, 0.5)
    centre = pts.mean(1)

    def centroid_error(cfg):
        T = _fit(pts, uv, cfg).transform
        moved = jnp.einsum("nij,nj->ni", T[:, :3, :3], centre) + T[:, :3, 3]
        return np.abs(np.asarray(moved - centre - MOVE))          # n 3

    free = centroid_error(geometry.FitConfig())
    prior = centroid_error(geometry.FitConfig(prior_translation=0.1, prior_rotation=0.3))
    # Half a pixel of noise on a 1.5 px wide object: the unregularised fit moves it metres
    # along the ray (depth is only seen through the points' spread); with the prior the
    # depth error is a few centimetres and the lateral error does not grow.
    assert np.median(free[:, 2]) > 0.1
    assert np.median(prior[:, 2]) < 0.25 * np.median(free[:, 2])
    assert np.median(prior[:, 2]) < 0.05
    assert np.median(np.linalg.norm(prior[:, :2], axis=-1)) <= 1.1 * np.median(
        np.linalg.norm(free[:, :2], axis=-1))


@pytest.mark.parametrize("field", ["prior_translation", "prior_rotation"])
def test_negative_prior_is_refused(field):
    with pytest.raises(ValueError, match=field):
        geometry.FitConfig(**{field: -0.1})


def test_prior_cost_gradient_matches_autodiff():
    # The hand-written normal-equation terms of the prior are its exact gradient at T
    # (left perturbation), so the LM steps descend the cost they report.
    from flipjax.geometry import rigid_fit

    cfg = geometry.FitConfig(prior_translation=0.05, prior_rotation=0.2)
    T = se3.exp(jnp.asarray([0.02, -0.01, 0.03, 0.1, -0.05, 0.2]))
    centre = jnp.asarray([0.01, 0.02, 0.6])
    _, _, g = rigid_fit._prior(T, centre, cfg)
    auto = jax.grad(lambda d: rigid_fit._prior(se3.matmul(se3.exp(d), T), centre, cfg)[0])(
        jnp.zeros(6))
    # The rotation part uses the first-order Jacobian of log: close, not exact, at 0.23 rad.
    np.testing.assert_allclose(np.asarray(g[:3]), np.asarray(auto[:3]), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g[3:]), np.asarray(auto[3:]), rtol=0.05, atol=1e-3)
