"""Writes episodes from Python into a real RLDS dataset (a prepared tfds directory).

The toy world, the test fixtures in the BridgeData/LIBERO layouts and the simulator datasets
all go through this one writer, so everything downstream reads them with
``tfds.builder_from_directory`` exactly as it reads the published datasets.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

Episode = Mapping[str, Any]


def step_features(action_dim: int) -> dict[str, Any]:
    """The RLDS step fields every flipjax dataset shares (all but ``observation``): action,
    instruction, reward, discount and the episode-boundary flags, as tfds features."""
    import numpy as np
    import tensorflow_datasets as tfds

    f = tfds.features
    return {
        "action": f.Tensor(shape=(action_dim,), dtype=np.float32),
        "language_instruction": f.Text(),
        "reward": f.Scalar(dtype=np.float32),
        "discount": f.Scalar(dtype=np.float32),
        "is_first": f.Scalar(dtype=np.bool_),
        "is_last": f.Scalar(dtype=np.bool_),
        "is_terminal": f.Scalar(dtype=np.bool_),
    }


def write_rlds(
    data_dir: str | Path,
    name: str,
    features: Any,
    splits: Mapping[str, Callable[[], Iterable[Episode]]],
    *,
    version: str = "1.0.0",
    description: str = "",
    file_format: str = "tfrecord",
) -> Path:
    """Writes an RLDS dataset ``data_dir/name/version`` with tfds.

    Args:
      data_dir: root directory; the dataset lands in ``data_dir/name/version``.
      name: dataset name (snake_case, as tfds names builders).
      features: a ``tfds.features.FeaturesDict`` with ``steps`` (a ``tfds.features.Dataset``)
        and any episode-level keys such as ``episode_metadata``.
      splits: split name -> zero-argument callable yielding episodes as nested dicts whose
        ``steps`` value is a list of step dicts (or a dict of stacked arrays).
      version: dataset version directory name.
      description: stored in ``dataset_info.json``.
      file_format: ``"tfrecord"`` (as BridgeData V2 / LIBERO ship) or ``"array_record"``.

    Returns:
      The prepared dataset directory ``data_dir/name/version``.
    """
    import tensorflow_datasets as tfds

    class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(version)
        RELEASE_NOTES = {version: "Written by flipjax."}  # noqa: RUF012 (tfds API)

        def _info(self) -> Any:
            return tfds.core.DatasetInfo(builder=self, description=description,
                                         features=features)

        def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
            del dl_manager  # Nothing is downloaded: episodes come from Python.
            return {split: self._generate_examples(fn) for split, fn in splits.items()}

        def _generate_examples(self, fn: Callable[[], Iterable[Episode]]) -> Any:
            yield from enumerate(fn())

    _Builder.name = name
    tfds.disable_progress_bar()  # the callers report progress per episode themselves
    data_dir = Path(data_dir)
    out = data_dir / name / version
    if out.exists():
        shutil.rmtree(out)
    with tempfile.TemporaryDirectory() as downloads:
        builder = _Builder(data_dir=str(data_dir), file_format=file_format)
        builder.download_and_prepare(
            download_dir=downloads,
            download_config=tfds.download.DownloadConfig(verify_ssl=False),
        )
    return out
