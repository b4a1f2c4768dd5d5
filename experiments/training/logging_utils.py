"""Metric writers of the training loop, built on clu's ``MetricWriter`` interface.

The loop writes every scalar once, through a clu ``MultiWriter`` of

* :class:`JsonlWriter`: ``workdir/metrics.jsonl``, one ``{"step", "split", **metrics}`` object
  per line (process 0; ``experiments.training.loop.read_metrics`` reads it back);
* clu's ``SummaryWriter``: TensorBoard event files in ``workdir/tensorboard`` (process 0),
  including eval sample images and the flattened config as hyperparameters;
* :class:`ConsoleWriter`: one concise absl log line per train/eval record (every process).

Keys are ``"<split>/<name>"`` (``train/loss``, ``eval/prior_ade``): TensorBoard groups its
charts by the prefix and the JSONL writer turns it into the record's ``split``. clu and
TensorBoard come with the ``train`` extra (``pip install -e ".[train]"``).
"""

from __future__ import annotations

import datetime
import json
import math
import resource
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging

try:
    from clu import metric_writers
except ImportError as e:  # pragma: no cover - depends on the installed extras
    raise ImportError('training needs clu and tensorboard: pip install -e ".[train]"') from e

TENSORBOARD_DIR = "tensorboard"
TRAIN, EVAL = "train", "eval"
# Videos go to TensorBoard as one strip of at most this many evenly spaced frames (clu's
# SummaryWriter cannot write videos).
MAX_STRIP_FRAMES = 8


def split_key(key: str) -> tuple[str, str]:
    """``"eval/psnr"`` -> ``("eval", "psnr")``; a key without a prefix belongs to ``train``."""
    split, sep, name = key.partition("/")
    return (split, name) if sep else (TRAIN, key)


def format_eta(seconds: float) -> str:
    """Seconds as ``H:MM:SS`` (negative and non-finite values as 0 / ``?``)."""
    if not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


