"""Contact point, subgoals, grasp-vs-push, navigation actions, replanning triggers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flipjax.geometry import camera, navigation, se3, subgoals

K = camera.intrinsics_from_fov(60.0, 48, 64)
# World z up, camera looking along world y: camera (x, y, z) = world (x, -z, y).
WORLD_FROM_CAMERA = jnp.array([[1.0, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 1.0], [0, 0, 0, 1]])


def test_sample_mask_inside_mask_and_empty_flag(key):
    mask = jnp.zeros((48, 64), bool).at[10:20, 30:34].set(True)
    uv, ok = subgoals.sample_mask(mask, key, 200)
    assert bool(ok)
    assert np.all((uv[:, 0] >= 29.5) & (uv[:, 0] <= 33.5) & (uv[:, 1] >= 9.5) & (uv[:, 1] <= 19.5))
    assert not bool(subgoals.sample_mask(jnp.zeros((48, 64), bool), key, 10)[1])


def test_contact_point_medoid_and_median_depth(key):
    mask = jnp.zeros((48, 64), bool).at[20:29, 10:19].set(True)  # centre (u, v) = (14, 24)
    depth = jnp.full((48, 64), 0.9).at[20:29, 10:19].set(0.6).at[24, 14].set(5.0)  # one spike
    point, pixel, ok = subgoals.contact_point(mask, depth, K, key, num_samples=300)
    assert bool(ok)
    np.testing.assert_allclose(pixel, [14.0, 24.0], atol=1.0)
    assert float(point[2]) == pytest.approx(0.6, abs=1e-5)  # the median ignores the spike
    np.testing.assert_allclose(camera.project(point, K)[0], pixel, atol=1e-3)
    _, _, ok = subgoals.contact_point(mask, jnp.zeros((48, 64)), K, key)
    assert not bool(ok)


def test_subgoals_follow_transforms():
    Ts = jnp.stack([se3.exp(jnp.array([0.0, 0.0, 0.0, 0, 0.1 * t, 0])) for t in range(4)])
    p = jnp.array([0.1, 0.0, 1.0])
    g = subgoals.subgoals(p, Ts)
    np.testing.assert_allclose(g[0], p, atol=1e-7)
    np.testing.assert_allclose(g, se3.apply(Ts, p[None, None])[:, 0], atol=1e-7)


def _lift_path(dz):
    return jnp.array([[0.0, 0.5, 0.1], [0.0, 0.5, 0.1 + dz], [0.05, 0.5, 0.1 + dz],
                      [0.2, 0.5, 0.1 + dz]])


def test_grasp_when_lifted_more_than_10cm():
    s = _lift_path(0.15)
    plan = subgoals.plan_manipulation(s[0], s)
    assert bool(plan.is_grasp)
    assert float(plan.max_vertical_step) == pytest.approx(0.15, abs=1e-6)
    np.testing.assert_allclose(plan.pre_contact, s[0])
    np.testing.assert_allclose(plan.waypoints[:-1, 2], s[:-1, 2] + 0.03, atol=1e-6)
    np.testing.assert_allclose(plan.waypoints[-1], s[-1], atol=1e-6)


def test_a_gradual_lift_is_a_grasp_by_rise_and_a_push_by_avdcs_step_test():
    # Lifted 16 cm in four 4 cm steps: no single step exceeds 10 cm.
    s = jnp.array([[0.0, 0.5, 0.1 + 0.04 * k] for k in range(5)] + [[0.2, 0.5, 0.26]])
    rise = subgoals.plan_manipulation(s[0], s)
    assert bool(rise.is_grasp) and float(rise.max_rise) == pytest.approx(0.16, abs=1e-6)
    step = subgoals.plan_manipulation(s[0], s, subgoals.ManipulationConfig(grasp_test="step"))
    assert not bool(step.is_grasp) and float(step.max_vertical_step) == pytest.approx(0.04,
                                                                                      abs=1e-6)
    # Pressing down (a handle, a top-down button) is never a lift.
    down = s.at[:, 2].set(0.3 - (s[:, 2] - 0.1))
    assert not bool(subgoals.plan_manipulation(down[0], down).is_grasp)
    with pytest.raises(ValueError, match="grasp_test"):
        subgoals.plan_manipulation(s[0], s, subgoals.ManipulationConfig(grasp_test="z"))


def test_push_backs_off_behind_the_object():
    s = _lift_path(0.05)
    plan = subgoals.plan_manipulation(s[0], s)
    assert not bool(plan.is_grasp)
    # First subgoal > 10 cm away horizontally is the last one, direction +x: start 8 cm behind.
    np.testing.assert_allclose(plan.pre_contact, s[0] - jnp.array([0.08, 0.0, 0.0]), atol=1e-6)
    np.testing.assert_allclose(plan.waypoints[:, 2], s[:, 2] - 0.03, atol=1e-6)


def test_to_world_and_vertical_motion_in_camera_frame():
    # An object lifted 15 cm in the world moves along camera -y.
    cam = jnp.array([[0.0, 0.1, 0.8], [0.0, -0.05, 0.8], [0.1, -0.05, 0.8]])
    world = subgoals.to_world(cam, WORLD_FROM_CAMERA)
    np.testing.assert_allclose(world[1] - world[0], [0.0, 0.0, 0.15], atol=1e-6)
    assert bool(subgoals.plan_manipulation(world[0], world).is_grasp)


def _poses(yaw_deg, forward):
    return jnp.stack([se3.exp(jnp.array([0, 0, forward * t, 0, -np.radians(yaw_deg) * t, 0]))
                      for t in range(3)])


@pytest.mark.parametrize("yaw,forward,expected", [
    (20.0, 0.0, "RotateLeft"), (-20.0, 0.0, "RotateRight"), (2.0, 0.25, "MoveAhead"),
    (0.0, 0.0, "Done")])
def test_navigation_actions(yaw, forward, expected):
    codes = navigation.navigation_actions(_poses(yaw, forward))
    assert [navigation.ACTION_NAMES[int(c)] for c in codes] == [expected, expected]


def test_navigation_done_is_final():
    poses = jnp.stack([jnp.eye(4), jnp.eye(4), se3.exp(jnp.array([0, 0, 0.3, 0, 0, 0]))])
    assert navigation.navigation_actions(poses).tolist() == [navigation.DONE, navigation.DONE]


def test_navigation_from_fitted_camera_motion():
    from flipjax import geometry
    from flipjax.geometry import synthetic

    scene = synthetic.make_box_scenes(jax.random.PRNGKey(5), 1, synthetic.BoxSceneConfig(
        num_points=200, noise_px=0.0, outlier_fraction=0.0))
    fit = geometry.fit_rigid_sequence(scene.points3d, scene.tracks, scene.K,
                                      visible=scene.visible,
                                      config=geometry.FitConfig(camera_motion=True))
    np.testing.assert_array_equal(navigation.navigation_actions(fit.transforms[0]),
                                  navigation.navigation_actions(se3.inverse(scene.transforms[0])))


def test_stuck_counter_triggers_after_patience():
    count, pos = jnp.array(0), jnp.zeros(3)
    fired = []
    for step in range(7):
        new = pos + (0.01 if step == 2 else 0.0)
        count, replan = navigation.update_stuck_counter(count, pos, new, patience=3)
        pos = new
        fired.append(bool(replan))
    assert fired == [False, False, False, False, False, True, False]


def test_low_inlier_trigger():
    usable = jnp.ones((2, 100), bool)
    inl = jnp.zeros((2, 100), bool).at[0, :9].set(True).at[1, :10].set(True)
    assert navigation.low_inlier_trigger(inl, usable).tolist() == [True, False]
    assert bool(navigation.low_inlier_trigger(inl[0], jnp.zeros(100, bool)))


@pytest.mark.parametrize("call,match", [
    (lambda: subgoals.sample_mask(jnp.zeros((4, 4)), jax.random.PRNGKey(0)), "mask: expected a bool"),
    (lambda: subgoals.contact_point(jnp.zeros((4, 4), bool), jnp.zeros((4, 5)), K,
                                    jax.random.PRNGKey(0)), r"depth: expected shape \[H W\] with W=4"),
    (lambda: subgoals.subgoals(jnp.zeros(2), jnp.zeros((3, 4, 4))), r"point: expected shape \[3\]"),
    (lambda: subgoals.to_world(jnp.zeros(3), jnp.eye(3)), "world_from_camera"),
    (lambda: subgoals.plan_manipulation(jnp.zeros(3), jnp.zeros((1, 3))), "at least 2 subgoals"),
    (lambda: navigation.navigation_actions(jnp.zeros((1, 4, 4))), "at least 2 frames"),
    (lambda: navigation.update_stuck_counter(0, jnp.zeros(3), jnp.zeros(2)), "position: expected"),
    (lambda: navigation.low_inlier_trigger(jnp.zeros(3, bool), jnp.zeros(4, bool)), "usable"),
])
def test_bad_input_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
