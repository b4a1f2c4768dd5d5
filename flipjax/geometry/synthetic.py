"""Seeded synthetic scenes for the rigid fit: a textured box moving in front of a pinhole camera.

Used by the geometry demo, the geometry benchmark and the tests. Everything is generated from a
PRNG key, so a scene is reproducible from its seed.

The box's surface points are sampled on the faces visible at frame 0; at later frames a point is
visible when its face still faces the camera (a convex box occludes itself exactly by back-face
culling), it is in front of the camera and inside the image. Tracks get Gaussian pixel noise and
a fraction of the tracks are gross outliers: at every frame after the first they are displaced
by 5 to 30 pixels in a random direction, independently per frame, while still reported visible
(the failure mode of a point tracker that jumps to another surface).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from flipjax.geometry import camera, se3
from flipjax.typing import Array, PRNGKey


@dataclasses.dataclass(frozen=True)
class BoxSceneConfig:
    """Parameters of :func:`make_box_scenes` (defaults: the geometry benchmark's cases)."""

    num_points: int = 500
    num_frames: int = 8
    image_size: tuple[int, int] = (128, 128)
    fov_deg: float = 60.0
    depth_range: tuple[float, float] = (0.7, 1.3)
    box_size_range: tuple[float, float] = (0.15, 0.35)
    lateral_range: float = 0.08  # metres off the optical axis at frame 0
    rot_step_deg: tuple[float, float] = (1.0, 8.0)
    trans_step_m: tuple[float, float] = (0.005, 0.03)
    noise_px: float = 0.5
    outlier_fraction: float = 0.2
    outlier_px: tuple[float, float] = (5.0, 30.0)


class BoxScene(NamedTuple):
    """A batch of synthetic sequences (B sequences, T frames, N points).

    Attributes:
      points3d: float[B N 3] camera-frame points at frame 0.
      tracks: float[B T N 2] noisy tracked pixels; ``tracks[:, 0]`` is noise-free.
      visible: bool[B T N].
      K: float[3 3].
      transforms: float[B T 4 4] true object motion, X_t = T_t X_0.
      outlier: bool[B N] tracks that are gross outliers after frame 0.
      clean_tracks: float[B T N 2] noise- and outlier-free projections.
    """

    points3d: Array
    tracks: Array
    visible: Array
    K: Array
    transforms: Array
    outlier: Array
    clean_tracks: Array


_NORMALS = jnp.array([[1.0, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])


def _random_rotation(key: PRNGKey) -> Array:
    q = jax.random.normal(key, (4,))
    q = q / jnp.linalg.norm(q)
    w, x, y, z = q
    return jnp.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def _random_unit(key: PRNGKey) -> Array:
    v = jax.random.normal(key, (3,))
    return v / jnp.linalg.norm(v)


def _one_scene(key: PRNGKey, cfg: BoxSceneConfig, K: Array):
    keys = jax.random.split(key, 12)
    n, t = cfg.num_points, cfg.num_frames
    size = jax.random.uniform(keys[0], (3,), minval=cfg.box_size_range[0],
                              maxval=cfg.box_size_range[1])
    depth = jax.random.uniform(keys[1], minval=cfg.depth_range[0], maxval=cfg.depth_range[1])
    lateral = jax.random.uniform(keys[2], (2,), minval=-cfg.lateral_range,
                                 maxval=cfg.lateral_range)
    center = jnp.array([lateral[0], lateral[1], depth])
    R0 = _random_rotation(keys[3])
    # Faces visible at frame 0 (normal towards the camera), sampled with area weights.
    normals_cam = _NORMALS @ R0.T
    face_center = center + 0.5 * (jnp.abs(_NORMALS) @ size)[:, None] * normals_cam
    facing = jnp.sum(normals_cam * face_center, -1) < 0
    axes = jnp.argmax(jnp.abs(_NORMALS), -1)
    area = jnp.prod(size) / size[axes]
    face = jax.random.categorical(keys[4], jnp.where(facing, jnp.log(area), -jnp.inf), shape=(n,))
    uvw = jax.random.uniform(keys[5], (n, 3), minval=-0.5, maxval=0.5) * size
    local = jnp.where(jnp.arange(3) == axes[face][:, None],
                      0.5 * _NORMALS[face][jnp.arange(n), axes[face]][:, None] * size, uvw)
    X0 = local @ R0.T + center
    n0 = normals_cam[face]

    # Per-step motion: rotation about the box centre plus a translation, random each step.
    def step(carry, k):
        T_prev, c_prev = carry
        ka, kb, kc, kd = jax.random.split(k, 4)
        ang = jnp.radians(jax.random.uniform(ka, minval=cfg.rot_step_deg[0],
                                             maxval=cfg.rot_step_deg[1]))
        dist = jax.random.uniform(kb, minval=cfg.trans_step_m[0], maxval=cfg.trans_step_m[1])
        R = se3.so3_exp(ang * _random_unit(kc))
        dt = dist * _random_unit(kd)
        S = se3.make(R, c_prev - R @ c_prev + dt)  # rotate about the current centre, then move
        T = S @ T_prev
        return (T, c_prev + dt), T

    (_, _), Ts = jax.lax.scan(step, (jnp.eye(4), center), jax.random.split(keys[6], t - 1))
    Ts = jnp.concatenate([jnp.eye(4)[None], Ts], 0)
    P = jnp.einsum("tij,nj->tni", Ts[:, :3, :3], X0) + Ts[:, None, :3, 3]
    normals_t = jnp.einsum("tij,nj->tni", Ts[:, :3, :3], n0)
    clean, front = camera.project(P, K)
    visible = (front & (jnp.sum(normals_t * P, -1) < 0)
               & camera.in_image(clean, cfg.image_size))
    noise = cfg.noise_px * jax.random.normal(keys[7], clean.shape)
    noise = noise.at[0].set(0.0)
    outlier = jax.random.uniform(keys[8], (n,)) < cfg.outlier_fraction
    mag = jax.random.uniform(keys[9], (t, n), minval=cfg.outlier_px[0], maxval=cfg.outlier_px[1])
    ang = jax.random.uniform(keys[10], (t, n), maxval=2 * jnp.pi)
    jump = mag[..., None] * jnp.stack([jnp.cos(ang), jnp.sin(ang)], -1)
    jump = jnp.where((outlier[None, :] & (jnp.arange(t)[:, None] > 0))[..., None], jump, 0.0)
    return X0, clean + noise + jump, visible, Ts, outlier, clean


def make_box_scenes(key: PRNGKey, batch: int, config: BoxSceneConfig = BoxSceneConfig()
                    ) -> BoxScene:
    """Generates ``batch`` independent box sequences from one key.

    Args:
      key: PRNG key.
      batch: number of sequences B.
      config: :class:`BoxSceneConfig`.

    Returns:
      :class:`BoxScene` with float32 arrays.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if config.num_frames < 1 or config.num_points < 1:
        raise ValueError(f"need num_frames >= 1 and num_points >= 1, got {config}")
    K = camera.intrinsics_from_fov(config.fov_deg, *config.image_size)
    X0, tracks, vis, Ts, outlier, clean = jax.jit(
        jax.vmap(_one_scene, in_axes=(0, None, None)), static_argnums=1
    )(jax.random.split(key, batch), config, K)
    return BoxScene(X0, tracks, vis, K, Ts, outlier, clean)
