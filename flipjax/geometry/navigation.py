"""Discrete navigation actions from camera motion, and replanning triggers.

Navigation follows AVDC: an imaginary point 1 m ahead of the camera is moved by each step's
apparent scene motion; the step is ``Done`` when the point moves less than 1 mm (no motion),
``RotateLeft``/``RotateRight`` when its x moves by more than 0.20 m, else ``MoveAhead``.
Actions after the first ``Done`` are ``Done`` too (AVDC stops there).

Replanning: a stuck-step counter (the end effector has not moved for ``patience`` steps) and a
low-inlier trigger (the fit explains fewer than 10% of the usable points).
"""

from __future__ import annotations

import jax.numpy as jnp

from flipjax import shapes
from flipjax.geometry import se3
from flipjax.typing import Array, ArrayLike

DONE, MOVE_AHEAD, ROTATE_LEFT, ROTATE_RIGHT = 0, 1, 2, 3
ACTION_NAMES = ("Done", "MoveAhead", "RotateLeft", "RotateRight")


def navigation_actions(camera_poses: ArrayLike, *, turn_threshold: float = 0.20,
                       done_tolerance: float = 1e-3) -> Array:
    """AVDC's discrete navigation actions for each step of a camera trajectory.

    Args:
      camera_poses: float[T 4 4] pose of camera t in camera 0's frame, as returned by
        ``fit_rigid_sequence(..., config=FitConfig(camera_motion=True)).transforms[b]``.
      turn_threshold: lateral displacement (metres) of the point 1 m ahead that means a turn.
      done_tolerance: displacement (metres) below which the step is ``Done``.

    Returns:
      int32[T-1] codes indexing :data:`ACTION_NAMES`.
    """
    poses = jnp.asarray(shapes.as_array(camera_poses, "camera_poses"))
    dims = shapes.check(poses, "camera_poses", "T 4 4", dtype="float")
    if dims["T"] < 2:
        raise ValueError(f"camera_poses: need at least 2 frames, got {list(poses.shape)}")
    # Apparent scene motion of step t: points in camera t-1 coordinates -> camera t.
    step = se3.compose(se3.inverse(poses[1:]), poses[:-1])
    ahead = jnp.array([0.0, 0.0, 1.0], poses.dtype)
    moved = se3.apply(step, ahead[None, None])[:, 0]
    still = jnp.all(jnp.abs(moved - ahead) <= done_tolerance, -1)
    codes = jnp.where(still, DONE, jnp.where(
        moved[:, 0] > turn_threshold, ROTATE_LEFT,
        jnp.where(moved[:, 0] < -turn_threshold, ROTATE_RIGHT, MOVE_AHEAD)))
    after_done = jnp.cumsum(still) > 0
    return jnp.where(after_done, DONE, codes).astype(jnp.int32)


def update_stuck_counter(count: ArrayLike, previous_position: ArrayLike, position: ArrayLike, *,
                         tolerance: float = 1e-3, patience: int = 10) -> tuple[Array, Array]:
    """Counts consecutive steps without motion; triggers a replan after ``patience`` of them.

    Args:
      count: int[...] consecutive still steps so far.
      previous_position: float[... 3] end-effector position at the previous step.
      position: float[... 3] current position.
      tolerance: movement (metres) below which a step counts as still.
      patience: still steps that trigger a replan.

    Returns:
      (count int32[...], replan bool[...]); the count resets to 0 when it triggers or moves.
    """
    prev, pos = jnp.asarray(previous_position), jnp.asarray(position)
    shapes.check(prev, "previous_position", "... 3", dtype="float")
    if prev.shape != pos.shape:
        raise ValueError(f"position: expected shape {list(prev.shape)} like previous_position, "
                         f"got {list(pos.shape)}")
    count = jnp.asarray(count, jnp.int32)
    if count.shape != prev.shape[:-1]:
        raise ValueError(f"count: expected shape {list(prev.shape[:-1])}, got {list(count.shape)}")
    still = jnp.linalg.norm(pos - prev, axis=-1) < tolerance
    count = jnp.where(still, count + 1, 0)
    replan = count >= patience
    return jnp.where(replan, 0, count).astype(jnp.int32), replan


def low_inlier_trigger(inliers: ArrayLike, usable: ArrayLike, min_fraction: float = 0.10
                       ) -> Array:
    """Replan when the fit explains too few points.

    Args:
      inliers: bool[... N] inliers of a fit (``fit.inliers``).
      usable: bool[... N] points that could have been inliers (e.g. ``visible``).
      min_fraction: fraction of usable points below which to replan (AVDC: 10%).

    Returns:
      bool[...]; also True when no point is usable.
    """
    inliers, usable = jnp.asarray(inliers), jnp.asarray(usable)
    shapes.check(inliers, "inliers", "... N", dtype="bool")
    if usable.shape != inliers.shape or usable.dtype != jnp.bool_:
        raise ValueError(f"usable: expected bool{list(inliers.shape)} like inliers, got "
                         f"{usable.dtype}{list(usable.shape)}")
    n_usable = jnp.sum(usable, -1)
    n_in = jnp.sum(inliers & usable, -1)
    return (n_usable == 0) | (n_in < min_fraction * n_usable)
