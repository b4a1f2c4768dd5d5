"""One scripted-expert rollout of Meta-World rendered with exact geometry (extra ``sim``).

:func:`render_demo` renders every requested camera at every step: RGB, z-depth, body
segmentation, the target's mask, camera_from_body poses, and the exact tracks of points sampled
at step 0 on the target object and on the gripper. ``data_pipelines.metaworld`` caches rollouts
and writes them as RLDS. Cameras and frames: ``data_pipelines/metaworld/sim.py``.

Rendering refuses to run where TensorFlow is loaded: with Mesa's offscreen OpenGL (the CPU
renderer) their two LLVM copies crash the process (``data_pipelines/metaworld/dataset.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from data_pipelines.metaworld import sim

# A point is visible where the rendered depth agrees with its own within this (metres) plus
# the relative term times its depth: the rounded pixel samples a slanted surface up to half a
# pixel away (as data_pipelines.tracks.ground_truth).
DEPTH_TOLERANCE = 0.02
DEPTH_REL_TOLERANCE = 0.01
MIN_DEPTH = 1e-3

# Per-step arrays of an episode, and its per-episode values.
STEP_KEYS = ("image", "depth", "segmentation", "object_mask", "object_poses", "state", "action",
             "reward", "object_tracks", "object_visible", "gripper_tracks", "gripper_visible")
META_KEYS = ("task", "camera", "seed", "instruction", "intrinsics", "world_from_camera",
             "target_body", "success", "num_steps", "object_point_bodies",
             "gripper_point_bodies")


def library_loaded(library: str) -> bool:
    """Whether a shared library whose file name contains ``library`` is loaded (Linux)."""
    try:
        with open("/proc/self/maps") as f:
            return any(library in line for line in f)
    except OSError:  # no procfs: cannot tell, let the caller go on
        return False


# --------------------------------------------------------------------------------------------
# Points and their tracks
# --------------------------------------------------------------------------------------------


def body_point_tracks(points: np.ndarray, bodies: np.ndarray, object_poses: np.ndarray,
                      depth: np.ndarray, K: np.ndarray, *,
                      depth_tolerance: float = DEPTH_TOLERANCE,
                      depth_rel_tolerance: float = DEPTH_REL_TOLERANCE
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Projections of points rigidly attached to bodies, and their visibility, at every step.

    Args:
      points: float[N 3] each point in its body's frame.
      bodies: int[N] body of each point (index into ``object_poses``); -1 marks padding.
      object_poses: float[T B 4 4] camera_from_body per step.
      depth: float[T H W] rendered z-depth per step.
      K: float[3 3] intrinsics.
      depth_tolerance, depth_rel_tolerance: occlusion test, ``|depth - z| <= tol + rel * z``
        at the rounded pixel.

    Returns:
      tracks float32[T N 2] (u, v), NaN for padding; visible bool[T N]: in front of the
      camera, inside the image and not occluded (always False for padding).
    """
    points, bodies = np.asarray(points, np.float64), np.asarray(bodies)
    poses, depth = np.asarray(object_poses, np.float64), np.asarray(depth)
    if points.ndim != 2 or points.shape[1] != 3 or bodies.shape != points.shape[:1]:
        raise ValueError(f"points: expected float[N 3] with bodies int[N], got shapes "
                         f"{list(points.shape)} and {list(bodies.shape)}")
    if poses.ndim != 4 or poses.shape[2:] != (4, 4) or depth.ndim != 3 \
            or depth.shape[0] != poses.shape[0]:
        raise ValueError(f"object_poses: expected float[T B 4 4] with depth float[T H W], got "
                         f"shapes {list(poses.shape)} and {list(depth.shape)}")
    if bodies.size and bodies.max() >= poses.shape[1]:
        raise ValueError(f"bodies: id {bodies.max()} >= {poses.shape[1]} poses")
    t_len, height, width = depth.shape
    valid = bodies >= 0
    b = np.where(valid, bodies, 0)
    pose = poses[:, b]  # [T N 4 4]
    cam = np.einsum("tnij,nj->tni", pose[..., :3, :3], points) + pose[..., :3, 3]  # [T N 3]
    z = cam[..., 2]
    in_front = z > MIN_DEPTH
    uv = (cam @ np.asarray(K, np.float64)[:2].T) / np.where(in_front, z, 1.0)[..., None]
    col, row = np.round(uv[..., 0]), np.round(uv[..., 1])
    inside = in_front & (col >= 0) & (col < width) & (row >= 0) & (row < height)
    seen = depth[np.arange(t_len)[:, None], np.clip(row, 0, height - 1).astype(int),
                 np.clip(col, 0, width - 1).astype(int)].astype(np.float64)
    visible = valid & inside & (np.abs(seen - z) <= depth_tolerance + depth_rel_tolerance * z)
    tracks = np.where(valid[None, :, None], uv, np.nan).astype(np.float32)
    return tracks, visible


