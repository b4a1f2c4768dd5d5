"""Meta-World (MuJoCo) scenes for flipjax: tasks, cameras, rendering and the scripted experts.

Shared by the demo dataset builder (``data_pipelines/metaworld/dataset.py``) and the closed-loop
evaluation (``experiments/metaworld/evaluation.py``). Needs the ``sim`` extra (metaworld, mujoco).

Rendering is offscreen; set ``MUJOCO_GL`` to ``egl`` (Mesa llvmpipe works without a GPU) or
``osmesa`` before the first import of mujoco. We default it to ``egl``.

Cameras follow the docs/DESIGN.md conventions: K with pixel centres at integers, camera frame x
right, y down, z forward; ``world_from_camera`` maps camera to world coordinates. Meta-World's
``corner`` cameras are defined upside down (their image "up" points at the floor), so their raw
renders look vertically flipped. We roll such a camera by 180 degrees about its optical axis,
i.e. turn the frames by 180 degrees: a proper rotation, so K and the extrinsics stay an exact
pinhole model of the stored pixels (a mirror flip would not be).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")

# The 11 tasks of AVDC's Meta-World table.
TASKS = ("door-open", "door-close", "basketball", "shelf-place", "button-press",
         "button-press-topdown", "faucet-close", "faucet-open", "handle-press", "hammer",
         "assembly")
CAMERAS = ("corner", "corner2", "corner3")
MAX_STEPS = 500  # Meta-World's truncation

INSTRUCTIONS = {
    "door-open": "open the door",
    "door-close": "close the door",
    "basketball": "put the ball into the hoop",
    "shelf-place": "place the block on the shelf",
    "button-press": "press the button",
    "button-press-topdown": "press the button from the top",
    "faucet-close": "turn the faucet handle to close it",
    "faucet-open": "turn the faucet handle to open it",
    "handle-press": "press the handle down",
    "hammer": "hammer the nail into the wall",
    "assembly": "put the ring on the peg",
}

# The object the task moves: (body, geoms). The mask covers the named geoms of the body (all its
# geoms when None); the body's pose is the object's motion. As AVDC's masks, the contact point
# comes from the part the gripper should touch: the door handle, the hammer's and the wrench's
# handles.
TARGETS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "door-open": ("door_link", ("handle",)),
    "door-close": ("door_link", None),
    "basketball": ("basketball", None),
    "shelf-place": ("obj", None),
    "button-press": ("button", None),
    "button-press-topdown": ("button", None),
    "faucet-close": ("faucet_link2", None),
    "faucet-open": ("faucet_link2", None),
    "handle-press": ("handle_link", None),
    "hammer": ("hammer", ("HammerHandle",)),
    "assembly": ("asmbly_peg", ("WrenchHandle",)),
}
# Bodies whose points are "gripper" points (the hand and the two fingers).
GRIPPER_BODIES = ("hand", "rightclaw", "rightpad", "leftclaw", "leftpad")


def check_task(task: str) -> str:
    """Returns ``task`` or raises ValueError naming the supported tasks."""
    if task not in TASKS:
        raise ValueError(f"unknown Meta-World task {task!r}; supported: {list(TASKS)}")
    return task


def check_camera(camera: str) -> str:
    """Returns ``camera`` or raises ValueError naming the supported cameras."""
    if camera not in CAMERAS:
        raise ValueError(f"unknown camera {camera!r}; supported: {list(CAMERAS)}")
    return camera


def parse_range(text: str) -> list[int]:
    """``"0-4,7"`` -> ``[0, 1, 2, 3, 4, 7]`` (empty text -> ``[]``)."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, sep, hi = part.partition("-")
        try:
            values = range(int(lo), int(hi) + 1) if sep else [int(part)]
        except ValueError as e:
            raise ValueError(f"bad range {part!r} in {text!r}; expected e.g. '0-4,7'") from e
        if sep and int(hi) < int(lo):
            raise ValueError(f"empty range {part!r} in {text!r}")
        out.extend(values)
    return out


def make_env(task: str, seed: int, *, shadow_size: int = 256) -> Any:
    """A goal-observable Meta-World v3 environment of ``task``, reset with ``seed``.

    Args:
      task: one of :data:`TASKS`.
      seed: episode seed (object and goal placement).
      shadow_size: shadow map size; shadows dominate offscreen render time on a CPU, and small
        maps keep them visible at 128x128.

    Returns:
      The environment, already reset (``env.last_obs`` holds the first observation).
    """
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE

    check_task(task)
    env = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[f"{task}-v3-goal-observable"](seed=int(seed))
    obs, _ = env.reset()
    env.last_obs = obs
    env.model.vis.quality.shadowsize = int(shadow_size)
    env.model.vis.quality.offsamples = 0
    return env


