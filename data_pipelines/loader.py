"""Clip shards -> random-access clips (``ClipDataset``) -> grain batches as global jax.Arrays.

No TensorFlow here: the loader needs only numpy, array_record and grain, so trainers on GPU
clusters and TPU pods read the shards ``build_clips`` wrote without the conversion stack.

A clip is assembled from its current frame's record: ``history`` frames up to and including
the current one and ``future`` frames after it, clamped at the episode ends (the first or last
frame repeats, as the paper pads). Because frames are stored once, ``history``/``future`` may
differ from the values the clips were built with (action module 16 + 0, dynamics 4 + 15).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines import records


class ClipDataset:
    """Random access to the clips of a ``build_clips`` output directory.

    ``ds[i]`` returns a dict:
      history uint8[Th H W 3], future uint8[Tf H W 3], tracks float32[N L 2] (pixels of the
      prepared frame), visible bool[N L], text_tokens float32[Lt D], text_mask bool[Lt],
      episode_id int64, frame_index int64 (the current frame's index in its episode).
    """

    def __init__(self, directory: str | Path, history: int | None = None,
                 future: int | None = None, verify: bool = False):
        """Opens a clip directory.

        Args:
          directory: the ``--out`` of build_clips (holds manifest.json).
          history: frames up to and including the current one (manifest default when None).
          future: frames after the current one (manifest default when None).
          verify: also check every file's CRC32 against the manifest (reads all data once).

        Raises:
          ValueError: missing or malformed manifest, missing or truncated shard files (named).
        """
        self.directory = Path(directory)
        path = self.directory / "manifest.json"
        if not path.exists():
            raise ValueError(f"{self.directory} has no manifest.json: not a build_clips output "
                             "(or the build has not finished)")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format_version") != records.FORMAT_VERSION:
            raise ValueError(f"{path}: format_version {self.manifest.get('format_version')} "
                             f"is not {records.FORMAT_VERSION}; rebuild the clips")
        try:
            lay = self.manifest["layout"]
            self.layout = records.Layout(lay["height"], lay["width"], lay["grid"],
                                         lay["horizon"])
            defaults = (lay["history"], lay["future"], lay["text_tokens"], lay["text_dim"])
            shards = [(s["stem"], s["files"]) for s in self.manifest["shards"]]
            self._text_ids = [np.asarray(s["text_ids"], np.int64)
                              for s in self.manifest["shards"]]
            text_files = self.manifest["text"]["files"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path} lacks {e}: not a complete build_clips manifest") from e
        self.history = int(defaults[0] if history is None else history)
        self.future = int(defaults[1] if future is None else future)
        if self.history < 1 or self.future < 0:
            raise ValueError(f"history must be >= 1 and future >= 0, got {self.history}, "
                             f"{self.future}")
        self.text_tokens, self.text_dim = int(defaults[2]), int(defaults[3])
        self._stems = [self.directory / stem for stem, _ in shards]
        for stem, (_, files) in zip(self._stems, shards, strict=True):
            for role, p in records.shard_files(stem).items():
                if role not in files:
                    raise ValueError(f"{path}: shard {stem.name} lists no {role} file")
                want = files[role]
                if not p.exists():
                    raise ValueError(f"clip shard file {p} is missing")
                if p.stat().st_size != want["bytes"]:
                    raise ValueError(f"clip shard file {p} is corrupt: {p.stat().st_size} bytes, "
                                     f"manifest says {want['bytes']}; rebuild it (build_clips "
                                     "resumes and rewrites bad shards)")
                if verify and records.file_crc32(p) != want["crc32"]:
                    raise ValueError(f"clip shard file {p} is corrupt: CRC32 mismatch")
        self._index = [np.load(records.shard_files(s)["index"]) for s in self._stems]
        counts = [len(ix) for ix in self._index]
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._offsets_tail = self._offsets[1:]
        self._readers: dict[tuple[int, str], Any] = {}
        self._text_paths = {k: self.directory / text_files[k] for k in ("tokens", "mask")}
        for p in self._text_paths.values():
            if not p.exists():
                raise ValueError(f"text table {p} is missing (the build did not finish)")
        self._text: tuple[np.ndarray, np.ndarray] | None = None
        self._window = np.arange(-self.history + 1, self.future + 1)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    # Readers and text tables are per process: grain pickles the dataset into its workers.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_readers"], state["_text"] = {}, None
        return state

    def _reader(self, shard: int, role: str) -> Any:
        key = (shard, role)
        if key not in self._readers:
            from array_record.python.array_record_module import ArrayRecordReader

            path = records.shard_files(self._stems[shard])[role]
            try:
                self._readers[key] = ArrayRecordReader(str(path), records.READER_OPTIONS)
            except Exception as e:
                raise ValueError(f"clip shard file {path} is unreadable: {e}") from e
        return self._readers[key]

    def _text_table(self) -> tuple[np.ndarray, np.ndarray]:
        if self._text is None:
            # Memory-mapped: token states of many instructions stay in the page cache.
            try:
                self._text = (np.load(self._text_paths["tokens"], mmap_mode="r"),
                              np.load(self._text_paths["mask"]))
            except (OSError, ValueError) as e:
                raise ValueError(f"text table in {self.directory} is unreadable: {e}") from e
        return self._text

    def index_table(self) -> np.ndarray:
        """Per-clip bookkeeping of the whole dataset, without reading frames or tracks.

        Returns:
          int64[R 5], one row per clip in global clip order, columns
          ``records.INDEX_FIELDS``: episode_id, frame_index, episode_length, episode_start
          (the *global* clip index of the episode's frame 0, so ``ds[start + k]`` is its
          frame k) and text_id (the row of the dataset's merged text table, equal for clips
          with the same instruction).
        """
        tables = []
        for shard, ix in enumerate(self._index):
            t = np.array(ix, np.int64).reshape(-1, len(records.INDEX_FIELDS))
            t[:, 3] += self._offsets[shard]
            t[:, 4] = self._text_ids[shard][t[:, 4]]
            tables.append(t)
        if not tables:
            return np.zeros((0, len(records.INDEX_FIELDS)), np.int64)
        return np.concatenate(tables)

    def locate(self, i: int) -> tuple[int, int]:
        """Global clip index -> (shard, record index in the shard)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"clip index {i} out of range for {n} clips")
        i %= n
        shard = int(np.searchsorted(self._offsets_tail, i, side="right"))
        return shard, int(i - self._offsets[shard])

    def __getitem__(self, i: int) -> dict[str, Any]:
        shard, local = self.locate(int(i))
        episode_id, frame_index, length, start, text_id = self._index[shard][local]
        rows = start + np.clip(frame_index + self._window, 0, length - 1)
        lo, hi = int(rows[0]), int(rows[-1])
        stem = self._stems[shard]
        try:
            raw = self._reader(shard, "frames").read(lo, hi + 1)
            frames = self.layout.decode_frames(raw, rows - lo)
            tracks, visible = self.layout.decode_tracks(
                self._reader(shard, "tracks").read([local])[0])
        except Exception as e:
            raise ValueError(f"clip shard {stem} is corrupt (record {local}): {e}") from e
        tokens, mask = self._text_table()
        text_id = self._text_ids[shard][text_id]
        return {
            "history": frames[:self.history],
            "future": frames[self.history:],
            "tracks": tracks,
            "visible": visible,
            "text_tokens": tokens[text_id].astype(np.float32),
            "text_mask": mask[text_id].copy(),
            "episode_id": np.int64(episode_id),
            "frame_index": np.int64(frame_index),
        }


