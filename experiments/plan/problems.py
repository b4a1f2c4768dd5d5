"""The problems ``experiments.plan`` solves: toy-world problems or clips of a ``build_clips``
directory, each with its history, instruction tokens and the planner's query points."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from data_pipelines.loader import ClipDataset
from data_pipelines.toy import problems as tp
from data_pipelines.toy.world import ToyConfig
from flipjax.planning import WorldModel, grid_queries

Config = ml_collections.ConfigDict


@dataclasses.dataclass
class Problems:
    """The problems to plan: arrays with a leading problem axis P.

    Attributes:
      history: uint8[P Th H W 3]; text_tokens: float32[P Lt D]; text_mask: bool[P Lt].
      instructions: P strings.
      sources: per problem a JSON-able description of where it comes from.
      queries: float32[P N 2] the planner's query points of each problem.
      toy: the ``ToyProblems`` (toy problems only; they carry depth, masks and poses).
    """

    history: np.ndarray
    text_tokens: np.ndarray
    text_mask: np.ndarray
    instructions: list[str]
    sources: list[dict[str, Any]]
    queries: np.ndarray
    toy: tp.ToyProblems | None = None

    def __len__(self) -> int:
        return len(self.instructions)


def _start(value: Any) -> str | int:
    text = str(value).strip()
    return int(text) if text.isdigit() else text


def object_window(mask: np.ndarray, radius: int) -> np.ndarray:
    """float32[(2r+1)^2 2]: the pixel centres of a square window around a mask's centroid.

    The window keeps its size at the image border (it slides inward), so every problem gets
    the same number of queries.

    Args:
      mask: bool[H W] the object's pixels.
      radius: r, the window's half side in pixels.

    Raises:
      ValueError: when the window is larger than the frame.
    """
    h, w = mask.shape
    if 2 * radius + 1 > min(h, w):
        raise ValueError(f"object_window={radius} does not fit a {h}x{w} frame")
    v, u = np.nonzero(mask)
    # An empty mask (the object hidden) leaves nothing to follow: the window stays central.
    cu, cv = (u.mean(), v.mean()) if len(u) else ((w - 1) / 2, (h - 1) / 2)
    cu = int(np.clip(np.round(cu), radius, w - 1 - radius))
    cv = int(np.clip(np.round(cv), radius, h - 1 - radius))
    vv, uu = np.meshgrid(np.arange(cv - radius, cv + radius + 1),
                         np.arange(cu - radius, cu + radius + 1), indexing="ij")
    return np.stack([uu.ravel(), vv.ravel()], -1).astype(np.float32)


def toy_problems(config: Config, world: WorldModel, action_config: Config) -> Problems:
    """Toy problems at the settings the runs were trained on (frame size, history, text)."""
    h, w = (int(s) for s in action_config.model.img_size)
    if h != w:
        raise ValueError(f"toy problems are square; the action run takes {h}x{w} frames")
    toy = tp.make_problems(
        int(config.num_problems), int(config.seed), image_size=h,
        history=int(world.history_frames), text_dim=int(action_config.model.language_dim),
        text_max_tokens=int(action_config.get("toy_text_max_tokens", 8)),
        start=_start(config.start),
        # The world's motion per step as the runs saw it (config.toy_speed of their clips).
        toy_config=ToyConfig(speed=float(action_config.get("toy_speed", 0.015))))
    grid = np.asarray(grid_queries(int(config.query_grid), h, w))
    radius = int(config.object_window)
    queries = np.stack([np.concatenate([grid, object_window(m, radius)]) if radius > 0
                        else grid for m in toy.object_mask]).astype(np.float32)
    cells = np.clip(np.round(queries).astype(int), 0, h - 1)
    on_block = np.stack([m[c[:, 1], c[:, 0]] for m, c in zip(toy.object_mask, cells,
                                                              strict=True)]).sum(axis=1)
    sources = []
    for i, task in enumerate(toy.tasks):
        k = task.block
        start_xy = toy.blocks[i][k, :2]
        final_xy = toy.blocks_final[i][k, :2]
        sources.append({
            "kind": "toy", "seed": toy.seed, "split": tp.SPLIT, "episode": int(toy.episodes[i]),
            "start_step": int(toy.start_steps[i]), "task": task.kind, "block": int(k),
            "target": list(task.target),
            "start_target_distance_m": float(np.linalg.norm(start_xy - np.asarray(task.target))),
            "scripted_displacement_m": float(np.linalg.norm(final_xy - start_xy)),
            "scripted_success": bool(toy.scripted_success[i]),
            "object_pixels": int(toy.object_mask[i].sum()),
            "object_queries": int(on_block[i])})
    return Problems(toy.history, toy.text_tokens, toy.text_mask, list(toy.instructions),
                    sources, queries, toy)


def clip_problems(config: Config, world: WorldModel, action_config: Config) -> Problems:
    """``num_problems`` clips of a ``build_clips`` directory, drawn with ``seed``."""
    directory = Path(config.problems)
    if not (directory / "manifest.json").exists():
        raise ValueError(f"config.problems={config.problems!r} is neither 'toy' nor a "
                         "build_clips directory (no manifest.json)")
    ds = ClipDataset(directory, history=int(world.history_frames), future=0)
    size = tuple(int(s) for s in action_config.model.img_size)
    if (ds.layout.height, ds.layout.width) != size:
        raise ValueError(f"clips in {directory} have {ds.layout.height}x{ds.layout.width} "
                         f"frames; the models take {size[0]}x{size[1]}")
    if ds.text_dim != int(action_config.model.language_dim):
        raise ValueError(f"clips in {directory} have text_dim {ds.text_dim}; the models read "
                         f"{action_config.model.language_dim}")
    n = min(int(config.num_problems), len(ds))
    picks = np.sort(np.random.default_rng(int(config.seed)).choice(len(ds), n, replace=False))
    names = json.loads((directory / ds.manifest["text"]["files"]["instructions"]).read_text())
    table = ds.index_table()
    items = [ds[int(i)] for i in picks]
    return Problems(
        np.stack([it["history"] for it in items]),
        np.stack([it["text_tokens"] for it in items]),
        np.stack([it["text_mask"] for it in items]),
        [names[int(table[i, 4])] for i in picks],
        [{"kind": "clip", "directory": str(directory), "clip": int(i),
          "episode_id": int(it["episode_id"]), "frame_index": int(it["frame_index"])}
         for i, it in zip(picks, items, strict=True)],
        np.broadcast_to(np.asarray(grid_queries(int(config.query_grid), *size)),
                        (n, int(config.query_grid) ** 2, 2)).astype(np.float32))


def build_problems(config: Config, world: WorldModel, action_config: Config) -> Problems:
    """Toy or clip problems as ``config.problems`` says."""
    if int(config.num_problems) < 1:
        raise ValueError(f"config.num_problems must be >= 1, got {config.num_problems}")
    if config.problems == "toy":
        return toy_problems(config, world, action_config)
    return clip_problems(config, world, action_config)