def expert(task: str) -> Any:
    """Meta-World's scripted expert for ``task`` (``get_action(obs) -> float[4]``)."""
    from metaworld import policies

    name = "Sawyer" + "".join(p.capitalize() for p in check_task(task).split("-")) + "V3Policy"
    return getattr(policies, name)()


def body_id(model: Any, name: str) -> int:
    """MuJoCo id of body ``name`` (ValueError naming it when the scene has none)."""
    import mujoco

    i = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_BODY, name)
    if i < 0:
        raise ValueError(f"the scene has no body {name!r}")
    return int(i)


def target_geoms(model: Any, task: str) -> np.ndarray:
    """int[G] geom ids of the task's target-object mask (see :data:`TARGETS`)."""
    body, names = TARGETS[check_task(task)]
    b = body_id(model, body)
    ids = [g for g in range(model.ngeom) if model.geom_bodyid[g] == b
           and (names is None or model.geom(g).name in names)]
    if not ids:
        raise ValueError(f"task {task!r}: body {body!r} has no geoms named {names}")
    return np.asarray(ids, np.int32)


def target_body(model: Any, task: str) -> int:
    """MuJoCo id of the body that carries the task's target object."""
    return body_id(model, TARGETS[check_task(task)][0])


def gripper_bodies(model: Any) -> np.ndarray:
    """int[B] MuJoCo ids of :data:`GRIPPER_BODIES`."""
    return np.asarray([body_id(model, n) for n in GRIPPER_BODIES], np.int32)


def body_poses(data: Any) -> np.ndarray:
    """float64[nbody 4 4] world_from_body of every body at the current state."""
    n = data.xpos.shape[0]
    T = np.tile(np.eye(4), (n, 1, 1))
    T[:, :3, :3] = data.xmat.reshape(n, 3, 3)
    T[:, :3, 3] = data.xpos
    return T


@dataclasses.dataclass(frozen=True)
class View:
    """One camera's pinhole model at a resolution.

    Attributes:
      camera: camera name.
      K: float32[3 3] intrinsics (pixel centres at integers).
      world_from_camera: float64[4 4] camera pose (x right, y down, z forward).
      rolled: the raw render is turned by 180 degrees to give the stored frames.
    """

    camera: str
    K: np.ndarray
    world_from_camera: np.ndarray
    rolled: bool


def view(model: Any, data: Any, camera: str, height: int, width: int) -> View:
    """The pinhole model of ``camera`` for frames of ``height`` x ``width`` (see module doc)."""
    import mujoco

    cid = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
    if cid < 0:
        raise ValueError(f"the scene has no camera {camera!r}")
    f = 0.5 * height / np.tan(np.radians(model.cam_fovy[cid]) / 2)
    K = np.array([[f, 0, (width - 1) / 2], [0, f, (height - 1) / 2], [0, 0, 1]], np.float32)
    R_mj = data.cam_xmat[cid].reshape(3, 3)  # MuJoCo camera: x right, y up, looks along -z
    rolled = bool(R_mj[2, 1] < 0)  # image "up" points downwards in the world
    # OpenCV axes from MuJoCo's (y and z negated), then the optional 180-degree roll (x, y).
    flip = np.diag([-1.0, 1.0, -1.0]) if rolled else np.diag([1.0, -1.0, -1.0])
    T = np.eye(4)
    T[:3, :3] = R_mj @ flip
    T[:3, 3] = data.cam_xpos[cid]
    return View(camera, K, T, rolled)


