"""Reads RLDS episodes (tfds prepared directories, TFRecord or ArrayRecord) into numpy.

Only the fields a schema names are decoded: other cameras are skipped undecoded, so reading
BridgeData's primary camera does not pay for the other three.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines.schemas import Schema


@dataclasses.dataclass
class Episode:
    """One episode as numpy.

    Attributes:
      index: ordinal of the episode in its split (stable: skipping bad records does not shift it).
      frames: uint8[T H W 3] of the chosen camera, as stored.
      instruction: the language instruction ('' when absent).
      embedding: float32[D] dataset sentence embedding, or None.
      depth: float32[T H W], segmentation: int32[T H W], object_poses: float32[T K 4 4],
        intrinsics: float32[3 3] when ground truth was requested, else None.
    """

    index: int
    frames: np.ndarray
    instruction: str
    embedding: np.ndarray | None = None
    depth: np.ndarray | None = None
    segmentation: np.ndarray | None = None
    object_poses: np.ndarray | None = None
    intrinsics: np.ndarray | None = None


def open_builder(rlds_dir: str | Path) -> Any:
    """Opens a prepared RLDS directory (``DIR/name/version``) with tfds.

    Raises:
      ValueError: when the directory is not a prepared tfds dataset.
    """
    import tensorflow_datasets as tfds

    rlds_dir = Path(rlds_dir)
    if not (rlds_dir / "dataset_info.json").exists():
        found = sorted(p.name for p in rlds_dir.iterdir())[:10] if rlds_dir.is_dir() else []
        raise ValueError(f"--rlds_dir {rlds_dir} is not a prepared RLDS dataset (no "
                         f"dataset_info.json; expected DIR/name/version); it contains {found}")
    return tfds.builder_from_directory(str(rlds_dir))


def feature_keys(builder: Any) -> list[str]:
    """All leaf feature paths of a dataset, e.g. ``steps/observation/image_0``."""
    import tensorflow_datasets as tfds

    keys: list[str] = []

    def walk(feature: Any, prefix: str) -> None:
        if isinstance(feature, tfds.features.Dataset):
            feature = feature.feature
        if isinstance(feature, tfds.features.FeaturesDict):
            for k, v in feature.items():
                walk(v, f"{prefix}/{k}" if prefix else k)
        else:
            keys.append(prefix)

    walk(builder.info.features, "")
    return sorted(keys)


def required_keys(schema: Schema, camera: str | None, *, embedding: bool,
                  ground_truth: bool) -> list[str]:
    """The keys a read with these options needs."""
    keys = [schema.image_key(camera)]
    if schema.language_key:
        keys.append(schema.language_key)
    if embedding:
        if not schema.embedding_key:
            raise ValueError(f"schema {schema.name!r} has no dataset language embedding; "
                             "use another --text backend")
        keys.append(schema.embedding_key)
    if ground_truth:
        if not schema.ground_truth_keys:
            raise ValueError(f"schema {schema.name!r} carries no ground-truth geometry (depth, "
                             "segmentation, object poses, intrinsics); use --tracker=lk or file")
        keys.extend(schema.ground_truth_keys)
    return keys


def check_keys(builder: Any, keys: list[str]) -> None:
    """Raises ValueError naming missing keys and listing every key the dataset has."""
    have = feature_keys(builder)
    missing = [k for k in keys if k not in have]
    if missing:
        raise ValueError(f"RLDS dataset {builder.info.name!r} has no key(s) {missing}; "
                         f"keys it has: {have}")


def num_episodes(builder: Any, split: str) -> int:
    """Number of episodes in ``split`` (ValueError listing the splits when absent)."""
    splits = builder.info.splits
    if split not in splits:
        raise ValueError(f"RLDS dataset {builder.info.name!r} has no split {split!r}; "
                         f"splits: {sorted(splits)}")
    return int(splits[split].num_examples)


def _get(tree: Any, key: str) -> Any:
    for part in key.split("/"):
        tree = tree[part]
    return tree


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace").strip()
    return str(value).strip()


def _ordinal_fn(builder: Any, split: str) -> Any:
    """Maps a tfds_id (``...-00003-of-00016__17``) to the episode's ordinal in the split."""
    lengths = list(builder.info.splits[split].shard_lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    pattern = re.compile(r"-(\d+)-of-(\d+)__(\d+)$")

    def ordinal(tfds_id: str) -> int:
        m = pattern.search(tfds_id)
        if m is None:
            raise ValueError(f"unexpected tfds_id {tfds_id!r}")
        return int(starts[int(m.group(1))] + int(m.group(3)))

    return ordinal


def read_episodes(
    builder: Any,
    schema: Schema,
    split: str,
    start: int,
    stop: int,
    *,
    camera: str | None = None,
    embedding: bool = False,
    ground_truth: bool = False,
    errors: dict[str, int] | None = None,
) -> Iterator[Episode]:
    """Yields episodes ``start:stop`` of ``split`` with the fields a schema names.

    Args:
      builder: from :func:`open_builder`.
      schema: where the fields are.
      split: split name.
      start, stop: episode range (ordinals in the split).
      camera: camera name (schema default when None).
      embedding: also read the dataset's sentence embedding.
      ground_truth: also read depth, segmentation, object poses and intrinsics.
      errors: if given, counts of records that could not be read are added here (reason -> n);
        unreadable records are skipped and the others keep their ordinals.

    Yields:
      Episode.
    """
    import tensorflow_datasets as tfds

    keys = required_keys(schema, camera, embedding=embedding, ground_truth=ground_truth)
    check_keys(builder, keys)
    image_key = schema.image_key(camera)

    # Skip decoding every image feature we do not use (other cameras cost most of the read).
    def skip_tree(feature: Any, prefix: str) -> Any:
        if isinstance(feature, tfds.features.Dataset):
            return skip_tree(feature.feature, prefix)
        if isinstance(feature, tfds.features.FeaturesDict):
            out = {}
            for k, v in feature.items():
                path = f"{prefix}/{k}" if prefix else k
                sub = skip_tree(v, path)
                if sub:
                    out[k] = sub
            return out
        if isinstance(feature, tfds.features.Image) and prefix not in keys:
            return tfds.decode.SkipDecoding()
        return None

    decoders = skip_tree(builder.info.features, "") or None
    step_keys = [k for k in keys if k.startswith("steps/")]
    episode_keys = [k for k in keys if not k.startswith("steps/")]
    if "array_record" in str(builder.info.file_format).lower():
        rows = _array_record_rows(builder, split, start, stop, decoders, step_keys,
                                  episode_keys)
    else:
        rows = _tfrecord_rows(builder, split, start, stop, decoders, step_keys, episode_keys)
    seen = set()
    for index, ex in rows:
        seen.add(index)
        text = ""
        if schema.language_key:
            raw = ex[schema.language_key]
            values = [_text(v) for v in np.atleast_1d(raw)]
            text = next((v for v in values if v), "")
        ep = Episode(index=index, frames=ex[image_key], instruction=text)
        if embedding:
            emb = np.asarray(ex[schema.embedding_key], np.float32)
            ep.embedding = emb[0] if emb.ndim == 2 else emb
        if ground_truth:
            ep.depth = np.asarray(ex[schema.depth_key], np.float32)
            ep.segmentation = np.asarray(ex[schema.segmentation_key], np.int32)
            ep.object_poses = np.asarray(ex[schema.object_poses_key], np.float32)
            ep.intrinsics = np.asarray(ex[schema.intrinsics_key], np.float32)
        yield ep
    if errors is not None:
        lost = (stop - start) - len(seen)
        if lost:
            errors["unreadable RLDS record"] = errors.get("unreadable RLDS record", 0) + lost


def _tfrecord_rows(builder: Any, split: str, start: int, stop: int, decoders: Any,
                   step_keys: list[str], episode_keys: list[str]) -> Iterator[tuple[int, dict]]:
    """(ordinal, {key: array}) per readable episode, through tf.data (TFRecord datasets)."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    ds = builder.as_dataset(split=f"{split}[{start}:{stop}]", shuffle_files=False,
                            decoders=decoders, read_config=tfds.ReadConfig(add_tfds_id=True))

    @tf.autograph.experimental.do_not_convert
    def select(ep: Any) -> Any:
        steps = ep["steps"].batch(1 << 30).get_single_element()
        out = {k: _get(steps, k[len("steps/"):]) for k in step_keys}
        out.update({k: _get(ep, k) for k in episode_keys})
        out["tfds_id"] = ep["tfds_id"]
        return out

    # A record that fails to parse or decode is dropped here and counted by the caller.
    ds = ds.map(select, num_parallel_calls=2).ignore_errors()
    ordinal = _ordinal_fn(builder, split)
    for ex in tfds.as_numpy(ds):
        yield ordinal(_text(ex["tfds_id"])), ex


def _array_record_rows(builder: Any, split: str, start: int, stop: int, decoders: Any,
                       step_keys: list[str], episode_keys: list[str]
                       ) -> Iterator[tuple[int, dict]]:
    """(ordinal, {key: array}) per readable episode, by random access (ArrayRecord datasets:
    tfds serves them as data sources, not through tf.data)."""
    source = builder.as_data_source(split=split, decoders=decoders)
    for index in range(start, stop):
        try:
            ep = source[index]
            steps = ep["steps"]
            rows = [steps[i] for i in range(len(steps))]
            out = {k: np.stack([np.asarray(_get(r, k[len("steps/"):])) for r in rows])
                   for k in step_keys}
            out.update({k: _get(ep, k) for k in episode_keys})
        except Exception:  # any decode failure: skip and count, as tf.data does above
            continue
        yield index, out
