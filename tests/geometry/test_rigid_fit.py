"""Robust rigid fit: exact recovery, random poses, outliers, degenerate input, jit/vmap, keys."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flipjax import geometry, sharding
from flipjax.geometry import camera, rigid_fit, se3, synthetic

SCENE = synthetic.BoxSceneConfig(num_points=200)
IMG = SCENE.image_size


def _fit(scene, config=geometry.FitConfig(), key=None):
    return geometry.fit_rigid_sequence(scene.points3d, scene.tracks, scene.K,
                                       visible=scene.visible, key=key, image_size=IMG,
                                       config=config)


def _rot_err(fit, scene):
    return np.asarray(se3.rotation_error_deg(fit.transforms, scene.transforms))[:, 1:]


@pytest.fixture(scope="module")
def clean_scene():
    cfg = dataclasses.replace(SCENE, noise_px=0.0, outlier_fraction=0.0)
    return synthetic.make_box_scenes(jax.random.PRNGKey(1), 8, cfg)


@pytest.fixture(scope="module")
def noisy_scene():
    return synthetic.make_box_scenes(jax.random.PRNGKey(2), 8, SCENE)


def test_exact_recovery_noise_free(clean_scene):
    fit = _fit(clean_scene)
    assert _rot_err(fit, clean_scene).max() < 1e-3
    trans = np.asarray(se3.translation_error(fit.transforms, clean_scene.transforms))
    assert trans.max() < 1e-5
    assert np.asarray(fit.rms).max() < 1e-3
    assert bool(jnp.all(fit.converged)) and not bool(jnp.any(fit.degenerate))
    np.testing.assert_array_equal(fit.transforms[:, 0], np.broadcast_to(np.eye(4), (8, 4, 4)))
    assert bool(jnp.all(fit.inliers == clean_scene.visible))


_POINTS = jax.random.uniform(jax.random.PRNGKey(3), (150, 3), minval=-0.15, maxval=0.15) \
    + jnp.array([0.0, 0.0, 1.0])
_K = camera.intrinsics_from_fov(60.0, 128, 128)
_fit_rigid = jax.jit(lambda X, uv: geometry.fit_rigid(X, uv, _K))


@settings(max_examples=25, deadline=None)
@given(rot=st.lists(st.floats(-0.3, 0.3), min_size=3, max_size=3),
       trans=st.lists(st.floats(-0.08, 0.08), min_size=3, max_size=3))
def test_property_random_poses_recovered_from_identity(rot, trans):
    T = se3.exp(jnp.asarray(trans + rot, jnp.float32))
    uv, _ = camera.project(se3.apply(T, _POINTS), _K)
    fit = _fit_rigid(_POINTS, uv)
    assert float(se3.rotation_error_deg(fit.transform, T)) < 1e-3
    assert float(se3.translation_error(fit.transform, T)) < 1e-5
    assert bool(fit.converged) and int(fit.num_inliers) == 150


# Slow: the default run covers robust fitting with 40% gross outliers, and their inlier
# flags, in test_large_motion_with_outliers_from_identity.
@pytest.mark.slow
@pytest.mark.parametrize("fraction", [0.2, 0.4])
def test_robust_to_gross_outlier_tracks(fraction):
    # Same boxes, motions and noise (same key); only the outlier tracks differ.
    cfg = dataclasses.replace(SCENE, outlier_fraction=fraction)
    scene = synthetic.make_box_scenes(jax.random.PRNGKey(4), 16, cfg)
    no_outliers = synthetic.make_box_scenes(
        jax.random.PRNGKey(4), 16, dataclasses.replace(SCENE, outlier_fraction=0.0))
    fit = _fit(scene)
    err, ref = _rot_err(fit, scene), _rot_err(_fit(no_outliers), no_outliers)
    # Losing 20-40% of the points costs accuracy (fewer measurements), nothing more.
    limit = 1.0 / np.sqrt(1.0 - fraction) * 1.25
    assert np.median(err) < limit * np.median(ref), (np.median(err), np.median(ref))
    assert np.percentile(err, 90) < limit * np.percentile(ref, 90) + 0.1
    # Inlier flags separate the outlier tracks (moved >= 5 px) from the clean ones.
    outlier = np.asarray(scene.outlier)[:, None, :] & np.asarray(scene.visible)
    clean = ~np.asarray(scene.outlier)[:, None, :] & np.asarray(scene.visible)
    inl = np.asarray(fit.inliers)
    assert inl[:, 1:][outlier[:, 1:]].mean() < 0.02
    assert inl[clean].mean() > 0.95
    # A plain least-squares fit is visibly hurt by the same outliers.
    l2 = _fit(scene, geometry.FitConfig(loss="l2", num_hypotheses=0))
    assert np.median(_rot_err(l2, scene)) > 3 * np.median(err)


def test_large_motion_with_outliers_from_identity():
    """No warm start, 35 deg and 12 cm from the initial guess, 40% gross outliers."""
    rng = np.random.default_rng(0)
    T = se3.exp(jnp.array([0.12, -0.05, 0.04, 0.35, -0.4, 0.3]))
    uv, _ = camera.project(se3.apply(T, _POINTS), _K)
    bad = rng.random(150) < 0.4
    uv = uv + jnp.asarray(bad[:, None] * rng.uniform(-30, 30, (150, 2)), jnp.float32)
    fit = geometry.fit_rigid(_POINTS, uv, _K, key=jax.random.PRNGKey(7))
    assert float(se3.rotation_error_deg(fit.transform, T)) < 0.05
    assert not np.any(np.asarray(fit.inliers)[bad & (np.abs(np.asarray(uv - camera.project(
        se3.apply(T, _POINTS), _K)[0])).max(1) > 3.0)])


def _single(points, tracks, visible=None):
    return geometry.fit_rigid_sequence(points[None], tracks[None], _K,
                                       visible=None if visible is None else visible[None])


def _motion_tracks(points, frames=3):
    Ts = jnp.stack([se3.exp(jnp.array([0.01, 0, 0, 0, 0.05, 0]) * t) for t in range(frames)])
    uv, _ = camera.project(se3.apply(Ts[:, None], points[None]).reshape(frames, -1, 3), _K)
    return uv


def _assert_finite(fit):
    for name, x in fit._asdict().items():
        assert np.all(np.isfinite(np.asarray(x, np.float64))), name


def test_degenerate_fewer_than_three_points():
    tracks = _motion_tracks(_POINTS[:2])
    fit = _single(_POINTS[:2], tracks)
    _assert_finite(fit)
    assert bool(jnp.all(fit.degenerate)) and not bool(jnp.any(fit.converged))
    np.testing.assert_array_equal(fit.transforms[0], np.broadcast_to(np.eye(4), (3, 4, 4)))


@pytest.mark.parametrize("bad_depth", [0.0, -1.0, np.nan, np.inf])
def test_degenerate_all_depths_invalid(bad_depth):
    pts = _POINTS.at[:, 2].set(bad_depth)
    fit = _single(pts, _motion_tracks(_POINTS))
    _assert_finite(fit)
    assert bool(jnp.all(fit.degenerate)) and int(fit.num_inliers.max()) == 0


def test_degenerate_collinear_points():
    s = jnp.linspace(-0.2, 0.2, 50)[:, None]
    pts = jnp.array([0.0, 0.0, 1.0]) + s * jnp.array([1.0, 0.5, 0.2])
    fit = _single(pts, _motion_tracks(pts))
    _assert_finite(fit)
    assert bool(jnp.all(fit.degenerate[:, 1:])) and not bool(jnp.any(fit.converged[:, 1:]))


def test_invalid_observations_ignored_not_nan(noisy_scene):
    tracks = noisy_scene.tracks.at[:, 3, :20].set(jnp.nan).at[:, 5, 20:40].set(1e4)
    visible = noisy_scene.visible.at[:, 2, 40:60].set(False)
    fit = geometry.fit_rigid_sequence(noisy_scene.points3d, tracks, noisy_scene.K,
                                      visible=visible, image_size=IMG)
    _assert_finite(fit)
    assert not bool(jnp.any(fit.inliers[:, 3, :20])) and not bool(jnp.any(fit.inliers[:, 5, 20:40]))
    assert not bool(jnp.any(fit.inliers[:, 2, 40:60]))
    assert np.median(np.asarray(se3.rotation_error_deg(fit.transforms, noisy_scene.transforms))) < 0.5


def test_batching_and_vmap_match_single_problems(noisy_scene):
    # (fit_rigid_sequence is itself jitted, so there is no eager path to compare with.)
    # Without random hypotheses a sequence's result does not depend on its batch neighbours.
    # Batching changes XLA's float32 reduction order, and LM's accept/reject steps chained over
    # 8 frames amplify it to ~6e-5 (jax 0.10); the fit's own error is ~2e-3, and a real coupling
    # between neighbours shows at that scale, so 2e-4 separates the two.
    cfg = geometry.FitConfig(num_hypotheses=0)
    batch = _fit(noisy_scene, cfg)
    for i in range(noisy_scene.tracks.shape[0]):
        one = geometry.fit_rigid_sequence(noisy_scene.points3d[i:i + 1], noisy_scene.tracks[i:i + 1],
                                          noisy_scene.K, visible=noisy_scene.visible[i:i + 1],
                                          image_size=IMG, config=cfg)
        np.testing.assert_allclose(one.transforms[0], batch.transforms[i], atol=2e-4)
    # vmap of the single-frame fit equals a Python loop over it (both compiled: op-by-op
    # dispatch of the LM loop would make this the slowest test of the suite).
    X, uv = noisy_scene.points3d[:3], noisy_scene.tracks[:3, 4]
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    single = jax.jit(lambda x, u, k: geometry.fit_rigid(x, u, noisy_scene.K, key=k))
    vm = jax.jit(jax.vmap(single))(X, uv, keys)
    for i in range(3):
        np.testing.assert_allclose(vm.transform[i], single(X[i], uv[i], keys[i]).transform,
                                   atol=1e-5)


def test_deterministic_given_key(noisy_scene):
    a = _fit(noisy_scene, key=jax.random.PRNGKey(11))
    b = _fit(noisy_scene, key=jax.random.PRNGKey(11))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    c = _fit(noisy_scene, key=jax.random.PRNGKey(12))
    np.testing.assert_allclose(c.transforms, a.transforms, atol=2e-2)  # both correct


def test_chain_mode_recovers_and_drops_points_for_good(clean_scene, noisy_scene):
    cfg = geometry.FitConfig(chain=True)
    assert _rot_err(_fit(clean_scene, cfg), clean_scene).max() < 1e-3
    fit = _fit(noisy_scene, cfg)
    inl = np.asarray(fit.inliers)
    assert not np.any(inl[:, 2:] & ~inl[:, 1:-1])  # once dropped, never back
    assert np.median(_rot_err(fit, noisy_scene)) < 0.5


def test_camera_motion_mode_is_inverse_of_scene_motion(clean_scene):
    obj = _fit(clean_scene)
    cam = _fit(clean_scene, geometry.FitConfig(camera_motion=True))
    np.testing.assert_allclose(cam.transforms, se3.inverse(obj.transforms), atol=1e-5)
    np.testing.assert_allclose(
        cam.transforms, se3.inverse(clean_scene.transforms), atol=1e-5)


def test_analytic_normal_equations_match_autodiff():
    T = se3.exp(jnp.array([0.02, -0.01, 0.05, 0.1, -0.2, 0.05]))
    Xc, K = _POINTS.T[:, :20], _K
    uv = camera.project(se3.apply(se3.exp(jnp.array([0.0, 0.01, 0, 0, 0.1, 0])), Xc.T), K)[0].T
    w = jnp.linspace(0.5, 1.5, 20)

    def residual(delta):
        _, pred, _ = rigid_fit._project(se3.exp(delta) @ T, Xc, K, 1e-3)
        return (pred - uv).T  # [N 2]

    J = jax.jacfwd(residual)(jnp.zeros(6))  # [N 2 6]
    r = residual(jnp.zeros(6))
    P, _, front = rigid_fit._project(T, Xc, K, 1e-3)
    H, g = rigid_fit._normal_equations(P, front, K, w, r.T)
    np.testing.assert_allclose(H, jnp.einsum("n,nak,nal->kl", w, J, J), rtol=2e-4, atol=1e-2)
    np.testing.assert_allclose(g, jnp.einsum("n,nak,na->k", w, J, r), rtol=2e-4, atol=1e-3)


def test_spd_solve_matches_numpy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    A = a @ a.T + 6 * np.eye(6)
    b = rng.normal(size=6)
    np.testing.assert_allclose(rigid_fit._spd_solve(jnp.asarray(A), jnp.asarray(b)),
                               np.linalg.solve(A, b), rtol=1e-4, atol=1e-5)


def test_sharded_batch_matches_unsharded(noisy_scene):
    assert jax.device_count() == 8
    mesh = sharding.create_mesh()
    pts, tr, vis = sharding.shard_batch(
        mesh, (noisy_scene.points3d, noisy_scene.tracks, noisy_scene.visible))
    fn = jax.jit(lambda p, t, v: geometry.fit_rigid_sequence(p, t, noisy_scene.K, visible=v,
                                                             image_size=IMG),
                 out_shardings=sharding.batch_sharding(mesh))
    sharded = fn(pts, tr, vis)
    assert sharded.transforms.sharding.is_equivalent_to(sharding.batch_sharding(mesh), 4)
    # Same maths, different float32 reduction order across shards.
    np.testing.assert_allclose(sharded.transforms, _fit(noisy_scene).transforms, atol=5e-4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(points3d=np.zeros((2, 5, 2))), r"points3d: expected shape \[B N 3\]"),
    (dict(tracks=np.zeros((2, 3, 6, 2))), r"tracks: expected shape \[B T N 2\] with N=5"),
    (dict(tracks=np.zeros((3, 3, 5, 2))), r"with B=2"),
    (dict(tracks=np.zeros((2, 0, 5, 2))), "at least one frame"),
    (dict(K=np.eye(4)), r"K: expected shape \[3 3\]"),
    (dict(K=np.zeros((3, 3, 3))), r"K: expected shape \[B 3 3\] with B=2"),
    (dict(visible=np.ones((2, 3, 5))), "visible: expected a bool array"),
    (dict(visible=np.ones((2, 3, 4), bool)), r"visible: expected shape \[B T N\]"),
    (dict(points3d=np.zeros((2, 5, 3), np.int32)), "points3d: expected a float array"),
    (dict(config="fast"), "config: expected a FitConfig"),
    (dict(key=jax.random.split(jax.random.PRNGKey(0), 2)), "key: expected a single PRNG key"),
    (dict(image_size=(128,)), "image_size"),
])
def test_fit_rigid_sequence_bad_input(kwargs, match):
    args = dict(points3d=np.ones((2, 5, 3), np.float32), tracks=np.zeros((2, 3, 5, 2), np.float32),
                K=np.eye(3, dtype=np.float32))
    args.update(kwargs)
    p, t, K = args.pop("points3d"), args.pop("tracks"), args.pop("K")
    with pytest.raises(ValueError, match=match):
        geometry.fit_rigid_sequence(p, t, K, **args)


@pytest.mark.parametrize("kwargs,match", [
    (dict(pixels=np.zeros((4, 2))), r"pixels: expected shape \[N 2\] with N=5"),
    (dict(K=np.eye(3)[None]), r"K: expected shape \[3 3\]"),
    (dict(weights=np.ones(4)), r"weights: expected shape \[N\]"),
    (dict(init=np.eye(3)), r"init: expected shape \[4 4\]"),
])
def test_fit_rigid_bad_input(kwargs, match):
    args = dict(points3d=np.ones((5, 3), np.float32), pixels=np.zeros((5, 2), np.float32),
                K=np.eye(3, dtype=np.float32))
    args.update(kwargs)
    p, uv, K = args.pop("points3d"), args.pop("pixels"), args.pop("K")
    with pytest.raises(ValueError, match=match):
        geometry.fit_rigid(p, uv, K, **args)


@pytest.mark.parametrize("field,value", [("loss", "tukey"), ("loss_scale", 0.0),
                                         ("num_iterations", 0), ("sample_size", 2),
                                         ("num_hypotheses", -1), ("min_inliers", 2),
                                         ("inlier_threshold", -1.0)])
def test_fit_config_validation(field, value):
    with pytest.raises(ValueError, match=field if field != "loss_scale" else "scale"):
        geometry.FitConfig(**{field: value})
