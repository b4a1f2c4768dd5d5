"""plan_to_actions on synthetic plans whose motion is known exactly.

Manipulation scene: a camera 0.8 m above a table looks 30 degrees down; the object is the part
of a tilted plane that projects into a 16 x 16 pixel box at frame 0, on a static background
(the rest of the plane). Each chunk's tracks start on the 8 x 8 query grid and are the exact
projections of the object's known rigid motion (queries on the object) or the query itself
(background), as the planner lays them out: chunk h starts again at the grid in frame h (L-1).
Two motions: a lift (12 cm per chunk, then a carry and a partial put-down) and a push (12 cm
per chunk along world x, then a slide), both rotating about the vertical.

Navigation scene: a camera inside a spherical room moves forward for one chunk, then turns left
by 15 degrees per frame.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from flipjax.geometry import FitConfig, camera, se3, subgoals
from flipjax.geometry import navigation as nav
from flipjax.planning import Plan, grid_queries
from flipjax.planning.actions import plan_to_actions

IMG, H, L, G = 32, 3, 4, 8
T = H * (L - 1) + 1
K64 = np.asarray(camera.intrinsics_from_fov(60.0, IMG, IMG), np.float64)
K = jnp.asarray(K64, jnp.float32)
QUERIES = np.asarray(grid_queries(G, IMG, IMG), np.float64)
_c, _s = np.cos(np.radians(30.0)), np.sin(np.radians(30.0))
# world_from_camera: camera x = world x, camera z (forward) tilted 30 degrees down, world z up.
EXTRINSICS = np.eye(4)
EXTRINSICS[:3, :3] = np.stack([[1.0, 0, 0], [0, -_s, -_c], [0, _c, -_s]], 1)
EXTRINSICS[:3, 3] = [0.0, 0.0, 0.8]
PLANE_POINT = np.array([0.0, 0.03, 0.6])
PLANE_NORMAL = np.array([0.15, -0.25, -1.0]) / np.linalg.norm([0.15, -0.25, -1.0])
BOX = (7.5, 23.5)  # object pixels at frame 0: u and v in this range (mask rows/cols 8..23)
LIFT = [[0, 0, 0.04]] * 3 + [[0.02, 0, 0]] * 3 + [[0, 0, -0.02]] * 3
PUSH = [[0.04, 0, 0]] * 3 + [[0.02, 0.02, 0]] * 3 + [[0, 0.02, 0]] * 3


def _rays(pixels):
    return np.concatenate([pixels, np.ones((*pixels.shape[:-1], 1))], -1) @ np.linalg.inv(K64).T


def _project(X):
    x = X @ K64.T
    return x[..., :2] / x[..., 2:]


def _apply(T, X):
    return X @ T[:3, :3].T + T[:3, 3]


def _motion(world_steps, deg_per_frame):
    """Camera-frame object motion X_t = T_t X_0: world steps [T-1 3] plus a rotation about the
    vertical through the object's centre."""
    centre = _apply(EXTRINSICS, PLANE_POINT)
    offsets = np.concatenate([np.zeros((1, 3)), np.cumsum(world_steps, 0)])
    out = []
    for t in range(T):
        R = np.asarray(se3.so3_exp(jnp.array([0.0, 0.0, np.radians(deg_per_frame) * t])),
                       np.float64)
        world = np.eye(4)
        world[:3, :3], world[:3, 3] = R, centre - R @ centre + offsets[t]
        out.append(np.linalg.inv(EXTRINSICS) @ world @ EXTRINSICS)
    return np.stack(out)


def _plane_hit(pixels, T):
    """Where the rays of pixels meet the plane moved by T (camera frame)."""
    n = T[:3, :3] @ PLANE_NORMAL
    d = PLANE_NORMAL @ PLANE_POINT + n @ T[:3, 3]
    r = _rays(pixels)
    return r * (d / (r @ n))[..., None]


def _object_flows(Ts):
    """float[H L N 2]: chunk h tracks the grid from frame h (L-1); queries on the object move
    with it, the others (background) stay."""
    chunks = []
    for h in range(H):
        s = h * (L - 1)
        X = _plane_hit(QUERIES, Ts[s])
        origin = _project(_apply(np.linalg.inv(Ts[s]), X))
        on = np.all((origin > BOX[0]) & (origin < BOX[1]), -1)
        steps = [_project(_apply(Ts[s + i] @ np.linalg.inv(Ts[s]), X)) for i in range(L)]
        chunks.append(np.stack([np.where(on[:, None], x, QUERIES) for x in steps]))
    return np.stack(chunks)


