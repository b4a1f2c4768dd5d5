"""Scripted tasks for the toy world: push a block, carry it to a place or next to another block.

Each episode samples a scene and a task, scripts the gripper (smooth piecewise motions at about
``ToyConfig.speed`` metres per step), writes an instruction from templates and evaluates a
success predicate on the final state. A fraction of episodes can be scripted to fail (too short a
motion, the wrong block, the wrong target) so value models see negatives.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipelines.toy.world import (
    DIRECTIONS,
    FINGER_HALF,
    NEXT_TEMPLATES,
    NUM_GRIPPER_PARTS,
    PALM_HALF,
    PLACE_TEMPLATES,
    PLACES,
    PUSH_TEMPLATES,
    Scene,
    ToyConfig,
    make_scene,
)

TRAVEL_Z, LOW_Z, LIFT_Z = 0.12, 0.005, 0.07
FAILURES = ("short", "wrong_block", "wrong_target")
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}  # any other split name (e.g. "plan") -> 3


def episode_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one episode: episodes are independent and reproducible."""
    return np.random.default_rng([seed, SPLIT_IDS.get(split, 3), index])


@dataclasses.dataclass(frozen=True)
class Task:
    """What the instruction asks.

    Attributes:
      kind: ``push``, ``place`` or ``next_to``.
      instruction: the generated text.
      block: index of the block to move (segmentation id is ``4 + block``).
      target: float[2] world xy the block should end at.
      reference: index of the reference block for ``next_to`` (else -1).
    """

    kind: str
    instruction: str
    block: int
    target: tuple[float, float]
    reference: int = -1


@dataclasses.dataclass
class ToyEpisode:
    """A scripted episode: per-step world poses of every surface and the gripper state.

    Attributes:
      scene: appearance.
      poses: float32[T K 4] (x, y, z_top, yaw) of table, palm, fingers, blocks.
      gripper: float32[T 4] gripper (x, y, z, opening).
      task: the instructed task.
      success: the success predicate on the final state.
      failure: '' for a faithful script, else the deliberate failure mode.
    """

    scene: Scene
    poses: np.ndarray
    gripper: np.ndarray
    task: Task
    success: bool
    failure: str = ""


def _extent(half: float, yaw: float) -> float:
    """Half extent of a square block of half size ``half`` along a world axis."""
    return half * (abs(np.cos(yaw)) + abs(np.sin(yaw)))


def is_success(task: Task, blocks_start: np.ndarray, blocks_end: np.ndarray,
               halves: np.ndarray) -> bool:
    """Success predicate on block poses float[B 4] at the start and the end of an episode."""
    end = blocks_end[task.block, :2]
    if task.kind == "push":
        return bool(np.linalg.norm(end - np.asarray(task.target)) < 0.04)
    if task.kind == "place":
        return bool(np.linalg.norm(end - np.asarray(task.target)) < 0.05)
    ref = blocks_end[task.reference, :2]
    near = np.linalg.norm(end - ref) < np.sqrt(2) * (halves[task.block] + halves[task.reference]) \
        + 0.04
    moved = np.linalg.norm(end - blocks_start[task.block, :2]) > 0.04
    return bool(near and moved)