class Renderer:
    """Offscreen RGB, metric z-depth and geom segmentation of one scene, per camera.

    Args:
      model: the MuJoCo model (``env.model``).
      height, width: stored frame size.
      supersample: RGB is rendered this many times larger and box-averaged (anti-aliasing);
        depth and segmentation are rendered at the stored size, so every stored pixel keeps
        the exact pinhole model.
    """

    def __init__(self, model: Any, height: int = 128, width: int = 128, supersample: int = 1):
        import mujoco

        if height < 8 or width < 8:
            raise ValueError(f"frame size must be at least 8x8, got {height}x{width}")
        if supersample < 1:
            raise ValueError(f"supersample must be >= 1, got {supersample}")
        self.model, self.height, self.width, self.supersample = model, height, width, supersample
        need_h, need_w = height * supersample, width * supersample
        model.vis.global_.offheight = max(int(model.vis.global_.offheight), need_h)
        model.vis.global_.offwidth = max(int(model.vis.global_.offwidth), need_w)
        self._rgb = mujoco.Renderer(model, need_h, need_w)
        self._aux = mujoco.Renderer(model, height, width) if supersample > 1 else self._rgb

    def close(self) -> None:
        """Frees the GL contexts."""
        self._rgb.close()
        if self._aux is not self._rgb:
            self._aux.close()

    def view(self, data: Any, camera: str) -> View:
        """:func:`view` at this renderer's frame size."""
        return view(self.model, data, camera, self.height, self.width)

    def render(self, data: Any, camera: str, *, depth: bool = True, segmentation: bool = True
               ) -> dict[str, np.ndarray]:
        """Renders the current state from ``camera``.

        Returns:
          {"image": uint8[H W 3], "depth": float32[H W] z-depth in metres (when asked),
           "geoms": int32[H W] geom id, -1 where no geom (when asked)}; all turned upright
          as :class:`View` says.
        """
        rolled = self.view(data, camera).rolled
        turn = (lambda a: a[::-1, ::-1]) if rolled else (lambda a: a)
        self._rgb.update_scene(data, camera=camera)
        rgb = self._rgb.render()
        if self.supersample > 1:
            s = self.supersample
            rgb = rgb.reshape(self.height, s, self.width, s, 3).mean((1, 3)).round()
        out = {"image": np.ascontiguousarray(turn(rgb.astype(np.uint8)))}
        if depth:
            self._aux.enable_depth_rendering()
            self._aux.update_scene(data, camera=camera)
            out["depth"] = np.ascontiguousarray(turn(self._aux.render().astype(np.float32)))
            self._aux.disable_depth_rendering()
        if segmentation:
            self._aux.enable_segmentation_rendering()
            self._aux.update_scene(data, camera=camera)
            seg = self._aux.render()
            self._aux.disable_segmentation_rendering()
            import mujoco

            geom = np.where(seg[..., 1] == int(mujoco.mjtObj.mjOBJ_GEOM), seg[..., 0], -1)
            out["geoms"] = np.ascontiguousarray(turn(geom.astype(np.int32)))
        return out


def body_segmentation(model: Any, geoms: np.ndarray) -> np.ndarray:
    """uint8[H W] body id of every pixel (0, the world body, where no geom is seen).

    Body ids index :func:`body_poses`, so depth + this + the poses give exact point tracks.
    """
    if model.nbody > 256:
        raise ValueError(f"{model.nbody} bodies do not fit a uint8 segmentation")
    ids = np.where(geoms >= 0, model.geom_bodyid[np.maximum(geoms, 0)], 0)
    return ids.astype(np.uint8)


def camera_from_bodies(data: Any, world_from_camera: np.ndarray) -> np.ndarray:
    """float32[nbody 4 4] camera_from_body of every body (the RLDS ``object_poses``)."""
    return (np.linalg.inv(world_from_camera)[None] @ body_poses(data)).astype(np.float32)


def get_state(env: Any) -> np.ndarray:
    """The full physics state (MuJoCo ``mjSTATE_INTEGRATION``: time, qpos, qvel, act, mocap,
    warm start, controls); with :func:`set_state` it copies a scene into a twin env."""
    import mujoco

    spec = mujoco.mjtState.mjSTATE_INTEGRATION
    out = np.empty(mujoco.mj_stateSize(env.model, spec))
    mujoco.mj_getState(env.model, env.data, out, spec)
    return out


def set_state(env: Any, state: np.ndarray) -> None:
    """Puts ``state`` (from :func:`get_state` of the same task) into ``env``."""
    import mujoco

    spec = mujoco.mjtState.mjSTATE_INTEGRATION
    if state.shape != (mujoco.mj_stateSize(env.model, spec),):
        raise ValueError(f"state: expected {mujoco.mj_stateSize(env.model, spec)} values, "
                         f"got shape {list(state.shape)}")
    mujoco.mj_setState(env.model, env.data, state, spec)
    mujoco.mj_forward(env.model, env.data)