def _depth():
    v, u = np.mgrid[0:IMG, 0:IMG].astype(np.float64)
    return _plane_hit(np.stack([u, v], -1), np.eye(4))[..., 2]


def _plan(flows, best):
    return Plan(flows=jnp.asarray(flows, jnp.float32), latents=None, videos=None, values=None,
                returns=None, best=jnp.asarray(best, jnp.int32))


@pytest.fixture(scope="module")
def scene():
    truth = np.stack([_motion(LIFT, 1.0), _motion(PUSH, 2.0)])
    beams = np.stack([_object_flows(truth[1]), _object_flows(truth[0])])  # [push, lift]
    # Problem 0 chooses the lift (beam 1), problem 1 the push (beam 0).
    flows = np.stack([beams, beams])
    mask = np.zeros((2, IMG, IMG), bool)
    mask[:, 8:24, 8:24] = True
    depth = jnp.asarray(np.stack([_depth()] * 2), jnp.float32)
    kwargs = dict(object_mask=jnp.asarray(mask), extrinsics=jnp.asarray(EXTRINSICS, jnp.float32))
    out = plan_to_actions(_plan(flows, [1, 0]), depth, K, **kwargs)
    return dict(truth=truth.astype(np.float32), flows=flows, depth=depth, mask=mask,
                kwargs=kwargs, out=out)


def _errors(transforms, truth):
    return (float(np.max(se3.translation_error(transforms, truth))),
            float(np.max(se3.rotation_error_deg(transforms, truth))))


def test_known_motion_is_recovered_across_chunks(scene):
    out, truth = scene["out"], scene["truth"]
    assert out.transforms.shape == (2, T, 4, 4)
    np.testing.assert_array_equal(out.transforms[:, 0], np.broadcast_to(np.eye(4), (2, 4, 4)))
    trans, rot = _errors(out.transforms, truth)
    assert trans < 1e-3 and rot < 0.5, (trans, rot)
    assert out.inlier_fraction.shape == out.degenerate.shape == (2, H, L)
    assert not bool(jnp.any(out.degenerate))
    assert float(jnp.min(out.inlier_fraction)) == 1.0
    # Exactly the queries on the object are fitted (those whose true tracks move).
    chosen = scene["flows"][[0, 1], [1, 0]]
    on_object = np.linalg.norm(chosen[:, :, -1] - chosen[:, :, 0], axis=-1) > 1e-6
    np.testing.assert_array_equal(out.visible[:, :, 1], on_object)
    assert np.all(np.asarray(out.visible[:, :, 0]) == on_object)
    # Subgoals: the contact point moved by the true motion.
    c = np.asarray(out.contact)
    assert bool(jnp.all(out.contact_valid))
    expected = np.einsum("ptij,pj->pti", truth[..., :3, :3], c) + truth[..., :3, 3]
    np.testing.assert_allclose(out.subgoals, expected, atol=1e-3)
    np.testing.assert_allclose(out.subgoals[:, 0], c, atol=1e-6)
    np.testing.assert_allclose(out.subgoals_world,
                               np.asarray(subgoals.to_world(out.subgoals, EXTRINSICS)), atol=1e-6)


def test_lift_is_a_grasp_and_push_starts_behind_the_object(scene):
    out, truth = scene["out"], scene["truth"]
    assert out.is_grasp.tolist() == [True, False]
    contact_w = np.asarray(subgoals.to_world(out.contact, EXTRINSICS))
    # Grasp: the gripper goes straight to the contact.
    np.testing.assert_allclose(out.pre_contact[0], contact_w[0], atol=1e-6)
    # Push along world +x: the gripper starts 8 cm behind the contact, against the motion.
    behind = np.asarray(out.pre_contact[1]) - contact_w[1]
    assert behind[0] < -0.075 and abs(behind[1]) < 0.02 and abs(behind[2]) < 1e-6, behind
    # One waypoint per planning step (chunk boundaries), AVDC's adjustments on the true path.
    assert out.waypoints.shape == (2, H + 1, 3)
    c = np.asarray(out.contact)
    true_goals = np.einsum("ptij,pj->pti", truth[..., :3, :3], c) + truth[..., :3, 3]
    keys = np.asarray(subgoals.to_world(true_goals, EXTRINSICS))[:, ::L - 1]
    np.testing.assert_allclose(out.waypoints[0, :-1], keys[0, :-1] + [0, 0, 0.03], atol=2e-3)
    np.testing.assert_allclose(out.waypoints[1], keys[1] - [0, 0, 0.03], atol=2e-3)