class _Script:
    """Accumulates per-step gripper and block states while motions are appended."""

    def __init__(self, config: ToyConfig, gripper: np.ndarray, blocks: np.ndarray):
        self.config = config
        self.g = [gripper.astype(np.float64)]
        self.b = [blocks.astype(np.float64)]

    def move(self, target: tuple[float, ...], attach: int = -1, yaw_turn: float = 0.0,
             min_steps: int = 3) -> None:
        """Moves the gripper to ``target`` (x, y, z, opening); an attached block follows."""
        g0, b0 = self.g[-1], self.b[-1]
        g1 = np.asarray(target, np.float64)
        dist = np.linalg.norm(g1[:3] - g0[:3]) + abs(g1[3] - g0[3])
        n = max(min_steps, int(np.ceil(dist / self.config.speed)))
        offset = b0[attach, :3] - g0[:3] if attach >= 0 else None
        for i in range(1, n + 1):
            s = i / n
            s = s * s * (3 - 2 * s)  # smoothstep: no velocity jumps at keyframes
            g = g0 + s * (g1 - g0)
            b = b0.copy()
            if attach >= 0:
                b[attach, :3] = g[:3] + offset
                b[attach, 3] = b0[attach, 3] + s * yaw_turn
            self.g.append(g)
            self.b.append(b)

    def arrays(self, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
        g, b = np.stack(self.g), np.stack(self.b)
        t = len(g)
        poses = np.zeros((t, scene.num_objects, 4), np.float64)
        poses[:, 1] = np.stack([g[:, 0], g[:, 1], g[:, 2] + 0.05, 0 * g[:, 0]], -1)
        for side, k in ((-1, 2), (1, 3)):
            poses[:, k] = np.stack([g[:, 0] + side * g[:, 3] / 2, g[:, 1], g[:, 2] + 0.04,
                                    0 * g[:, 0]], -1)
        poses[:, NUM_GRIPPER_PARTS + 1:] = b
        return poses.astype(np.float32), g.astype(np.float32)


def _place_blocks(rng: np.random.Generator, config: ToyConfig, halves: np.ndarray) -> np.ndarray:
    for _ in range(200):
        xy = rng.uniform(-config.workspace, config.workspace, (len(halves), 2))
        gap = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
        need = np.sqrt(2) * (halves[:, None] + halves[None]) + 0.03
        if np.all(gap[np.triu_indices(len(halves), 1)] > need[np.triu_indices(len(halves), 1)]):
            yaw = rng.uniform(0, np.pi / 2, len(halves))
            return np.stack([xy[:, 0], xy[:, 1], np.full(len(halves), config.block_height),
                             yaw], -1)
    raise RuntimeError("could not place blocks without overlap; use fewer or smaller blocks")


def _clear(xy: np.ndarray, others: np.ndarray, others_half: np.ndarray, half: float) -> bool:
    """True when a block of ``half`` at ``xy`` does not overlap the other blocks."""
    if len(others) == 0:
        return True
    gap = np.linalg.norm(others[:, :2] - xy, axis=-1)
    return bool(np.all(gap > np.sqrt(2) * (others_half + half) + 0.01))


def _sample_task(rng: np.random.Generator, scene: Scene, blocks: np.ndarray,
                 halves: np.ndarray) -> Task | None:
    cfg = scene.config
    k = int(rng.integers(len(blocks)))
    color = scene.colors[k]
    others = np.delete(blocks, k, axis=0)
    others_half = np.delete(halves, k)
    kind = str(rng.choice(["push", "place", "next_to"] if len(blocks) > 1 else ["push", "place"],
                          p=[0.5, 0.3, 0.2] if len(blocks) > 1 else [0.6, 0.4]))
    p = blocks[k, :2]
    if kind == "push":
        name = str(rng.choice(sorted(DIRECTIONS)))
        d = np.asarray(DIRECTIONS[name])
        target = p + d * rng.uniform(0.10, 0.16)
        if np.abs(target).max() > cfg.workspace + 0.04:
            return None
        # The block slides along the segment: it must not pass through another block.
        for t in np.linspace(0, 1, 12):
            if not _clear(p + t * (target - p), others, others_half, halves[k]):
                return None
        text = str(rng.choice(PUSH_TEMPLATES)).format(c=color, d=name)
        return Task("push", text, k, tuple(map(float, target)))
    if kind == "place":
        name = str(rng.choice(sorted(PLACES)))
        target = np.asarray(PLACES[name]) + rng.uniform(-0.02, 0.02, 2)
        if np.linalg.norm(target - p) < 0.08 or not _clear(target, others, others_half, halves[k]):
            return None
        text = str(rng.choice(PLACE_TEMPLATES)).format(c=color, p=name)
        return Task("place", text, k, tuple(map(float, target)))
    j = int(rng.integers(len(blocks) - 1))
    ref = j if j < k else j + 1
    away = p - blocks[ref, :2]
    if np.linalg.norm(away) < 1e-6:
        return None
    target = blocks[ref, :2] + away / np.linalg.norm(away) * (
        np.sqrt(2) * (halves[k] + halves[ref]) + 0.012)
    rest = np.delete(blocks, [k, ref], axis=0)
    if np.linalg.norm(target - p) < 0.08 or not _clear(
            target, rest, np.delete(halves, [k, ref]), halves[k]):
        return None
    text = str(rng.choice(NEXT_TEMPLATES)).format(c=color, c2=scene.colors[ref])
    return Task("next_to", text, k, tuple(map(float, target)), ref)


def _script(cfg: ToyConfig, script: _Script, task: Task, block: int, target: np.ndarray,
            halves: np.ndarray) -> None:
    """Appends the gripper motions that bring ``block`` to ``target`` as ``task.kind`` says."""
    b = script.b[-1][block]
    half, ext_x = halves[block], _extent(halves[block], b[3])
    if task.kind == "push":
        d = (target - b[:2]) / max(np.linalg.norm(target - b[:2]), 1e-9)
        closed = 0.025
        ext_g = PALM_HALF[0] * abs(d[0]) + FINGER_HALF[1] * abs(d[1])
        pre = b[:2] - d * (_extent(half, b[3]) + ext_g + 0.004)
        script.move((*pre, TRAVEL_Z, closed))
        script.move((*pre, LOW_Z, closed))
        script.move((*(pre + target - b[:2]), LOW_Z, closed), attach=block,
                    yaw_turn=float(np.random.default_rng(block).uniform(-0.3, 0.3)))
        script.move((*script.g[-1][:2], TRAVEL_Z, closed))
        return
    opened = 2 * (ext_x + FINGER_HALF[0] + 0.012)
    grip = 2 * (ext_x + FINGER_HALF[0])
    script.move((*b[:2], TRAVEL_Z, opened))
    script.move((*b[:2], LOW_Z, opened))
    script.move((*b[:2], LOW_Z, grip))
    script.move((*b[:2], LIFT_Z, grip), attach=block)
    script.move((*target, LIFT_Z, grip), attach=block)
    script.move((*target, LOW_Z, grip), attach=block)
    script.move((*target, LOW_Z, opened))
    script.move((*target, TRAVEL_Z, opened))


def sample_episode(rng: np.random.Generator, config: ToyConfig = ToyConfig()) -> ToyEpisode:
    """Samples a scene and task and scripts the gripper.

    Args:
      rng: numpy Generator (the episode is a pure function of its state).
      config: world parameters.

    Returns:
      ToyEpisode with per-step poses and the evaluated success predicate.
    """
    for _ in range(100):
        num = int(rng.integers(config.num_blocks[0], config.num_blocks[1] + 1))
        scene = make_scene(rng, config, num)
        halves = np.array([s.half[0] for s in scene.surfaces[NUM_GRIPPER_PARTS + 1:]])
        blocks = _place_blocks(rng, config, halves)
        task = None
        for _ in range(20):
            task = _sample_task(rng, scene, blocks, halves)
            if task is not None:
                break
        if task is not None:
            break
    else:
        raise RuntimeError("could not sample a feasible toy task")
    start = rng.uniform(-config.workspace, config.workspace, 2)
    script = _Script(config, np.array([*start, TRAVEL_Z, 0.06]), blocks)
    failure = ""
    block, target = task.block, np.asarray(task.target)
    if rng.uniform() < config.failure_fraction:
        failure = str(rng.choice(FAILURES if len(blocks) > 1 else FAILURES[::2]))
        p = blocks[task.block, :2]
        if failure == "short":
            target = p + 0.3 * (target - p)
        elif failure == "wrong_block":
            block = (task.block + 1) % len(blocks)
            target = blocks[block, :2] + (target - p)
        else:
            target = p - (target - p)
        target = np.clip(target, -config.workspace - 0.04, config.workspace + 0.04)
    _script(config, script, task, block, target, halves)
    poses, gripper = script.arrays(scene)
    b0, b1 = poses[0, NUM_GRIPPER_PARTS + 1:], poses[-1, NUM_GRIPPER_PARTS + 1:]
    return ToyEpisode(scene, poses, gripper, task, is_success(task, b0, b1, halves), failure)