def _sample_points(eligible: np.ndarray, count: int, rng: np.random.Generator, depth: np.ndarray,
                   segmentation: np.ndarray, poses: np.ndarray, K: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``count`` distinct pixels of ``eligible`` lifted into their bodies' frames, padded with
    body -1 where the mask has fewer pixels: (float64[N 3] points, int32[N] bodies)."""
    rows, cols = np.nonzero(eligible & np.isfinite(depth) & (depth > MIN_DEPTH))
    pick = np.sort(rng.choice(len(rows), size=min(count, len(rows)), replace=False))
    uv = np.stack([cols[pick], rows[pick]], -1)
    bodies = np.full(count, -1, np.int32)
    bodies[:len(pick)] = segmentation[rows[pick], cols[pick]]
    points = np.zeros((count, 3))
    cam = (np.concatenate([uv, np.ones((len(uv), 1))], -1) @ np.linalg.inv(K).T
           * depth[uv[:, 1], uv[:, 0], None].astype(np.float64))
    body_from_camera = np.linalg.inv(poses[bodies[:len(pick)]].astype(np.float64))
    points[:len(pick)] = np.einsum("nij,nj->ni", body_from_camera[:, :3, :3], cam) \
        + body_from_camera[:, :3, 3]
    return points, bodies


# --------------------------------------------------------------------------------------------
# One expert rollout
# --------------------------------------------------------------------------------------------


def check_options(cameras: Sequence[str], image_size: int, supersample: int, max_steps: int,
                   extra_steps: int, num_points: int) -> tuple[str, ...]:
    """Validates :func:`render_demo`'s options (ValueError naming the bad one); returns the
    cameras as a tuple."""
    cameras = tuple(sim.check_camera(c) for c in cameras)
    if not cameras or len(set(cameras)) != len(cameras):
        raise ValueError(f"cameras: expected distinct camera names, got {list(cameras)}")
    for name, value, low in (("image_size", image_size, 8), ("supersample", supersample, 1),
                             ("max_steps", max_steps, 1), ("extra_steps", extra_steps, 0),
                             ("num_points", num_points, 0)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if max_steps > sim.MAX_STEPS:
        raise ValueError(f"max_steps must be <= {sim.MAX_STEPS} (Meta-World truncates), got "
                         f"{max_steps}")
    return cameras


def render_demo(task: str, seed: int, cameras: Sequence[str], *, image_size: int = 128,
                supersample: int = 1, max_steps: int = 500, extra_steps: int = 10,
                num_points: int = 64) -> dict[str, dict[str, Any]]:
    """Renders one scripted-expert rollout of ``task`` from every camera.

    The rollout starts at ``make_env(task, seed)`` and ends ``extra_steps`` actions after the
    first step that reports success (as AVDC collects its demos) or after ``max_steps``
    actions. Every observation is rendered, the first included, so an episode of A actions has
    T = A + 1 steps.

    Args:
      task: one of ``data_pipelines.metaworld.sim.TASKS``.
      seed: environment seed; also seeds the choice of tracked points.
      cameras: names from ``data_pipelines.metaworld.sim.CAMERAS``.
      image_size: stored frames are ``image_size`` x ``image_size``.
      supersample: RGB rendered this many times larger and box-averaged.
      max_steps: at most this many actions (<= 500, Meta-World's truncation).
      extra_steps: actions taken after the first success.
      num_points: N points tracked on the target object and N on the gripper; sampled at
        step 0 among that part's pixels (fewer where fewer pixels show it: the rest is padding
        with body -1, NaN tracks, never visible).

    Returns:
      camera -> episode: per step ``image`` uint8[T H W 3], ``depth`` float32[T H W],
      ``segmentation`` uint8[T H W] body ids, ``object_mask`` bool[T H W], ``object_poses``
      float32[T B 4 4] camera_from_body, ``state`` float32[T 39] observation, ``action``
      float32[T 4] taken at the step (zeros at the last), ``reward`` float32[T] received for
      it, ``object_tracks``/``gripper_tracks`` float32[T N 2], ``object_visible``/
      ``gripper_visible`` bool[T N]; per episode ``task``, ``camera``, ``seed``,
      ``instruction``, ``intrinsics`` float32[3 3], ``world_from_camera`` float32[4 4],
      ``target_body``, ``success`` (any step reported it), ``num_steps`` (T),
      ``object_point_bodies``/``gripper_point_bodies`` int32[N].
    """
    sim.check_task(task)
    cameras = check_options(cameras, image_size, supersample, max_steps, extra_steps,
                             num_points)
    if library_loaded("libtensorflow_framework"):
        raise RuntimeError("render_demo: TensorFlow is loaded in this process, and offscreen "
                           "MuJoCo rendering with Mesa would segfault (their LLVM copies "
                           "clash); render in a separate process (build() does)")
    env = sim.make_env(task, seed)
    policy = sim.expert(task)
    model = env.model
    targets = sim.target_geoms(model, task)
    renderer = sim.Renderer(model, image_size, image_size, supersample)
    frames: dict[str, dict[str, list[np.ndarray]]] = {c: {} for c in cameras}
    try:
        views = {c: renderer.view(env.data, c) for c in cameras}
        obs = env.last_obs
        states, actions, rewards = [obs], [], []
        success_after: int | None = None  # actions taken when success was first reported
        while True:
            for c in cameras:
                out = renderer.render(env.data, c)
                step = {"image": out["image"], "depth": out["depth"],
                        "segmentation": sim.body_segmentation(model, out["geoms"]),
                        "object_mask": np.isin(out["geoms"], targets),
                        "object_poses": sim.camera_from_bodies(env.data,
                                                               views[c].world_from_camera)}
                for k, v in step.items():
                    frames[c].setdefault(k, []).append(v)
            n = len(actions)
            if n >= max_steps or (success_after is not None and n >= success_after + extra_steps):
                break
            with warnings.catch_warnings():
                # The experts' gains exceed the action range on purpose; the env clips.
                warnings.filterwarnings("ignore", message="Constant", category=UserWarning)
                action = np.clip(policy.get_action(obs), -1.0, 1.0)
            obs, reward, _, _, info = env.step(action)
            states.append(obs)
            actions.append(action)
            rewards.append(reward)
            if success_after is None and info["success"]:
                success_after = len(actions)
    finally:
        renderer.close()
        env.close()

    t_len = len(states)
    shared = {
        "state": np.asarray(states, np.float32),
        "action": np.concatenate([np.asarray(actions, np.float32).reshape(-1, 4),
                                  np.zeros((1, 4), np.float32)]),
        "reward": np.append(np.asarray(rewards, np.float32), np.float32(0)),
        "task": task, "seed": int(seed), "instruction": sim.INSTRUCTIONS[task],
        "target_body": sim.target_body(model, task), "success": success_after is not None,
        "num_steps": t_len,
    }
    grippers = sim.gripper_bodies(model)
    demo = {}
    for c in cameras:
        ep = {k: np.stack(v) for k, v in frames[c].items()}
        K = views[c].K
        ep.update(shared, camera=c, intrinsics=K.astype(np.float32),
                  world_from_camera=views[c].world_from_camera.astype(np.float32))
        for part, eligible in (("object", ep["object_mask"][0]),
                               ("gripper", np.isin(ep["segmentation"][0], grippers))):
            rng = np.random.default_rng([int(seed), sim.TASKS.index(task),
                                         sim.CAMERAS.index(c), part == "gripper"])
            points, bodies = _sample_points(eligible, num_points, rng, ep["depth"][0],
                                            ep["segmentation"][0], ep["object_poses"][0], K)
            tracks, visible = body_point_tracks(points, bodies, ep["object_poses"], ep["depth"],
                                                K)
            ep[f"{part}_tracks"], ep[f"{part}_visible"] = tracks, visible
            ep[f"{part}_point_bodies"] = bodies
        demo[c] = ep
    return demo