def test_only_the_chosen_beam_is_used(scene):
    flows = scene["flows"].copy()
    rng = np.random.default_rng(0)
    flows[0, 0] = rng.uniform(0, IMG, flows[0, 0].shape)  # problem 0 chose beam 1
    flows[1, 1] = rng.uniform(0, IMG, flows[1, 1].shape)  # problem 1 chose beam 0
    out = plan_to_actions(_plan(flows, [1, 0]), scene["depth"], K, **scene["kwargs"])
    np.testing.assert_array_equal(out.transforms, scene["out"].transforms)
    # Choosing the other beams swaps the motions.
    swapped = plan_to_actions(_plan(scene["flows"], [0, 1]), scene["depth"], K,
                              **scene["kwargs"])
    trans, rot = _errors(swapped.transforms, scene["truth"][::-1])
    assert trans < 1e-3 and rot < 0.5, (trans, rot)


def test_outlier_tracks_on_some_queries_are_dropped(scene):
    # 6 of the 64 queries per chunk jump by 5-15 pixels at every step. The robust fit alone
    # does not absorb them on so few object queries (with consistency_px=1e6 this plan is off
    # by 3 cm / 3 degrees); the neighbourhood consistency check removes exactly them.
    flows = scene["flows"].copy()
    rng = np.random.default_rng(1)
    bad = np.zeros((2, H, G * G), bool)
    for p, b in ((0, 1), (1, 0)):
        for h in range(H):
            idx = rng.choice(G * G, 6, replace=False)
            bad[p, h, idx] = True
            angle = rng.uniform(0, 2 * np.pi, (6, L - 1))
            size = rng.uniform(5.0, 15.0, (6, L - 1, 1))
            flows[p, b, h, 1:, idx] += size * np.stack([np.cos(angle), np.sin(angle)], -1)
    out = plan_to_actions(_plan(flows, [1, 0]), scene["depth"], K, **scene["kwargs"])
    trans, rot = _errors(out.transforms, scene["truth"])
    assert trans < 1e-3 and rot < 0.5, (trans, rot)
    used = np.asarray(out.visible[:, :, 1])
    clean_used = np.asarray(scene["out"].visible[:, :, 1])
    assert not np.any(used & bad)  # no corrupted track reached the fit
    assert np.any(clean_used & bad)  # ... though some of them were on the object
    np.testing.assert_array_equal(used, clean_used & ~bad)  # and every clean one did
    assert out.is_grasp.tolist() == [True, False]


def test_points_instead_of_a_mask_and_no_extrinsics(scene):
    v, u = np.mgrid[8:24, 8:24].astype(np.float32)
    pts = np.stack([u.ravel(), v.ravel()], -1)[::2][None].repeat(2, 0) + 0.25  # [2 128 2]
    plan = _plan(scene["flows"], [1, 0])
    out = plan_to_actions(plan, scene["depth"], K, points=jnp.asarray(pts))
    trans, rot = _errors(out.transforms, scene["truth"])
    assert trans < 1e-3 and rot < 0.5, (trans, rot)
    # The contact is the medoid of the points, lifted with the depth.
    total = np.linalg.norm(pts[0][:, None] - pts[0][None], axis=-1).sum(1)
    np.testing.assert_allclose(out.contact_pixel[0], pts[0][np.argmin(total)])
    np.testing.assert_allclose(out.contact[0], out.points3d[0, np.argmin(total)])
    assert out.subgoals.shape == (2, T, 3)
    assert out.subgoals_world is None and out.is_grasp is None and out.waypoints is None
    assert out.actions is None


def test_empty_mask_is_flagged_not_nan(scene):
    kwargs = dict(scene["kwargs"], object_mask=jnp.zeros((2, IMG, IMG), bool))
    out = plan_to_actions(_plan(scene["flows"], [1, 0]), scene["depth"], K, **kwargs)
    assert not bool(jnp.any(out.contact_valid)) and not bool(jnp.any(out.points_valid))
    assert bool(jnp.all(out.degenerate[:, :, 1:]))
    np.testing.assert_array_equal(out.transforms, np.broadcast_to(np.eye(4), (2, T, 4, 4)))
    assert bool(jnp.all(jnp.isfinite(out.subgoals_world)))