def flatten_hparams(config: Any) -> dict[str, bool | int | float | str]:
    """A config (ConfigDict or nested mapping) as flat ``{"a.b": value}`` hyperparameters.

    TensorBoard's hparams accept only bools, numbers and strings, so None, tuples and lists
    become their ``str``.
    """
    tree = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    flat: dict[str, bool | int | float | str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for k in sorted(node):
                walk(f"{prefix}{k}.", node[k])
            return
        key = prefix[:-1]
        flat[key] = node if isinstance(node, bool | int | float | str) else str(node)

    walk("", tree)
    return flat


def video_strip(video: np.ndarray, max_frames: int = MAX_STRIP_FRAMES) -> np.ndarray:
    """A video as one image: up to ``max_frames`` evenly spaced frames side by side.

    Args:
      video: uint8[T H W C].
      max_frames: at most this many frames (the first and last always included).

    Returns:
      uint8[H (T' W) C] with T' = min(T, max_frames).
    """
    video = np.asarray(video)
    if video.ndim != 4:
        raise ValueError(f"video must be [T H W C], got shape {video.shape}")
    t = video.shape[0]
    idx = np.unique(np.linspace(0, t - 1, min(t, max_frames)).round().astype(int))
    return np.concatenate(list(video[idx]), axis=1)


def host_peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (``getrusage`` ``ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def device_peak_memory_mb() -> float | None:
    """Largest ``peak_bytes_in_use`` over the local devices in MiB, or None when the backend
    reports no memory statistics (CPU)."""
    peaks = []
    for d in jax.local_devices():
        try:
            stats = d.memory_stats()
        except Exception:  # some backends raise instead of returning None
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(stats["peak_bytes_in_use"])
    return max(peaks) / 2**20 if peaks else None


class _ScalarOnlyWriter(metric_writers.MetricWriter):
    """A MetricWriter that ignores everything but scalars (subclasses write those)."""

    def write_summaries(self, step: int, values: Mapping[str, Any],
                        metadata: Mapping[str, Any] | None = None) -> None:
        del step, values, metadata

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        del step, images

    def write_videos(self, step: int, videos: Mapping[str, Any]) -> None:
        del step, videos

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int) -> None:
        del step, audios, sample_rate

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        del step, texts

    def write_histograms(self, step: int, arrays: Mapping[str, Any],
                         num_buckets: Mapping[str, int] | None = None) -> None:
        del step, arrays, num_buckets

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        del hparams

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _group(scalars: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    groups: dict[str, dict[str, float]] = {}
    for key, value in scalars.items():
        split, name = split_key(key)
        groups.setdefault(split, {})[name] = float(np.asarray(value))
    return groups


class JsonlWriter(_ScalarOnlyWriter):
    """Appends ``{"step", "split", **metrics}`` lines to a JSONL file (``metrics.jsonl``).

    One call of :meth:`write_scalars` gives one line per key prefix (split). A resumed run
    appends to the same file, so it may hold a step twice around a preemption (the first copy
    came before the restored checkpoint). Hyperparameters are not written (the config is in
    every checkpoint's metadata).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        lines = [json.dumps({"step": int(step), "split": split, **values})
                 for split, values in _group(scalars).items()]
        if lines:
            with self.path.open("a") as f:
                f.write("".join(line + "\n" for line in lines))

    def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        """Appends one record of ``split`` (unprefixed metric names)."""
        self.write_scalars(step, {f"{split}/{k}": v for k, v in metrics.items()})


class ConsoleWriter(_ScalarOnlyWriter):
    """Logs one concise line per record through absl.

    Train: ``step 6/100 | loss 0.1234 | 3.21 steps/s | 25.7 examples/s | ETA 0:00:29`` (rates
    from the ``steps_per_s`` / ``examples_per_s`` scalars). Eval: ``eval step 6 (1.2s): a 0.5,
    b 0.25`` (the time from ``eval_seconds``).
    """

    def __init__(self, total_steps: int):
        self.total_steps = int(total_steps)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        for split, m in _group(scalars).items():
            if split == TRAIN and "loss" in m:
                rate = m.get("steps_per_s", float("nan"))
                eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
                logging.info("step %d/%d | loss %.4f | %.2f steps/s | %.1f examples/s | ETA %s",
                             step, self.total_steps, m["loss"], rate,
                             m.get("examples_per_s", float("nan")), format_eta(eta))
            else:
                seconds = m.pop("eval_seconds", None)
                took = f" ({seconds:.1f}s)" if seconds is not None else ""
                logging.info("%s step %d%s: %s", split, step, took,
                             ", ".join(f"{k} {v:.4f}" for k, v in sorted(m.items())))


def _tensorboard_writer(logdir: Path) -> metric_writers.MetricWriter:
    # TensorFlow (behind clu's SummaryWriter) must not claim accelerator memory that JAX
    # needs; hiding its GPUs before the first TF op keeps it on the host.
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # already initialised (e.g. by a data pipeline in this process)
        pass
    return metric_writers.SummaryWriter(str(logdir))


def write_sample_images(writer: metric_writers.MetricWriter, step: int,
                        samples: Mapping[str, np.ndarray]) -> None:
    """Writes eval samples as ``samples/<name>`` images: uint8 images [H W 3] as they are,
    videos [T H W 3] as a :func:`video_strip`."""
    images = {f"samples/{k}": (v if v.ndim == 3 else video_strip(v)) for k, v in samples.items()}
    if images:
        writer.write_images(step, images)


def create_writer(workdir: str | Path, total_steps: int, *, metrics_file: str = "metrics.jsonl",
                  tensorboard: bool = True) -> metric_writers.MultiWriter:
    """The loop's writer: JSONL + TensorBoard on process 0, console on every process.

    Args:
      workdir: run directory (``metrics_file`` and ``tensorboard/`` go there).
      total_steps: for the console's ``step i/N`` and ETA.
      metrics_file: name of the JSONL file in ``workdir``.
      tensorboard: False leaves out the event files.

    Returns:
      A clu MultiWriter; close it at the end of the run.
    """
    writers: list[metric_writers.MetricWriter] = [ConsoleWriter(total_steps)]
    if jax.process_index() == 0:
        writers.insert(0, JsonlWriter(Path(workdir) / metrics_file))
        if tensorboard:
            writers.insert(0, _tensorboard_writer(Path(workdir) / TENSORBOARD_DIR))
    return metric_writers.MultiWriter(writers)


__all__ = [
    "ConsoleWriter", "JsonlWriter", "create_writer", "device_peak_memory_mb", "flatten_hparams",
    "format_eta", "host_peak_rss_mb", "split_key", "video_strip", "write_sample_images",
]
