"""Planners for the Meta-World evaluation: current frame -> :class:`MotionPlan`.

Every planner sees what a robot would: the current RGB frame, its depth, the camera's K and
extrinsics, and the target object's mask (from the simulator's segmentation, as AVDC's
evaluation takes it). They differ in where the object's future motion comes from and how it is
turned into a rigid motion:

* ``oracle``: the future comes from the simulator itself. A twin of the scene is put in the
  current state and the scripted expert finishes the task in it; the object points seen now are
  moved with the object body's recorded poses and projected, giving exact tracks at
  ``frames`` evenly spaced instants (AVDC's video model predicts 8 frames). flipjax's robust
  fit (``geometry.fit_rigid_sequence``) and AVDC's grasp/push rules
  (``geometry.plan_manipulation``) make the plan. This measures geometry + controller: an
  upper bound for any video or flow model.
* ``avdc``: the same oracle tracks, fitted the way AVDC's released code does it
  (``flipjax.geometry.avdc_reference``: 2-D similarity RANSAC at 0.5 px, chained per-frame BFGS
  fits) and AVDC's own grasp test (vertical steps over ``subgoals[1:-2]`` only).
* ``model``: a flipjax world model plans flows and video from the current frame and the
  instruction (``planning.hill_climb``); ``planning.plan_to_actions`` fits the chosen beam.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np

from data_pipelines.metaworld import sim as ms
from experiments.metaworld.policy import MotionPlan, PlanUnavailable


@dataclasses.dataclass
class Scene:
    """An episode's simulator handles, shared by the planner and the evaluation loop.

    Attributes:
      task, camera, seed: what is evaluated.
      env: the environment being controlled.
      renderer: a :class:`data_pipelines.metaworld.sim.Renderer` at the planner's frame size.
      twin: a second environment of the same task and seed (oracle planners only).
    """

    task: str
    camera: str
    seed: int
    env: Any
    renderer: Any
    twin: Any = None

    def observe(self) -> dict[str, Any]:
        """Renders the current frame: image, depth, object mask, K and extrinsics."""
        out = self.renderer.render(self.env.data, self.camera)
        view = self.renderer.view(self.env.data, self.camera)
        out["mask"] = np.isin(out["geoms"], ms.target_geoms(self.env.model, self.task))
        out["K"], out["world_from_camera"] = view.K, view.world_from_camera
        return out


def sample_object_points(mask: np.ndarray, depth: np.ndarray, K: np.ndarray,
                         rng: np.random.Generator, num: int = 500, *,
                         object_depth_only: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """AVDC's object samples: ``num`` mask pixels (with replacement, jittered within the pixel)
    lifted to the camera frame with bilinear depth.

    With ``object_depth_only`` (flipjax; False is AVDC's code) the depth is interpolated over
    the object's own pixels only (the weights of the neighbours outside the mask are dropped):
    at the silhouette AVDC's interpolation mixes in the background and lifts points into empty
    space.

    Args:
      mask: bool[H W]; depth: float[H W] metres; K: float[3 3]; rng: generator; num: N;
      object_depth_only: see above.

    Returns:
      (pixels float32[N 2], points float32[N 3] camera frame).

    Raises:
      PlanUnavailable: the mask is empty (the object is not in view).
    """
    v, u = np.nonzero(mask)
    if len(u) == 0:
        raise PlanUnavailable("the target object's mask is empty: the object is not in view")
    pick = rng.integers(0, len(u), num)
    uv = np.stack([u[pick], v[pick]], -1) + rng.uniform(-0.5, 0.5, (num, 2))
    h, w = depth.shape
    x0 = np.clip(np.floor(uv[:, 0]).astype(int), 0, w - 2)
    y0 = np.clip(np.floor(uv[:, 1]).astype(int), 0, h - 2)
    fx, fy = np.clip(uv[:, 0] - x0, 0, 1), np.clip(uv[:, 1] - y0, 0, 1)
    num_z, den = np.zeros(num), np.zeros(num)
    for dx, dy, wt in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                       (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        # The sampled pixel is always one of the four corners, so den > 0.
        if object_depth_only:
            wt = wt * mask[y0 + dy, x0 + dx]
        num_z += wt * depth[y0 + dy, x0 + dx]
        den += wt
    z = num_z / np.maximum(den, 1e-12)
    xyz = np.stack([(uv[:, 0] - K[0, 2]) * z / K[0, 0], (uv[:, 1] - K[1, 2]) * z / K[1, 1], z], -1)
    return uv.astype(np.float32), xyz.astype(np.float32)


def expert_body_poses(scene: Scene, *, extra_steps: int = 10, max_steps: int = 300
                      ) -> np.ndarray:
    """float64[S 4 4] world_from_body of the target body while the expert finishes the task in
    the twin (from the current state; ``extra_steps`` past its first success, at most
    ``max_steps``; index 0 is now)."""
    env, twin = scene.env, scene.twin
    ms.set_state(twin, ms.get_state(env))
    twin.curr_path_length = 0  # the twin's own step budget
    if hasattr(env, "_prev_obs"):
        twin._prev_obs = np.copy(env._prev_obs)
    policy = ms.expert(scene.task)
    body = ms.target_body(env.model, scene.task)
    obs = np.copy(env.last_obs)
    poses = [ms.body_poses(twin.data)[body]]
    done_at = None
    for t in range(max_steps):
        with warnings.catch_warnings():
            # The experts' gains exceed the action range on purpose; the env clips.
            warnings.filterwarnings("ignore", message="Constant", category=UserWarning)
            action = policy.get_action(obs)
        obs, _, _, truncated, info = twin.step(action)
        poses.append(ms.body_poses(twin.data)[body])
        if done_at is None and info["success"]:
            done_at = t
        if (done_at is not None and t - done_at >= extra_steps) or truncated:
            break
    return np.stack(poses)


def oracle_tracks(scene: Scene, obs: dict[str, Any], points: np.ndarray, frames: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Exact tracks of camera-frame ``points`` (float[N 3], on the target body) at ``frames``
    instants of the expert's continuation; returns (tracks float32[T N 2], visible
    bool[T N]) with T = ``frames``. Visible means in front of the camera (no occlusion test:
    a perfect flow model sees through occluders as AVDC's flow does not need to)."""
    poses = expert_body_poses(scene)
    idx = np.unique(np.linspace(0, len(poses) - 1, frames).round().astype(int))
    idx = np.concatenate([idx, np.full(frames - len(idx), idx[-1])])
    cam_from_world = np.linalg.inv(obs["world_from_camera"])
    moves = cam_from_world @ poses[idx] @ np.linalg.inv(poses[0]) @ obs["world_from_camera"]
    X = points.astype(np.float64) @ moves[:, :3, :3].transpose(0, 2, 1) + moves[:, None, :3, 3]
    z = X[..., 2]
    uv = X @ obs["K"].astype(np.float64).T
    uv = uv[..., :2] / np.where(z > 1e-6, z, 1.0)[..., None]
    return uv.astype(np.float32), z > 1e-6


def oracle_fit_config() -> Any:
    """The :class:`geometry.FitConfig` of the oracle planner: 30 refinement iterations.

    AVDC's 8 frames span the whole task, so consecutive frames can differ by tens of degrees,
    and the default 8 Levenberg-Marquardt iterations stop short of the optimum on small,
    distant, thin objects (a faucet handle at 1.6 m: 0.7 px residual but 1 m of translation
    error), where 30 reach it (0 px, the exact motion). One plan's fit stays milliseconds.
    """
    from flipjax import geometry

    return geometry.FitConfig(num_iterations=30)


def _avdc_is_grasp(subgoals_world: np.ndarray) -> bool:
    """AVDC's code: grasp when a vertical step between ``subgoals[1:-2]`` exceeds 10 cm."""
    z = subgoals_world[:, 2]
    steps = np.abs(z[1:-2] - z[2:-1])
    return bool(steps.size and steps.max() > 0.1)


def fitted_plan(obs: dict[str, Any], points: np.ndarray, tracks: np.ndarray,
                visible: np.ndarray, *, method: str, key_seed: int) -> MotionPlan:
    """Rigid motion of the tracks -> subgoals of the contact point -> :class:`MotionPlan`.

    Args:
      obs: :meth:`Scene.observe` output of the current frame.
      points: float[N 3] the tracked object samples at frame 0 (camera frame).
      tracks, visible: float[T N 2] / bool[T N].
      method: "flipjax" (robust direct fit) or "avdc" (AVDC's chained fit and grasp test).
      key_seed: seed of the fit's hypotheses and the contact-point samples.
    """
    import jax

    from flipjax import geometry
    from flipjax.geometry import subgoals as sg

    K = np.asarray(obs["K"], np.float32)
    key = jax.random.PRNGKey(key_seed)
    contact_cam, _, ok = sg.contact_point(obs["mask"], obs["depth"], K, key)
    if not bool(ok):
        raise PlanUnavailable("no contact point: the object's mask has no valid depth")
    if method == "flipjax":
        fit = geometry.fit_rigid_sequence(points[None], tracks[None], K, visible=visible[None],
                                          key=key, image_size=obs["depth"].shape,
                                          config=oracle_fit_config())
        transforms = np.asarray(fit.transforms[0], np.float64)
        info = {"inlier_fraction": float(np.mean(fit.inliers[0, 1:])),
                "degenerate_frames": int(np.sum(fit.degenerate[0, 1:]))}
    elif method == "avdc":
        from flipjax.geometry import avdc_reference

        transforms = avdc_reference.fit_sequence(points, tracks, K, visible, seed=key_seed)
        info = {}
    else:
        raise ValueError(f"method must be 'flipjax' or 'avdc', got {method!r}")
    world = obs["world_from_camera"]
    sub_cam = transforms[:, :3, :3] @ np.asarray(contact_cam, np.float64) + transforms[:, :3, 3]
    sub_world = sub_cam @ world[:3, :3].T + world[:3, 3]
    contact_world = sub_world[0]
    config = sg.ManipulationConfig()
    if method == "avdc":
        # Force AVDC's own grasp decision through the same offsets (threshold -1: always grasp).
        config = dataclasses.replace(config, grasp_lift_threshold=-1.0
                                     if _avdc_is_grasp(sub_world) else np.inf)
    plan = sg.plan_manipulation(contact_world.astype(np.float32),
                                      sub_world.astype(np.float32), config)
    waypoints = np.asarray(plan.waypoints, np.float64)
    pre = np.asarray(plan.pre_contact, np.float64)
    is_grasp = bool(plan.is_grasp)
    info["object_motion_m"] = float(np.linalg.norm(sub_world[-1] - sub_world[0]))
    return MotionPlan(contact_world, pre, waypoints, is_grasp, info)


def oracle_planner(scene: Scene, *, method: str = "flipjax", frames: int = 8,
                   num_points: int = 500) -> Any:
    """``planner() -> MotionPlan`` for modes ``oracle`` (method "flipjax") and ``avdc``."""
    counter = [0]

    def plan() -> MotionPlan:
        counter[0] += 1
        obs = scene.observe()
        rng = np.random.default_rng([scene.seed, counter[0]])
        _, points = sample_object_points(obs["mask"], obs["depth"], obs["K"], rng, num_points,
                                         object_depth_only=method == "flipjax")
        tracks, visible = oracle_tracks(scene, obs, points, frames)
        return fitted_plan(obs, points, tracks, visible, method=method,
                           key_seed=int(rng.integers(2**31)))

    return plan
