"""Procedural tabletop world rendered in numpy: the project's embedded default data.

A pinhole camera looks straight down at a textured table with a few textured blocks and a
parallel gripper (palm plus two fingers). A scripted gripper pushes a named block in a
direction or carries it to a named place; an instruction is generated from templates, and a
success predicate is evaluated on the final state. Every surface is a textured horizontal
rectangle with a rigid pose, so depth, segmentation and per-object poses are exact and ground
truth tracks follow from them (``tracking.track_ground_truth``).

World frame: table plane z = 0, z up; image right is +x and image top is +y.
Segmentation ids: 0 table, 1 palm, 2 left finger, 3 right finger, 4 + k block k.
"""

from __future__ import annotations

import dataclasses

import numpy as np

COLORS = {
    "red": (0.85, 0.15, 0.12), "green": (0.15, 0.65, 0.2), "blue": (0.15, 0.3, 0.85),
    "yellow": (0.92, 0.8, 0.15), "purple": (0.55, 0.2, 0.7), "orange": (0.95, 0.5, 0.1),
}
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "top": (0.0, 1.0), "bottom": (0.0, -1.0)}
PLACES = {"top left corner": (-0.16, 0.16), "top right corner": (0.16, 0.16),
          "bottom left corner": (-0.16, -0.16), "bottom right corner": (0.16, -0.16),
          "center": (0.0, 0.0)}
PUSH_TEMPLATES = ("push the {c} block to the {d}", "slide the {c} block to the {d}",
                  "move the {c} block to the {d}")
PLACE_TEMPLATES = ("put the {c} block in the {p} of the table",
                   "pick up the {c} block and place it in the {p}")
NEXT_TEMPLATES = ("put the {c} block next to the {c2} block",
                  "place the {c} block beside the {c2} block")
NUM_GRIPPER_PARTS = 3  # palm, left finger, right finger
PALM_HALF, FINGER_HALF = (0.05, 0.012), (0.008, 0.025)


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """Scene and script parameters (metres, radians, pixels)."""

    image_size: int = 128
    camera_height: float = 0.6
    fov_deg: float = 55.0
    workspace: float = 0.2  # blocks stay within |x|, |y| <= workspace
    block_half: tuple[float, float] = (0.028, 0.038)
    block_height: float = 0.04
    num_blocks: tuple[int, int] = (2, 4)
    speed: float = 0.015  # metres of gripper motion per step
    failure_fraction: float = 0.0  # fraction of episodes whose script deliberately fails
    supersample: int = 2

    @property
    def focal(self) -> float:
        return 0.5 * self.image_size / np.tan(np.deg2rad(self.fov_deg) / 2)

    @property
    def intrinsics(self) -> np.ndarray:
        c = (self.image_size - 1) / 2
        return np.array([[self.focal, 0, c], [0, self.focal, c], [0, 0, 1]], np.float32)

    @property
    def camera_from_world(self) -> np.ndarray:
        # Looking down: camera x = world x, camera y = -world y, depth = height above plane.
        return np.array([[1, 0, 0, 0], [0, -1, 0, 0], [0, 0, -1, self.camera_height],
                         [0, 0, 0, 1]], np.float32)


