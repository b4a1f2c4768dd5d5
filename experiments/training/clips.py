"""Clip data for every trainer: data directories, toy clips built on demand, checks, loaders.

A trainer states what its model needs (frame size, track horizon, history and future frames,
text width) as a :class:`ClipSpec`; :func:`open_clips` opens ``build_clips`` shards, building
toy-world clips first when ``config.build_toy_data_if_missing`` is set and the directory has
none, and refuses shards that do not fit the model with a message naming every mismatch.
Frames are stored once per episode, so one toy build serves every module (the quickstart's
action, dynamics and value models read the same clips with different history/future splits).
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Any

import ml_collections
from absl import logging
from jax.sharding import Mesh

from data_pipelines.loader import ClipDataset, ClipLoader, make_loader

TOY_DIR = "toy_data"


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """What a model needs from clips.

    Attributes:
      image_size: (H, W) of the prepared frames.
      horizon: track length L (frames per track, the current one included); None: any.
      history: frames up to and including the current one.
      future: frames after the current one.
      text_dim: width D of the text tokens; None: any.
    """

    image_size: tuple[int, int]
    horizon: int | None
    history: int
    future: int
    text_dim: int | None


def data_dirs(config: ml_collections.ConfigDict, workdir: str | Path) -> tuple[Path, Path]:
    """(training clips, evaluation clips) after applying the defaults.

    Empty ``data_dir`` with ``build_toy_data_if_missing`` means ``<workdir>/toy_data/train``
    (and ``.../val`` for evaluation); an empty ``eval_data_dir`` otherwise means the training
    clips.

    Raises:
      ValueError: when ``data_dir`` is empty and toy data may not be built.
    """
    toy = Path(workdir) / TOY_DIR
    if config.data_dir:
        train_dir = Path(config.data_dir)
    elif config.build_toy_data_if_missing:
        train_dir = toy / "train"
    else:
        raise ValueError("config.data_dir is empty: point it at a build_clips output "
                         "(--config.data_dir=DIR) or set --config.build_toy_data_if_missing")
    if config.eval_data_dir:
        eval_dir = Path(config.eval_data_dir)
    elif config.build_toy_data_if_missing and not config.data_dir:
        eval_dir = toy / "val"
    else:
        eval_dir = train_dir
    return train_dir, eval_dir


def build_toy_clips(config: ml_collections.ConfigDict, split: str, out: str | Path,
                    spec: ClipSpec) -> None:
    """Renders the toy world's ``split`` and builds ground-truth-tracked clips into ``out``.

    Uses ``config.toy_episodes`` / ``toy_val_episodes`` episodes, a ``toy_grid`` query grid and
    hash text embeddings of width ``spec.text_dim`` (``toy_text_max_tokens`` tokens).

    Raises:
      ValueError: for non-square frames (the toy world renders square images).
    """
    from data_pipelines import toy
    from data_pipelines.build_clips import BuildOptions, build_clips
    from data_pipelines.toy.world import ToyConfig

    out = Path(out)
    h, w = spec.image_size
    if h != w:
        raise ValueError(f"the toy world renders square images; the model needs {h}x{w}")
    if spec.horizon is None or spec.text_dim is None:
        raise ValueError("toy clips need a concrete horizon and text_dim in the ClipSpec")
    failure = float(config.get("toy_failure_fraction", 0.0))
    if not 0.0 <= failure <= 1.0:
        raise ValueError(f"toy_failure_fraction must lie in [0, 1], got {failure}")
    episodes = {"train": config.toy_episodes, "val": config.toy_val_episodes}[split]
    logging.info("building toy %s clips (%d episodes) in %s", split, episodes, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        rlds = toy.build(tmp, {split: episodes}, seed=int(config.seed),
                         config=ToyConfig(image_size=h,
                                          speed=float(config.get("toy_speed", 0.015)),
                                          failure_fraction=failure))
        staging = out.parent / (out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        build_clips(BuildOptions(
            rlds_dir=str(rlds), out=str(staging), schema="toy", split=split,
            size=(h, w), grid=int(config.toy_grid), horizon=spec.horizon,
            history=spec.history, future=spec.future, tracker="ground_truth", text="hash",
            text_dim=spec.text_dim, text_max_tokens=int(config.toy_text_max_tokens),
            progress=False))
        # Renamed only when complete, so an interrupted build is redone, never half-read.
        staging.rename(out)


def open_clips(config: ml_collections.ConfigDict, directory: str | Path, split: str,
               spec: ClipSpec) -> ClipDataset:
    """Opens a clip directory (building toy clips first when allowed) and checks it.

    Args:
      config: a trainer config (``build_toy_data_if_missing`` and the ``toy_*`` fields).
      directory: a ``build_clips`` output.
      split: "train" or "val" (which toy split to render when building).
      spec: what the model needs.

    Returns:
      The dataset, reading ``spec.history`` + ``spec.future`` frames per clip.

    Raises:
      ValueError: a missing directory (when toy data may not be built) or clips that do not
        fit the model (every mismatch is named).
    """
    directory = Path(directory)
    if not (directory / "manifest.json").exists():
        if config.build_toy_data_if_missing:
            build_toy_clips(config, split, directory, spec)
        elif not directory.exists():
            raise ValueError(f"data directory {directory} does not exist (config.data_dir / "
                             "config.eval_data_dir); build clips with "
                             "`python -m data_pipelines.build_clips`")
    ds = ClipDataset(directory, history=spec.history, future=spec.future)
    lay = ds.layout
    problems = []
    if spec.horizon is not None and lay.horizon != spec.horizon:
        problems.append(f"track horizon {lay.horizon} != the model's {spec.horizon}")
    if (lay.height, lay.width) != tuple(spec.image_size):
        problems.append(f"frames {lay.height}x{lay.width} != the model's image size "
                        f"{tuple(spec.image_size)}")
    if spec.text_dim is not None and ds.text_dim != spec.text_dim:
        problems.append(f"text_dim {ds.text_dim} != the model's language width {spec.text_dim}")
    if problems:
        raise ValueError(f"clips in {directory} do not fit the model: " + "; ".join(problems))
    return ds


def clip_loader(config: ml_collections.ConfigDict, ds: ClipDataset, mesh: Mesh, *,
                shuffle: bool, augment: bool, **kwargs: Any) -> ClipLoader:
    """The grain loader of ``ds`` with the config's batch size, seed and worker settings.

    ``augment`` applies ``config.num_points`` / ``config.track_noise`` /
    ``config.moving_fraction`` when the config has them. Extra keyword arguments go to
    :func:`data_pipelines.loader.make_loader`.
    """
    num_points = int(config.get("num_points", 0) or 0) if augment else 0
    noise = float(config.get("track_noise", 0.0) or 0.0) if augment else 0.0
    moving = float(config.get("moving_fraction", 0.0) or 0.0) if augment else 0.0
    return make_loader(
        ds, int(config.batch_size), mesh=mesh, seed=int(config.seed), shuffle=shuffle,
        num_points=num_points or None, track_noise=noise, moving_fraction=moving,
        worker_count=int(config.data_workers), num_threads=int(config.data_threads), **kwargs)
