"""Episode-structured samples over clip shards, for time-contrastive (VIP / LIV) value learning.

The value module learns from whole episodes rather than single clips: each training sample is
one episode, its first state, a uniformly drawn consecutive pair (s_t, s_{t+1}) and its goal,
the last state. A *state* is the clip of ``clip_len`` frames ending at a frame (the episode's
first frame repeats before the episode starts, as the clip loader pads), so it is exactly the
``history`` of a :class:`~data_pipelines.loader.ClipDataset` opened with ``history=clip_len,
future=0`` whose current frame is that frame.

Episodes come from the dataset's index (:meth:`ClipDataset.index_table`); frames are read by
random access, so nothing but the four states of a sample is read. Batches come from the same
grain machinery as clip batches (:func:`data_pipelines.loader.make_batch_loader`): per-process
slices, seeded shuffling, a seeded per-sample draw of ``t``, checkpointable iterator state and
global ``jax.Array`` batches over the mesh's ``data`` x ``fsdp`` axes.

Clip shards carry no success flag, so every episode is taken to reach its goal (its last frame
shows the instruction done). That holds for demonstrations and for the toy world's default
builds (``failure_fraction=0``); failed episodes must be filtered out before ``build_clips``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from data_pipelines.loader import ClipDataset, ClipLoader, make_batch_loader

# Order of the states in a sample's ``states`` array.
STATE_NAMES = ("init", "state", "next", "goal")
# Columns of episode_table.
EPISODE_FIELDS = ("start", "length", "episode_id", "text_id")


def episode_table(dataset: ClipDataset, min_length: int = 2) -> np.ndarray:
    """The episodes of a clip dataset, in order of their first clip.

    Args:
      dataset: any ClipDataset.
      min_length: drop episodes with fewer frames (a VIP pair needs 2).

    Returns:
      int64[E 4] with columns :data:`EPISODE_FIELDS`: global clip index of frame 0, number of
      frames, episode_id and text_id (the instruction's row in the dataset's text table).

    Raises:
      ValueError: when the index is inconsistent (an episode's frames are not contiguous).
    """
    index = dataset.index_table()
    first = index[index[:, 1] == 0]
    table = np.stack([first[:, 3], first[:, 2], first[:, 0], first[:, 4]], axis=1)
    if int(table[:, 1].sum()) != len(index) or np.any(table[:, 0] != np.flatnonzero(
            index[:, 1] == 0)):
        raise ValueError(f"clip index of {dataset.directory} is inconsistent: episodes are not "
                         "contiguous runs of frames 0..length-1; rebuild the clips")
    return table[table[:, 1] >= min_length]


class VipSampler:
    """Reads VIP / LIV samples of a dataset's episodes.

    ``sampler(e, rng)`` (grain's ``random_map`` signature) draws t uniformly in
    [0, length - 2] for episode row ``e % num_episodes`` and returns :meth:`sample`.
    """

    def __init__(self, dataset: ClipDataset, min_length: int = 2):
        """Indexes the episodes of ``dataset``.

        Args:
          dataset: opened with ``history=clip_len`` and ``future=0``.
          min_length: shortest episode to use (at least 2).

        Raises:
          ValueError: a dataset with future frames, min_length < 2 or no usable episode.
        """
        if dataset.future != 0:
            raise ValueError(f"VipSampler: open the ClipDataset with future=0 (a state is the "
                             f"history clip ending at a frame), got future={dataset.future}")
        if min_length < 2:
            raise ValueError(f"min_length must be >= 2 (a consecutive pair), got {min_length}")
        self.dataset = dataset
        self.clip_len = dataset.history
        self.episodes = episode_table(dataset, min_length)
        if not len(self.episodes):
            raise ValueError(f"{dataset.directory} has no episode of at least {min_length} "
                             "frames")

    def __len__(self) -> int:
        return len(self.episodes)

    def sample(self, episode: int, t: int) -> dict[str, Any]:
        """The sample of episode row ``episode`` with the pair (t, t + 1).

        Args:
          episode: row of :attr:`episodes`.
          t: in [0, length - 2].

        Returns:
          dict with states uint8[4 Tc H W 3] (:data:`STATE_NAMES`: the clips ending at frames
          0, t, t+1 and length-1), frame_index int64[4] (those frames), episode_id int64,
          text_id int64, text_tokens float32[Lt D] and text_mask bool[Lt] (the instruction).
        """
        start, length, episode_id, text_id = (int(x) for x in self.episodes[episode])
        if not 0 <= t <= length - 2:
            raise ValueError(f"t={t} not in [0, {length - 2}] for episode {episode_id} of "
                             f"{length} frames")
        ends = np.array([0, t, t + 1, length - 1], np.int64)
        clips = [self.dataset[start + int(e)] for e in ends]
        goal = clips[-1]
        return {
            "states": np.stack([c["history"] for c in clips]),
            "frame_index": np.array([c["frame_index"] for c in clips], np.int64),
            "episode_id": np.int64(episode_id),
            "text_id": np.int64(text_id),
            "text_tokens": goal["text_tokens"],
            "text_mask": goal["text_mask"],
        }

    def __call__(self, item: int, rng: np.random.Generator) -> dict[str, Any]:
        episode = int(item) % len(self.episodes)
        length = int(self.episodes[episode, 1])
        return self.sample(episode, int(rng.integers(0, length - 1)))

    def states(self, episode: int, stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Every ``stride``-th state of an episode, the last one included (value curves).

        Args:
          episode: row of :attr:`episodes`.
          stride: frames between the ends of successive states.

        Returns:
          (states uint8[S Tc H W 3], their end frames int64[S]), S = (length - 1) // stride + 1,
          ends aligned so that the last state ends on the last frame (as
          ``flipjax.models.value.clip_state_indices``).
        """
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        start, length = int(self.episodes[episode, 0]), int(self.episodes[episode, 1])
        ends = np.arange((length - 1) % stride, length, stride, dtype=np.int64)
        return np.stack([self.dataset[start + int(e)]["history"] for e in ends]), ends


def make_episode_loader(dataset: ClipDataset, global_batch_size: int, *, mesh: Any = None,
                        seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                        min_length: int = 2, process_index: int | None = None,
                        process_count: int | None = None, worker_count: int = 0,
                        num_threads: int = 2, prefetch: int = 4) -> ClipLoader:
    """Batches of VIP / LIV samples (:meth:`VipSampler.sample`) with a leading batch axis B.

    An epoch visits every episode ``repeats = ceil(global_batch_size / E)`` times, so datasets
    with fewer episodes than a batch still fill it (the same episode may then appear twice in a
    batch, with its own t). Processes read disjoint episodes when ``repeats == 1``.

    Args:
      dataset: opened with ``history=clip_len`` and ``future=0``.
      global_batch_size: batch size over all processes.
      mesh: deliver global jax.Arrays sharded over the mesh's batch axes; None gives numpy.
      seed: shuffling seed; t is drawn from ``seed + 1`` per sample and epoch.
      shuffle: reshuffle every epoch.
      num_epochs: None repeats forever.
      min_length: shortest episode to use.
      process_index, process_count, worker_count, num_threads, prefetch: as
        :func:`data_pipelines.loader.make_loader`.

    Returns:
      ClipLoader (``get_state``/``set_state`` restore the exact position and draws).
    """
    sampler = VipSampler(dataset, min_length)
    repeats = max(1, math.ceil(global_batch_size / len(sampler)))
    items = list(range(len(sampler) * repeats))
    return make_batch_loader(
        items, global_batch_size, mesh=mesh, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
        random_map=sampler, process_index=process_index, process_count=process_count,
        worker_count=worker_count, num_threads=num_threads, prefetch=prefetch,
        what="episode samples")