def _smooth_noise(rng: np.random.Generator, res: int, octaves: int = 4) -> np.ndarray:
    """float[res res] in about [-1, 1]: octaves of bilinearly upsampled random grids."""
    out = np.zeros((res, res), np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        cells = 4 * 2 ** o
        grid = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
        t = np.linspace(0, cells, res, dtype=np.float32)
        out += amp * _bilinear(grid[..., None], t[None, :], t[:, None])[..., 0]
        total += amp
        amp *= 0.6
    return out / total


def _bilinear(tex: np.ndarray, tu: np.ndarray, tv: np.ndarray) -> np.ndarray:
    """Samples tex float[R C ch] at texel coordinates (clamped at the border)."""
    r, c = tex.shape[:2]
    tu = np.clip(tu, 0, c - 1)
    tv = np.clip(tv, 0, r - 1)
    u0 = np.minimum(np.floor(tu).astype(np.int32), c - 2)
    v0 = np.minimum(np.floor(tv).astype(np.int32), r - 2)
    fu, fv = (tu - u0)[..., None], (tv - v0)[..., None]
    return ((1 - fv) * ((1 - fu) * tex[v0, u0] + fu * tex[v0, u0 + 1])
            + fv * ((1 - fu) * tex[v0 + 1, u0] + fu * tex[v0 + 1, u0 + 1]))


@dataclasses.dataclass
class Surface:
    """A textured horizontal rectangle with a rigid pose (x, y, z_top, yaw)."""

    half: tuple[float, float]
    texture: np.ndarray  # float[R R 3]


@dataclasses.dataclass
class Scene:
    """Static appearance of one episode: table plus gripper parts plus blocks."""

    config: ToyConfig
    surfaces: list[Surface]
    colors: list[str]  # block colour names
    # The table never moves, so its layer is rendered once per resolution.
    cache: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def num_objects(self) -> int:
        return len(self.surfaces)


def make_scene(rng: np.random.Generator, config: ToyConfig, num_blocks: int) -> Scene:
    """Samples the table, gripper and block textures and the block colours/sizes."""
    tex = 96
    wood = np.array([0.62, 0.48, 0.34], np.float32)
    grain = _smooth_noise(rng, 256, 5)
    table = wood * (1 + 0.35 * grain[..., None]) + 0.05 * np.sin(
        np.linspace(0, 60, 256, dtype=np.float32))[None, :, None]
    surfaces = [Surface((0.45, 0.45), np.clip(table, 0, 1))]
    metal = np.array([0.35, 0.36, 0.38], np.float32)
    for half in (PALM_HALF, FINGER_HALF, FINGER_HALF):
        surfaces.append(Surface(half, np.clip(metal * (1 + 0.4 * _smooth_noise(
            rng, tex // 2)[..., None]), 0, 1)))
    colors = list(rng.choice(sorted(COLORS), size=num_blocks, replace=False))
    for name in colors:
        half = float(rng.uniform(*config.block_half))
        texture = np.asarray(COLORS[name], np.float32) * (
            1 + 0.45 * _smooth_noise(rng, tex)[..., None])
        surfaces.append(Surface((half, half), np.clip(texture, 0, 1)))
    return Scene(config, surfaces, colors)


def pose_matrix(x: float, y: float, z: float, yaw: float) -> np.ndarray:
    """world_from_object float[4 4] for a pose (x, y, z, yaw)."""
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0, x], [s, c, 0, y], [0, 0, 1, z], [0, 0, 0, 1]], np.float32)


def render(scene: Scene, poses: np.ndarray, scale: int = 1
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Renders one frame.

    Args:
      scene: appearance.
      poses: float[K 4] of (x, y, z_top, yaw) per surface in world coordinates.
      scale: render at ``scale`` x resolution (pixel centres stay consistent with scale 1).

    Returns:
      rgb float32[h w 3] in [0, 1], segmentation int32[h w], depth float32[h w] (metres).
    """
    cfg = scene.config
    n = cfg.image_size * scale
    f = cfg.focal * scale
    c = (n - 1) / 2
    pix = np.arange(n, dtype=np.float32) - c
    order = np.argsort(poses[:, 2], kind="stable")
    key = (scale, *poses[0].tolist())
    if order[0] == 0 and key in scene.cache:
        rgb, seg, depth = (a.copy() for a in scene.cache[key])
        order = order[1:]
    else:
        rgb = np.zeros((n, n, 3), np.float32)
        seg = np.full((n, n), -1, np.int32)
        depth = np.full((n, n), np.inf, np.float32)
    # Painter's order: higher tops are nearer the camera and drawn later.
    for k in order:
        x, y, z, yaw = poses[k]
        dist = cfg.camera_height - z
        hx, hy = scene.surfaces[k].half
        # Only the pixels under the footprint's bounding circle can be inside it.
        r = np.hypot(hx, hy) * f / dist + 1
        cu, cv = x * f / dist + c, -y * f / dist + c
        u0, u1 = int(max(0, np.floor(cu - r))), int(min(n, np.ceil(cu + r) + 1))
        v0, v1 = int(max(0, np.floor(cv - r))), int(min(n, np.ceil(cv + r) + 1))
        if u0 >= u1 or v0 >= v1:
            continue
        wx = pix[None, u0:u1] * dist / f - x
        wy = -pix[v0:v1, None] * dist / f - y
        cs, sn = np.cos(yaw), np.sin(yaw)
        lx, ly = cs * wx + sn * wy, -sn * wx + cs * wy
        inside = (np.abs(lx) <= hx) & (np.abs(ly) <= hy)
        if not inside.any():
            continue
        tex = scene.surfaces[k].texture
        res = tex.shape[0] - 1
        col = _bilinear(tex, (lx[inside] + hx) / (2 * hx) * res, (hy - ly[inside]) / (2 * hy) * res)
        rgb[v0:v1, u0:u1][inside] = col
        seg[v0:v1, u0:u1][inside] = k
        depth[v0:v1, u0:u1][inside] = dist
        if k == 0 and key not in scene.cache:
            scene.cache[key] = (rgb.copy(), seg.copy(), depth.copy())
    return rgb, seg, depth


def camera_poses(config: ToyConfig, poses: np.ndarray) -> np.ndarray:
    """camera_from_object float[K 4 4] from world poses float[K 4] (x, y, z_top, yaw)."""
    cw = config.camera_from_world
    return np.stack([cw @ pose_matrix(*p) for p in poses]).astype(np.float32)


def render_rgb_uint8(scene: Scene) -> callable:
    """Returns a function poses -> (uint8[H W 3], seg int32[H W], depth float32[H W])."""
    s = scene.config.supersample

    def fn(poses: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        hi, _, _ = render(scene, poses, s)
        n = scene.config.image_size
        rgb = hi.reshape(n, s, n, s, 3).mean(axis=(1, 3)) if s > 1 else hi
        _, seg, depth = render(scene, poses, 1)
        return (np.clip(rgb * 255 + 0.5, 0, 255)).astype(np.uint8), seg, depth

    return fn
