"""The embedded toy world written as a real RLDS dataset (``python -m data_pipelines.toy``).

Per step: RGB, metric depth, segmentation, the camera_from_object pose of every surface (so
tracks are exact), the gripper state and action, and the instruction; per episode:
intrinsics, extrinsics, task, target and success.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines.rlds_writer import step_features, write_rlds
from data_pipelines.toy.tasks import ToyEpisode, episode_rng, sample_episode
from data_pipelines.toy.world import ToyConfig, camera_poses, render_rgb_uint8

NAME, VERSION = "toy_world", "1.0.0"


def features(config: ToyConfig) -> Any:
    """The tfds FeaturesDict of the toy world (RLDS layout)."""
    import tensorflow_datasets as tfds

    f = tfds.features
    n = config.image_size
    return f.FeaturesDict({
        "steps": f.Dataset({
            "observation": f.FeaturesDict({
                "image": f.Image(shape=(n, n, 3), encoding_format="png"),
                "depth": f.Tensor(shape=(n, n), dtype=np.float32, encoding="zlib"),
                "segmentation": f.Tensor(shape=(n, n), dtype=np.uint8, encoding="zlib"),
                "object_poses": f.Tensor(shape=(None, 4, 4), dtype=np.float32, encoding="zlib"),
                "state": f.Tensor(shape=(4,), dtype=np.float32),
            }),
            **step_features(4),
        }),
        "episode_metadata": f.FeaturesDict({
            "episode_id": f.Scalar(dtype=np.int64),
            "intrinsics": f.Tensor(shape=(3, 3), dtype=np.float32),
            "world_from_camera": f.Tensor(shape=(4, 4), dtype=np.float32),
            "task": f.Text(),
            "target_object": f.Scalar(dtype=np.int32),
            "target_position": f.Tensor(shape=(2,), dtype=np.float32),
            "success": f.Scalar(dtype=np.bool_),
            "failure_mode": f.Text(),
        }),
    })


def _png(rgb: np.ndarray) -> io.BytesIO:
    # OpenCV encodes PNG ~20x faster than the TensorFlow op tfds would use on an array.
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return io.BytesIO(buf.tobytes())


def to_rlds(episode: ToyEpisode, index: int) -> dict[str, Any]:
    """Renders a scripted episode into an RLDS episode dict."""
    cfg = episode.scene.config
    render = render_rgb_uint8(episode.scene)
    t_len = len(episode.poses)
    # Actions: the commanded gripper change, ~1 unit per cm as in Meta-World; grip +1 closes.
    delta = np.diff(episode.gripper, axis=0, append=episode.gripper[-1:])
    action = np.concatenate([np.clip(delta[:, :3] / 0.01, -1, 1),
                             np.where(delta[:, 3:] < 0, 1.0, np.where(delta[:, 3:] > 0, -1.0, 0))],
                            -1).astype(np.float32)
    steps = []
    for t in range(t_len):
        rgb, seg, depth = render(episode.poses[t])
        last = t == t_len - 1
        steps.append({
            "observation": {
                "image": _png(rgb), "depth": depth, "segmentation": seg.astype(np.uint8),
                "object_poses": camera_poses(cfg, episode.poses[t]),
                "state": episode.gripper[t],
            },
            "action": action[t],
            "language_instruction": episode.task.instruction,
            "reward": float(last and episode.success),
            "discount": 1.0,
            "is_first": t == 0, "is_last": last, "is_terminal": last,
        })
    return {
        "steps": steps,
        "episode_metadata": {
            "episode_id": index,
            "intrinsics": cfg.intrinsics,
            "world_from_camera": np.linalg.inv(cfg.camera_from_world).astype(np.float32),
            "task": episode.task.kind,
            "target_object": 4 + episode.task.block,
            "target_position": np.asarray(episode.task.target, np.float32),
            "success": episode.success,
            "failure_mode": episode.failure,
        },
    }


def episodes(config: ToyConfig, split: str, count: int, seed: int,
             progress: bool = False) -> Iterator[dict[str, Any]]:
    """Yields ``count`` rendered RLDS episodes of ``split``."""
    from tqdm import tqdm

    for i in tqdm(range(count), desc=f"toy world {split}", unit="ep", disable=not progress):
        yield to_rlds(sample_episode(episode_rng(seed, split, i), config), i)


def build(out: str | Path, episodes_per_split: dict[str, int], *, seed: int = 0,
          config: ToyConfig = ToyConfig(), file_format: str = "tfrecord",
          progress: bool = False) -> Path:
    """Writes the toy world RLDS dataset.

    Args:
      out: root directory; the dataset lands in ``out/toy_world/1.0.0``.
      episodes_per_split: e.g. ``{"train": 64, "val": 8}``.
      seed: dataset seed.
      config: world parameters.
      file_format: ``tfrecord`` or ``array_record``.
      progress: show a progress bar per split.

    Returns:
      The dataset directory.
    """
    for split, n in episodes_per_split.items():
        if n <= 0:
            raise ValueError(f"split {split!r} needs at least one episode, got {n}")
    splits = {split: (lambda s=split, n=n: episodes(config, s, n, seed, progress))
              for split, n in episodes_per_split.items()}
    desc = f"flipjax toy world, seed {seed}, config {dataclasses.asdict(config)}"
    return write_rlds(out, NAME, features(config), splits, version=VERSION, description=desc,
                      file_format=file_format)