@dataclasses.dataclass(frozen=True)
class Augment:
    """Per-clip augmentation: a random subset of the tracked points and track noise.

    Attributes:
      num_points: keep this many points, drawn without replacement (None keeps all).
      track_noise: std (pixels) of Gaussian noise added to the positions after the start; the
        query points themselves stay exact because the model is given them.
      moving_fraction: with ``num_points``, draw up to this fraction of the subset from the
        moving points (a step longer than ``MOVING_STEP_PX``, the evaluation's moving mask)
        and the rest from the others; fewer moving points than asked are all kept. 0 draws
        uniformly. On tabletop clips a handful of the grid's points move, so a uniform subset
        teaches mostly "stay put" (motion-aware sampling, as in ATM).
    """

    num_points: int | None = None
    track_noise: float = 0.0
    moving_fraction: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.moving_fraction <= 1.0:
            raise ValueError(f"moving_fraction must lie in [0, 1], got {self.moving_fraction}")
        if self.moving_fraction > 0 and self.num_points is None:
            raise ValueError("moving_fraction needs num_points (the size of the subset)")

    def __call__(self, clip: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        tracks, visible = clip["tracks"], clip["visible"]
        if self.num_points is not None:
            n = tracks.shape[0]
            if self.num_points > n:
                raise ValueError(f"num_points={self.num_points} exceeds the {n} tracked points")
            if self.moving_fraction > 0:
                keep = _motion_aware_subset(tracks, self.num_points, self.moving_fraction, rng)
            else:
                keep = rng.choice(n, self.num_points, replace=False)
            tracks, visible = tracks[keep], visible[keep]
        if self.track_noise > 0:
            tracks = tracks.copy()
            tracks[:, 1:] += rng.normal(0.0, self.track_noise,
                                        tracks[:, 1:].shape).astype(np.float32)
        return {**clip, "tracks": tracks, "visible": visible}


MOVING_STEP_PX = 1.0  # flipjax.metrics.moving_steps' threshold


def _motion_aware_subset(tracks: np.ndarray, k: int, fraction: float,
                         rng: np.random.Generator) -> np.ndarray:
    """int[k] distinct point indices, up to round(fraction * k) of them moving ones."""
    steps = np.linalg.norm(np.diff(tracks, axis=1), axis=-1)
    moving = np.flatnonzero((steps > MOVING_STEP_PX).any(axis=1))
    still = np.setdiff1d(np.arange(len(tracks)), moving)
    m = min(len(moving), round(fraction * k))
    m = max(m, k - len(still))  # too few still points: more moving ones
    return np.concatenate([rng.choice(moving, m, replace=False),
                           rng.choice(still, k - m, replace=False)])


class ClipLoader:
    """Iterator of batches from ``make_loader``; its state can be checkpointed and restored.

    Each ``next()`` returns a dict with the ClipDataset keys (from ``make_batch_loader``: the
    source's item keys) and a leading batch axis B (the global batch). With a mesh, every
    value is a global ``jax.Array`` sharded over the mesh's batch axes (``data`` x ``fsdp``);
    without one, numpy arrays of this process's share.
    """

    def __init__(self, iter_dataset: Any, sharding: Any, steps_per_epoch: int):
        self._dataset = iter_dataset
        self._iter = iter(iter_dataset)
        self._sharding = sharding
        self.steps_per_epoch = steps_per_epoch

    def __iter__(self) -> ClipLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        batch = next(self._iter)
        if self._sharding is None:
            return batch
        import jax

        return {k: jax.make_array_from_process_local_data(self._sharding, np.asarray(v))
                for k, v in batch.items()}

    def get_state(self) -> dict[str, Any]:
        """The iterator position (JSON-serialisable); save it with the model checkpoint."""
        return self._iter.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a position saved by :meth:`get_state`."""
        self._iter.set_state(state)


def make_loader(
    dataset: ClipDataset | str | Path,
    global_batch_size: int,
    *,
    mesh: Any = None,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    num_points: int | None = None,
    track_noise: float = 0.0,
    moving_fraction: float = 0.0,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    num_threads: int = 2,
    prefetch: int = 4,
    drop_remainder: bool = True,
) -> ClipLoader:
    """A grain pipeline over clips: shard per process, shuffle, augment, batch, prefetch.

    Args:
      dataset: a ClipDataset or a build_clips output directory.
      global_batch_size: batch size over all processes (divisible by their number).
      mesh: deliver global jax.Arrays sharded over the mesh's batch axes; None gives numpy.
      seed: shuffling and augmentation seed (the same on every process).
      shuffle: reshuffle every epoch.
      num_epochs: None repeats forever.
      num_points, track_noise, moving_fraction: augmentation (see Augment).
      process_index, process_count: this process's share (default: jax's); processes read
        disjoint, equally long slices so their step counts agree.
      worker_count: grain worker processes (0 reads in this process with threads).
      num_threads: reader threads per process.
      prefetch: batches to prefetch.
      drop_remainder: drop the last partial batch of a finite run.

    Returns:
      ClipLoader.
    """
    if not isinstance(dataset, ClipDataset):
        dataset = ClipDataset(dataset)
    augment = None
    if num_points is not None or track_noise > 0 or moving_fraction > 0:
        augment = Augment(num_points, track_noise, moving_fraction)  # validates them
    return make_batch_loader(
        dataset, global_batch_size, mesh=mesh, seed=seed, shuffle=shuffle,
        num_epochs=num_epochs, random_map=augment, process_index=process_index,
        process_count=process_count, worker_count=worker_count, num_threads=num_threads,
        prefetch=prefetch, drop_remainder=drop_remainder, what="clips")


def make_batch_loader(
    source: Sequence[Any],
    global_batch_size: int,
    *,
    mesh: Any = None,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    random_map: Callable[[Any, np.random.Generator], Any] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    num_threads: int = 2,
    prefetch: int = 4,
    drop_remainder: bool = True,
    what: str = "items",
) -> ClipLoader:
    """The machinery of :func:`make_loader` for any random-access source of items.

    Items are dicts of arrays (or anything ``random_map`` turns into one). The pipeline is
    the same as for clips: equal disjoint per-process slices, seeded per-epoch shuffling,
    repetition, an optional seeded per-item random transform, batching, prefetching and
    checkpointable iterator state.

    Args:
      source: ``len`` and ``__getitem__`` (a ClipDataset, a list of episode ids, ...);
        pickleable when ``worker_count > 0``.
      global_batch_size: batch size over all processes (divisible by their number).
      mesh: deliver global jax.Arrays sharded over the mesh's batch axes; None gives numpy.
      seed: shuffling seed; ``random_map`` draws from ``seed + 1``.
      shuffle: reshuffle every epoch.
      num_epochs: None repeats forever.
      random_map: ``(item, np.random.Generator) -> item``, seeded per item and epoch so a
        restored iterator repeats the same draws.
      process_index, process_count: this process's share (default: jax's).
      worker_count: grain worker processes (0 reads in this process with threads).
      num_threads: reader threads per process.
      prefetch: batches to prefetch.
      drop_remainder: drop the last partial batch of a finite run.
      what: what the items are called in error messages.

    Returns:
      ClipLoader.
    """
    import grain

    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by "
                         f"{process_count} processes")
    local_batch = global_batch_size // process_count
    per_process = len(source) // process_count
    if per_process < local_batch:
        raise ValueError(f"{len(source)} {what} give {per_process} per process, fewer than the "
                         f"local batch {local_batch}")
    ds = grain.MapDataset.source(source)
    # Equal, disjoint slices: process p reads items p, p + P, p + 2P, ...
    ds = ds[:per_process * process_count][process_index::process_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    if random_map is not None:
        ds = ds.random_map(random_map, seed=seed + 1)
    ds = ds.batch(local_batch, drop_remainder=drop_remainder)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                              prefetch_buffer_size=prefetch))
    if worker_count > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    sharding = None
    if mesh is not None:
        from flipjax.sharding import batch_sharding

        sharding = batch_sharding(mesh)
    return ClipLoader(it, sharding, per_process // local_batch)
