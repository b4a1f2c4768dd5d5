"""From a plan to robot actions: the chosen beam's tracks -> SE(3) motion -> subgoals or moves.

A :class:`~flipjax.planning.beam_search.Plan` holds, for each of its H planning steps (chunks),
the tracks of the query points over L steps, and each chunk starts its queries afresh in the
frame current at that step (step 0 of chunk h is the last generated frame of chunk h-1). The
points tracked in different chunks are NOT the same physical points, so the chunks cannot be
concatenated into one track sequence: each chunk is fitted on its own, from 3D points known at
its first frame, and the chunks' motions compose.

Manipulation: the object is its support at frame 0 (the mask, or the given pixels closed into
a region) with the first-frame depth. For chunk h, each query is warped back to frame 0 through
the motion found so far (Newton's method on ``project(T_h unproject(u, depth(u))) = q``); the
queries that land on the support lie on the object, and their surface points moved by ``T_h``
are their 3D positions now. ``geometry.fit_rigid_sequence`` fits the chunk's motion from those
points and the queries' own tracks, after a query whose displacement disagrees with a robust
local affine fit of its neighbours' (by ``consistency_px`` or more) is dropped. The chunk
motions compose into camera-frame transforms over the plan, ``X_t = T_t X_0``, T = H (L-1) + 1
frames; the contact point moved by them gives the subgoals, and with extrinsics AVDC's
grasp-vs-push rules give a manipulation plan.

Why not interpolate the queries' tracks at the object's pixels instead: an interpolated track
only approximates the motion field (which bends with perspective and, at the object's boundary,
mixes in the background's motion), and one bad query smears into every object point around it.
Fitting the queries' own tracks recovers a rigid motion exactly from exact tracks, leaves the
background out by construction and keeps a bad track a single outlier.

Navigation: the static scene is tracked at all queries, with the same consistency check. Chunk
0 lifts the queries with the first-frame depth; each later chunk gets its queries' depths from
the previous chunk's points moved into the new camera (inverse depth blended by inverse-distance
weighting, so newly seen parts borrow their neighbours' depth: a rotation does not depend on
depth, a translation only through the parts seen before). The camera poses compose over the
chunks into AVDC's discrete actions.

Limits: an object needs at least ``FitConfig.min_inliers`` (3) queries on it, and its motion is
only as well conditioned as those are many and spread; a chunk without enough is flagged
``degenerate`` and repeats the previous motion. Plan with a query grid fine enough for the
objects (``PlanConfig.query_grid``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flipjax import shapes
from flipjax.geometry import camera, neighbourhood, rigid_fit, se3, subgoals, warp
from flipjax.geometry import navigation as nav
from flipjax.geometry.rigid_fit import FitConfig
from flipjax.geometry.sequence import fit_rigid_sequence
from flipjax.geometry.subgoals import ManipulationConfig
from flipjax.planning.beam_search import Plan
from flipjax.typing import Array, ArrayLike, PRNGKey

MODES = ("manipulation", "navigation")


class PlanActions(NamedTuple):
    """What :func:`plan_to_actions` derives from the chosen beam of each of P problems.

    Shapes: T = H * (L - 1) + 1 frames, N queries per chunk, M object pixels (navigation: M =
    N), W waypoints (see ``waypoint_stride``).

    Attributes:
      transforms: float[P T 4 4], ``transforms[:, 0]`` the identity. Manipulation: the object's
        motion in the camera frame, X_t = T_t X_0. Navigation: the pose of camera t in camera
        0's frame, X_0 = T_t X_t.
      tracks: float[P H L N 2] the chosen beam's query tracks as fitted (each chunk's queries
        plus their displacements).
      visible: bool[P H L N] the observations the fits used: on the object (manipulation),
        with a depth, consistent with their neighbours and inside the image.
      inlier_fraction: float[P H L] inliers of the fit over the observations used, per chunk
        and step (step 0 is the chunk's start, identity by definition); 0 where none were.
      degenerate: bool[P H L] the fit of that step was degenerate (too few usable queries or
        inliers) and repeats the previous step's transform.
      points3d: float[P M 3] the object's pixels (mask samples or ``points``) lifted at frame
        0, camera frame (navigation: the lifted queries of chunk 0); zeros where invalid.
      points_valid: bool[P M] those with a valid depth (and a non-empty mask).
      contact: float[P 3] contact point at frame 0, camera frame (manipulation; else None).
      contact_pixel: float[P 2] its pixel (manipulation; else None).
      contact_valid: bool[P] False for an empty mask or no depth near the contact; the
        contact, subgoals and plan are then meaningless (manipulation; else None).
      subgoals: float[P T 3] the contact point moved by ``transforms``, camera frame
        (manipulation; else None).
      subgoals_world: float[P T 3] the same in the world frame (needs ``extrinsics``; else
        None, as are the three fields below).
      is_grasp: bool[P] AVDC's lift test on the waypoint subgoals.
      pre_contact: float[P 3] world point where the gripper starts: the contact for a grasp,
        behind it along the push direction for a push.
      waypoints: float[P W 3] world-frame gripper waypoints.
      actions: int32[P T-1] navigation codes indexing ``geometry.navigation.ACTION_NAMES``
        (navigation; else None).
    """

    transforms: Array
    tracks: Array
    visible: Array
    inlier_fraction: Array
    degenerate: Array
    points3d: Array
    points_valid: Array
    contact: Array | None = None
    contact_pixel: Array | None = None
    contact_valid: Array | None = None
    subgoals: Array | None = None
    subgoals_world: Array | None = None
    is_grasp: Array | None = None
    pre_contact: Array | None = None
    waypoints: Array | None = None
    actions: Array | None = None


# ------------------------------------------------------------------------------------------
# Per-chunk fits
# ------------------------------------------------------------------------------------------


class _ChunkOut(NamedTuple):
    transforms: Array       # float[P L 4 4] cumulative at the chunk's steps
    tracks: Array           # float[P L N 2]
    visible: Array          # bool[P L N]
    inlier_fraction: Array  # float[P L]
    degenerate: Array       # bool[P L]


def _fit_chunk(X: Array, tracks: Array, use: Array, K: Array, key: PRNGKey,
               image_size: tuple[int, int], cfg: FitConfig) -> tuple:
    """Fits one chunk for all problems: X [P N 3] at the chunk's start, tracks [P L N 2],
    use [P N]. Returns the fit, the inlier fraction float[P L] and the usable observations
    bool[P L N]."""
    visible = jnp.broadcast_to(use[:, None], tracks.shape[:3])
    fit = fit_rigid_sequence(X, tracks, K, visible=visible, key=key, image_size=image_size,
                             config=cfg)
    usable = rigid_fit.usable_points(X[:, None], tracks, visible, image_size, cfg.min_depth)
    n_usable = jnp.sum(usable, -1)
    frac = jnp.where(n_usable > 0, jnp.sum(fit.inliers & usable, -1)
                     / jnp.maximum(n_usable, 1), 0.0)
    return fit, frac, usable


def _chunk_positions(flows: Array, queries: Array | None) -> Array:
    """float[H P N 2]: each chunk's query points."""
    if queries is None:
        return jnp.moveaxis(flows[:, :, 0], 1, 0)
    return jnp.broadcast_to(queries, (flows.shape[1], *queries.shape))


def _lift(depth: Array, pixels: Array, K: Array) -> tuple[Array, Array]:
    """Camera points [P M 3] (zeros without depth) and validity [P M] of pixels [P M 2]."""
    z, ok = jax.vmap(camera.depth_lookup)(depth, pixels)
    ok = ok & jnp.all(jnp.isfinite(pixels), -1)
    X = camera.unproject(jnp.where(ok[..., None], pixels, 0.0), z, K)
    return jnp.where(ok[..., None], X, 0.0), ok


def _mean_point(X: Array, valid: Array) -> Array:
    """float[P 3]: mean of the valid points X [P M 3] (zeros where none are)."""
    count = jnp.maximum(jnp.sum(valid, -1, keepdims=True), 1)
    return jnp.sum(jnp.where(valid[..., None], X, 0.0), 1) / count


def _medoid(pixels: Array, X: Array, valid: Array) -> tuple[Array, Array, Array]:
    """Contact from given points: the valid point with the least summed pixel distance."""
    dist = jnp.linalg.norm(pixels[:, :, None] - pixels[:, None], axis=-1)
    total = jnp.sum(jnp.where(valid[:, None, :], dist, 0.0), -1)
    idx = jnp.argmin(jnp.where(valid, total, jnp.inf), -1)
    take = lambda a: jnp.take_along_axis(a, idx[:, None, None], 1)[:, 0]
    ok = jnp.any(valid, -1)
    return jnp.where(ok[:, None], take(X), 0.0), take(pixels), ok


def _stack_frames(per_chunk: Array, first: Array) -> Array:
    """[H P L ...] chunk steps -> [P T ...] plan frames (step 0 of chunk h+1 is the last
    step of chunk h, so it is dropped; ``first`` [P ...] is frame 0)."""
    rest = jnp.moveaxis(per_chunk[:, :, 1:], 0, 1)
    rest = rest.reshape(rest.shape[0], -1, *rest.shape[3:])
    return jnp.concatenate([first[:, None], rest], 1)


def _keyframes(t: int, stride: int) -> np.ndarray:
    return np.unique(np.append(np.arange(0, t, stride), t - 1))


def _outputs(chunks: _ChunkOut) -> dict[str, Array]:
    p = chunks.transforms.shape[1]
    eye = se3.identity((p,), chunks.transforms.dtype)
    return dict(transforms=_stack_frames(chunks.transforms, eye),
                tracks=jnp.moveaxis(chunks.tracks, 0, 1),
                visible=jnp.moveaxis(chunks.visible, 0, 1),
                inlier_fraction=jnp.moveaxis(chunks.inlier_fraction, 0, 1),
                degenerate=jnp.moveaxis(chunks.degenerate, 0, 1))


# The object's samples, the chunk fits and the manipulation plan are separate programs so that
# the fits (by far the longest to compile) are shared by masks and points, with and without
# extrinsics.


@functools.partial(jax.jit, static_argnames=("num_samples",))
def _object_from_mask(object_mask, depth, K, key, *, num_samples):
    p = object_mask.shape[0]
    k_obj, k_contact = jax.random.split(key)
    sample = functools.partial(subgoals.sample_mask, num_samples=num_samples)
    pixels, mask_ok = jax.vmap(sample)(object_mask, jax.random.split(k_obj, p))
    X0, valid0 = _lift(depth, pixels, K)
    contact = jax.vmap(subgoals.contact_point)(object_mask, depth, K,
                                               jax.random.split(k_contact, p))
    valid0 = valid0 & mask_ok[:, None]
    return X0, valid0, contact, object_mask, _mean_point(X0, valid0)


@functools.partial(jax.jit, static_argnames=("image_size",))
def _object_from_points(points, depth, K, *, image_size):
    X0, valid0 = _lift(depth, points, K)
    support = jax.vmap(functools.partial(warp.points_support, image_size=image_size))(
        points, valid0)
    return X0, valid0, _medoid(points, X0, valid0), support, _mean_point(X0, valid0)


@functools.partial(jax.jit, static_argnames=("image_size", "fit_config", "neighbors",
                                             "consistency_px"))
def _track_object(flows, positions, depth, support, centre, K, key, *, image_size,
                  fit_config, neighbors, consistency_px):
    """Chains the chunks' fits of the object on support [P Hi Wi] (its mean point centre
    [P 3] at frame 0); positions [H P N 2]."""
    centre_px = camera.project(centre, K)[0]
    check = functools.partial(neighbourhood.consistent, k=neighbors, threshold=consistency_px)

    def chunk(T_start, inp):
        trk, pos, k = inp
        guess = camera.project(se3.apply(T_start, centre[:, None])[:, 0], K)[0] - centre_px
        u0, X, ok = jax.vmap(warp.warp_to_frame0)(pos, T_start, depth, K, guess)
        on = jax.vmap(lambda s, u: s[warp.nearest_pixel(u, image_size)])(support, u0)
        use = ok & on
        use = use & jax.vmap(check)(pos, trk, use)
        q_tracks = pos[:, None] + (trk - trk[:, :1])
        fit, frac, usable = _fit_chunk(X, q_tracks, use, K, k, image_size, fit_config)
        cum = se3.matmul(fit.transforms, T_start[:, None])
        return cum[:, -1], _ChunkOut(cum, q_tracks, usable, frac, fit.degenerate)

    hz = flows.shape[1]
    xs = (jnp.moveaxis(flows, 1, 0), positions, jax.random.split(key, hz))
    _, chunks = jax.lax.scan(chunk, se3.identity((centre.shape[0],), centre.dtype), xs)
    return _outputs(chunks)


@functools.partial(jax.jit, static_argnames=("manipulation_config", "stride"))
def _manipulation_plan(contact, transforms, extrinsics, *, manipulation_config, stride):
    goals = jax.vmap(subgoals.subgoals)(contact, transforms)
    if extrinsics is None:
        return dict(subgoals=goals)
    goals_w = jax.vmap(subgoals.to_world)(goals, extrinsics)
    contact_w = jax.vmap(subgoals.to_world)(contact, extrinsics)
    keys = goals_w[:, _keyframes(goals_w.shape[1], stride)]
    plan = jax.vmap(functools.partial(subgoals.plan_manipulation,
                                      config=manipulation_config))(contact_w, keys)
    return dict(subgoals=goals, subgoals_world=goals_w, is_grasp=plan.is_grasp,
                pre_contact=plan.pre_contact, waypoints=plan.waypoints)


@functools.partial(jax.jit, static_argnames=("image_size", "fit_config", "neighbors",
                                             "consistency_px"))
def _navigation(flows, queries, depth, K, key, *, image_size, fit_config, neighbors,
                consistency_px):
    p, hz = flows.shape[:2]
    positions = _chunk_positions(flows, queries)  # H P N 2
    X0, valid0 = _lift(depth, positions[0], K)
    check = functools.partial(neighbourhood.consistent, k=neighbors, threshold=consistency_px)
    blend = functools.partial(neighbourhood.interpolate_idw, k=neighbors)

    def chunk(carry, inp):
        C, X, has_depth = carry
        trk, pos, pos_next, k = inp
        everyone = jnp.ones(has_depth.shape, bool)
        use = has_depth & jax.vmap(check)(pos, trk, everyone)
        q_tracks = pos[:, None] + (trk - trk[:, :1])
        fit, frac, usable = _fit_chunk(X, q_tracks, use, K, k, image_size, fit_config)
        poses = se3.matmul(C[:, None], fit.transforms)
        # The scene points, moved into the next chunk's camera, lend its queries their depth.
        Xn = se3.apply(se3.inverse(fit.transforms[:, -1]), X)
        px, front = camera.project(Xn, K)
        seen = has_depth & front & camera.in_image(px, image_size)
        inv_z = 1.0 / jnp.where(seen, Xn[..., 2], 1.0)
        iz, ok = jax.vmap(blend)(px, inv_z[..., None], seen, pos_next)
        ok = ok & (iz[..., 0] > 0)
        X_next = camera.unproject(pos_next, 1.0 / jnp.where(ok, iz[..., 0], 1.0), K)
        X_next = jnp.where(ok[..., None], X_next, 0.0)
        return (poses[:, -1], X_next, ok), _ChunkOut(poses, q_tracks, usable, frac,
                                                     fit.degenerate)

    # The last chunk's "next" positions are a placeholder: nothing follows it.
    xs = (jnp.moveaxis(flows, 1, 0), positions, jnp.concatenate([positions[1:], positions[:1]]),
          jax.random.split(key, hz))
    _, chunks = jax.lax.scan(chunk, (se3.identity((p,), X0.dtype), X0, valid0), xs)
    out = _outputs(chunks)
    codes = jax.vmap(nav.navigation_actions)(out["transforms"])
    return PlanActions(**out, points3d=X0, points_valid=valid0, actions=codes)


# ------------------------------------------------------------------------------------------
# Public entry point
# ------------------------------------------------------------------------------------------


def _per_problem(x: ArrayLike, name: str, pattern: str, p: int, dims: shapes.Dims) -> Array:
    """Checks a per-problem-or-shared argument ([pattern] or [P pattern]); returns [P ...]."""
    x = jnp.asarray(shapes.as_array(x, name))
    if x.ndim == len(pattern.split()):
        shapes.check(x, name, pattern, dims, dtype="float")
        return jnp.broadcast_to(x, (p, *x.shape))
    try:
        shapes.check(x, name, f"P {pattern}", dims, dtype="float")
    except ValueError as e:
        raise ValueError(f"{e}; {name} must be [{pattern}] or [P {pattern}]") from None
    return x


def plan_to_actions(
    plan: Plan,
    depth: ArrayLike,
    K: ArrayLike,
    *,
    object_mask: ArrayLike | None = None,
    points: ArrayLike | None = None,
    extrinsics: ArrayLike | None = None,
    queries: ArrayLike | None = None,
    mode: str = "manipulation",
    key: PRNGKey | None = None,
    fit_config: FitConfig = FitConfig(),
    manipulation_config: ManipulationConfig = ManipulationConfig(),
    num_samples: int = 200,
    neighbors: int = 8,
    consistency_px: float = 2.0,
    waypoint_stride: int | None = None,
) -> PlanActions:
    """Turns the chosen beam (``plan.best``) of each problem into rigid motion and actions.

    Jittable (the settings are static); the chunks are a ``lax.scan``, the problems batched.

    Args:
      plan: a :class:`Plan` with flows float[P B H L N 2] and best int[P]; only those two
        fields are read.
      depth: float[P Hi Wi] z-depth (metres) of frame 0 (the current frame when planning);
        0 or non-finite means missing. Its size is the image size of the tracks.
      K: float[3 3] or float[P 3 3] intrinsics.
      object_mask: bool[P Hi Wi] the object at frame 0 (manipulation); the contact point is
        AVDC's (``geometry.subgoals.contact_point``, drawn with ``key``).
      points: float[P M 2] object pixels at frame 0 instead of a mask (manipulation), covering
        it with gaps of at most one pixel (they are closed into its region); the contact point
        is their medoid. Exactly one of ``object_mask`` and ``points``.
      extrinsics: float[4 4] or float[P 4 4] world_from_camera (manipulation). Without it the
        world-frame fields (``subgoals_world``, ``is_grasp``, ``pre_contact``, ``waypoints``)
        are None.
      queries: float[N 2] or float[P N 2] the query points used for planning. None: step 0 of
        each chunk's tracks, which is where the action module starts them.
      mode: "manipulation" (object motion, subgoals) or "navigation" (camera motion from all
        query tracks, discrete actions; no mask, points or extrinsics).
      key: PRNG key of the mask samples and the fits' hypotheses; default ``PRNGKey(0)``.
      fit_config: the robust fit's settings; navigation forces ``camera_motion=True``,
        manipulation needs it False.
      manipulation_config: AVDC's grasp/push constants.
      num_samples: M, pixels drawn from ``object_mask`` (``points3d``; their mean starts the
        warp back to frame 0).
      neighbors: queries in the consistency check's local fit (fewer than 5 disables it) and,
        in navigation, points blended into a query's depth (1 <= neighbors <= N).
      consistency_px: a query whose displacement (norm over the chunk's steps) misses the
        robust affine fit of its neighbours' by this many pixels or more is not fitted.
      waypoint_stride: the grasp test and waypoints use the subgoals every this many frames
        (and the last). None: L - 1, one per planning step, AVDC's subgoal granularity (its
        10 cm lift threshold is per subgoal step, and a plan's frames are much closer).

    Returns:
      :class:`PlanActions` (T = H * (L - 1) + 1 frames).

    Raises:
      ValueError: naming the argument and the shape it got, or a bad setting.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    flows = jnp.asarray(shapes.as_array(getattr(plan, "flows", None), "plan.flows"))
    best = jnp.asarray(shapes.as_array(getattr(plan, "best", None), "plan.best"))
    dims = shapes.check(flows, "plan.flows", "P B H L N 2", dtype="float")
    shapes.check(best, "plan.best", "P", dims, dtype="int")
    if dims["L"] < 2:
        raise ValueError(f"plan.flows of shape {list(flows.shape)} needs L >= 2 steps")
    try:
        b = np.asarray(best)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        b = None  # traced under an outer jit: the range cannot be checked here
    if b is not None and np.any((b < 0) | (b >= dims["B"])):
        raise ValueError(f"plan.best must index the B={dims['B']} beams, got {b.tolist()}")
    p = dims["P"]
    depth = jnp.asarray(shapes.as_array(depth, "depth"))
    dims = shapes.check(depth, "depth", "P Hi Wi", dims, dtype="float")
    image_size = (dims["Hi"], dims["Wi"])
    K = _per_problem(K, "K", "3 3", p, dims)
    if queries is not None:
        queries = _per_problem(queries, "queries", "N 2", p, dims)
    for name, value, cls in (("fit_config", fit_config, FitConfig),
                             ("manipulation_config", manipulation_config, ManipulationConfig)):
        if not isinstance(value, cls):
            raise ValueError(f"{name}: expected a {cls.__name__}, got {type(value).__name__}")
    if not 1 <= neighbors <= dims["N"]:
        raise ValueError(f"neighbors must lie in [1, N={dims['N']}] (plan.flows of shape "
                         f"{list(flows.shape)}), got {neighbors}")
    if not consistency_px > 0:
        raise ValueError(f"consistency_px must be positive, got {consistency_px}")
    key = jax.random.PRNGKey(0) if key is None else key
    # The chosen beam only: the other beams never enter the computation.
    flows = flows[jnp.arange(p), best]  # P H L N 2
    if mode == "navigation":
        for name, arg in (("object_mask", object_mask), ("points", points),
                          ("extrinsics", extrinsics)):
            if arg is not None:
                raise ValueError(f"{name} is not used by mode='navigation' (the camera's motion "
                                 "is fitted from all query tracks); pass None")
        cfg = dataclasses.replace(fit_config, camera_motion=True)
        return _navigation(flows, queries, depth, K, key, image_size=image_size,
                           fit_config=cfg, neighbors=neighbors,
                           consistency_px=float(consistency_px))
    if fit_config.camera_motion:
        raise ValueError("fit_config.camera_motion=True fits a moving camera; use "
                         "mode='navigation' or camera_motion=False for manipulation")
    if (object_mask is None) == (points is None):
        raise ValueError("mode='manipulation' needs exactly one of object_mask (bool[P Hi Wi]) "
                         "and points (float[P M 2]), got "
                         + ("both" if object_mask is not None else "neither"))
    if object_mask is not None:
        object_mask = jnp.asarray(shapes.as_array(object_mask, "object_mask"))
        shapes.check(object_mask, "object_mask", "P Hi Wi", dims, dtype="bool")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    else:
        points = jnp.asarray(shapes.as_array(points, "points"))
        shapes.check(points, "points", "P M 2", dims, dtype="float")
    if extrinsics is not None:
        extrinsics = _per_problem(extrinsics, "extrinsics", "4 4", p, dims)
    stride = dims["L"] - 1 if waypoint_stride is None else int(waypoint_stride)
    if stride < 1:
        raise ValueError(f"waypoint_stride must be >= 1, got {waypoint_stride}")
    k_obj, k_fit = jax.random.split(key)
    if object_mask is not None:
        X0, valid0, contact, support, centre = _object_from_mask(
            object_mask, depth, K, k_obj, num_samples=num_samples)
    else:
        X0, valid0, contact, support, centre = _object_from_points(
            points, depth, K, image_size=image_size)
    out = _track_object(flows, _chunk_positions(flows, queries), depth, support, centre, K,
                        k_fit, image_size=image_size, fit_config=fit_config,
                        neighbors=neighbors, consistency_px=float(consistency_px))
    out.update(_manipulation_plan(contact[0], out["transforms"], extrinsics,
                                  manipulation_config=manipulation_config, stride=stride))
    return PlanActions(**out, points3d=X0, points_valid=valid0, contact=contact[0],
                       contact_pixel=contact[1], contact_valid=contact[2])