def _camera_poses():
    step = lambda tw: np.asarray(se3.exp(jnp.asarray(tw, jnp.float32)), np.float64)
    steps = [step([0, 0, 0.1, 0, 0, 0])] * (L - 1) \
        + [step([0, 0, 0, 0, -np.radians(15.0), 0])] * (T - L)
    poses = [np.eye(4)]
    for s in steps:
        poses.append(poses[-1] @ s)
    return np.stack(poses)


def test_navigation_forward_then_turn_left():
    radius, poses = 3.0, _camera_poses()
    chunks = []
    for h in range(H):
        s = h * (L - 1)
        d = _rays(QUERIES) @ poses[s][:3, :3].T
        o = poses[s][:3, 3]
        od, dd = d @ o, np.sum(d * d, -1)
        tau = (-od + np.sqrt(od**2 - dd * (o @ o - radius**2))) / dd
        X = o + tau[:, None] * d  # the room's wall, in camera 0's frame
        chunks.append(np.stack([_project(_apply(np.linalg.inv(poses[s + i]), X))
                                for i in range(L)]))
    v, u = np.mgrid[0:IMG, 0:IMG].astype(np.float64)
    depth = radius / np.linalg.norm(_rays(np.stack([u, v], -1)), axis=-1)
    # Without random hypotheses the fit compiles in half the time; this scene needs none.
    out = plan_to_actions(_plan(np.stack(chunks)[None, None], [0]),
                          jnp.asarray(depth[None], jnp.float32), K, mode="navigation",
                          fit_config=FitConfig(num_hypotheses=0))
    names = [nav.ACTION_NAMES[int(c)] for c in out.actions[0]]
    assert names == ["MoveAhead"] * (L - 1) + ["RotateLeft"] * (T - L)
    trans, rot = _errors(out.transforms[0], poses.astype(np.float32))
    assert trans < 1e-3 and rot < 0.1, (trans, rot)
    assert out.contact is None and out.subgoals is None


_FLOWS = jnp.zeros((2, 1, H, L, G * G, 2))
_DEPTH = jnp.ones((2, IMG, IMG))
_MASK = jnp.ones((2, IMG, IMG), bool)
_PTS = jnp.ones((2, 5, 2))


@pytest.mark.parametrize("kwargs,match", [
    (dict(object_mask=_MASK, points=_PTS), "exactly one of object_mask .* got both"),
    (dict(), "exactly one of object_mask .* got neither"),
    (dict(depth=jnp.ones((2, IMG)), points=_PTS), r"depth: expected shape \[P Hi Wi\]"),
    (dict(depth=jnp.ones((3, IMG, IMG)), points=_PTS), r"depth: .*P=2.*\[3, 32, 32\]"),
    (dict(K=jnp.ones((3, 4)), points=_PTS), r"K: expected shape \[3 3\]"),
    (dict(K=jnp.ones((5, 3, 3)), points=_PTS), r"K: .*\[5, 3, 3\]; K must be \[3 3\] or \[P 3 3\]"),
    (dict(object_mask=jnp.ones((2, IMG, 31), bool)), r"object_mask: .*\[2, 32, 31\]"),
    (dict(points=jnp.ones((2, 5, 3))), r"points: expected shape \[P M 2\]"),
    (dict(points=_PTS, queries=jnp.ones((7, 2))), r"queries: .*N=64.*\[7, 2\]"),
    (dict(points=_PTS, extrinsics=jnp.eye(3)), r"extrinsics: expected shape \[4 4\]"),
    (dict(points=_PTS, best=[0, 1]), r"plan.best must index the B=1 beams"),
    (dict(points=_PTS, mode="flying"), "mode must be one of"),
    (dict(points=_PTS, mode="navigation"), "points is not used by mode='navigation'"),
    (dict(points=_PTS, fit_config=FitConfig(camera_motion=True)), "camera_motion=True"),
    (dict(points=_PTS, flows=jnp.zeros((2, 1, H, L, 64))), r"plan.flows: expected shape"),
])
def test_bad_inputs_name_the_argument(kwargs, match):
    kwargs = dict(kwargs)
    plan = _plan(kwargs.pop("flows", _FLOWS), kwargs.pop("best", [0, 0]))
    depth, k = kwargs.pop("depth", _DEPTH), kwargs.pop("K", K)
    with pytest.raises(ValueError, match=match):
        plan_to_actions(plan, depth, k, **kwargs)
