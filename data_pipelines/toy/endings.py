"""Faithful and failed endings of the same toy scene: same-instruction negatives for the value.

LIV contrasts an instruction only with other episodes' goals, never with a wrong outcome in
the same scene, so nothing in its objective asks a value to tell "the red block pushed to the
left" from "the red block pushed to the right" (or "the blue one pushed to the left"). The toy
world can script both from one start state: :func:`data_pipelines.toy.tasks.sample_episode`
draws the scene, task and start first and only then decides whether the script fails, so
replaying an episode's generator with ``failure_fraction=1`` gives the same scene, instruction
and start with a deliberately failed script (too short a motion, the wrong block or the
opposite target; ``toy_tasks.FAILURES``).

:func:`ending_pairs` renders, for episodes ``0..N-1`` of a split, the last ``frames`` frames of
the faithful script and of the failed one, with the instruction embedded as the toy clips
embed it (hash text, rounded through float16 as ``build_clips`` stores it). On the "train"
split of a clip build's seed these are the scenes the value trains on; on the "plan" split they
are exactly the endings :func:`data_pipelines.toy.problems.ending_clips` gives the planning
problems (the held-out measure ``value_prefers_success``).

:func:`cached_ending_pairs` keeps a rendering in an ``.npz`` file named by its settings (a
resumed or repeated run does not re-render; 2000 pairs of 32 px take about 75 s), and
:func:`shift_clips` is the small-translation augmentation of the endings (no colour jitter:
colour names the block).

numpy only (no TensorFlow, no JAX).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np

from data_pipelines import text as text_lib
from data_pipelines.toy.tasks import episode_rng, sample_episode
from data_pipelines.toy.world import ToyConfig, render_rgb_uint8


@dataclasses.dataclass(frozen=True)
class EndingPairs:
    """N scenes, each with a faithful and a failed ending under one instruction.

    Attributes:
      success: uint8[N Tv H W 3] the last Tv frames of the faithful script.
      failure: uint8[N Tv H W 3] the last Tv frames of the failed script of the same scene.
      text_tokens: float32[N Lt D] hash-text token states; text_mask: bool[N Lt].
      instructions: the N instructions.
      failures: the N failure modes of the failed scripts.
      valid: bool[N] the faithful script succeeds and the failed one does not (the pair is a
        true positive/negative pair).
    """

    success: np.ndarray
    failure: np.ndarray
    text_tokens: np.ndarray
    text_mask: np.ndarray
    instructions: list[str]
    failures: list[str]
    valid: np.ndarray

    def __len__(self) -> int:
        return len(self.instructions)


def _ending(episode, frames: int) -> np.ndarray:
    render = render_rgb_uint8(episode.scene)
    end = len(episode.poses) - 1
    # Frames before step 0 repeat step 0, as the clip loader pads episode starts.
    steps = np.clip(np.arange(end - frames + 1, end + 1), 0, None)
    cache = {s: render(episode.poses[s])[0] for s in np.unique(steps)}
    return np.stack([cache[s] for s in steps])


def ending_pairs(num: int, seed: int, split: str, *, frames: int, text_dim: int,
                 text_max_tokens: int, toy_config: ToyConfig = ToyConfig()) -> EndingPairs:
    """Renders the faithful and failed endings of episodes ``0..num-1`` of ``split``.

    Args:
      num: N, scenes.
      seed: the toy world seed (a clip build's ``config.seed``).
      split: "train", "val" or "plan" (any name ``toy_tasks.episode_rng`` takes).
      frames: Tv, frames per ending (the value model's ``clip_len``).
      text_dim: D of the hash text embedding.
      text_max_tokens: Lt (the clips' ``toy_text_max_tokens``).
      toy_config: the world's settings (image size, speed); its ``failure_fraction`` is
        ignored: the faithful ending uses 0, the failed one 1.

    Returns:
      The :class:`EndingPairs`.

    Raises:
      ValueError: for a non-positive count, frame count or text setting.
    """
    for name, value in (("num", num), ("frames", frames), ("text_dim", text_dim),
                        ("text_max_tokens", text_max_tokens)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    faithful = dataclasses.replace(toy_config, failure_fraction=0.0)
    failed = dataclasses.replace(toy_config, failure_fraction=1.0)
    fields: dict[str, list] = {k: [] for k in ("success", "failure", "instructions",
                                               "failures", "valid")}
    for i in range(int(num)):
        good = sample_episode(episode_rng(int(seed), split, i), faithful)
        bad = sample_episode(episode_rng(int(seed), split, i), failed)
        if good.task != bad.task:  # the generator's draw order changed under us
            raise RuntimeError(f"episode {i} of {split!r}: the failed replay has another task")
        fields["success"].append(_ending(good, int(frames)))
        fields["failure"].append(_ending(bad, int(frames)))
        fields["instructions"].append(good.task.instruction)
        fields["failures"].append(bad.failure)
        fields["valid"].append(bool(good.success and not bad.success))
    encoder = text_lib.make_text_encoder("hash", dim=int(text_dim),
                                         max_tokens=int(text_max_tokens))
    tokens, mask = encoder.encode(fields["instructions"])
    # build_clips stores the token table as float16: the same rounding as the clips.
    tokens = tokens.astype(np.float16).astype(np.float32)
    return EndingPairs(np.stack(fields["success"]), np.stack(fields["failure"]), tokens, mask,
                       fields["instructions"], fields["failures"],
                       np.asarray(fields["valid"], bool))


def cached_ending_pairs(cache_dir: str | Path, num: int, seed: int, split: str, *, frames: int,
                        text_dim: int, text_max_tokens: int,
                        toy_config: ToyConfig = ToyConfig()) -> EndingPairs:
    """:func:`ending_pairs`, read from ``cache_dir`` when rendered there before (also as the
    first ``num`` scenes of a larger rendering with the same settings), else rendered and saved
    there (``ending_pairs_{split}_{num}_{digest of the other arguments}.npz``).

    Raises:
      ValueError: as :func:`ending_pairs`.
    """
    key = dict(seed=int(seed), split=str(split), frames=int(frames), text_dim=int(text_dim),
               text_max_tokens=int(text_max_tokens), toy=dataclasses.asdict(toy_config))
    tag = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
    # Scenes 0..N-1 are a prefix of any larger rendering with the same settings.
    prefix = f"ending_pairs_{split}_"
    done = sorted((int(p.name[len(prefix):].split("_")[0]), p) for p in
                  Path(cache_dir).glob(f"{prefix}*_{tag}.npz"))
    for n, path in done:
        if n >= int(num):
            try:
                with np.load(path, allow_pickle=False) as z:
                    k = int(num)
                    return EndingPairs(
                        z["success"][:k], z["failure"][:k], z["text_tokens"][:k],
                        z["text_mask"][:k], [str(x) for x in z["instructions"][:k]],
                        [str(x) for x in z["failures"][:k]], z["valid"][:k])
            except (OSError, ValueError, KeyError, zipfile.BadZipFile):
                # A damaged cache entry is only a cache miss: drop it and render again.
                path.unlink(missing_ok=True)
    path = Path(cache_dir) / f"ending_pairs_{split}_{int(num)}_{tag}.npz"
    pairs = ending_pairs(num, seed, split, frames=frames, text_dim=text_dim,
                         text_max_tokens=text_max_tokens, toy_config=toy_config)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, success=pairs.success, failure=pairs.failure, text_tokens=pairs.text_tokens,
             text_mask=pairs.text_mask, instructions=np.asarray(pairs.instructions),
             failures=np.asarray(pairs.failures), valid=pairs.valid)
    tmp.replace(path)
    return pairs


def shift_clips(clips: np.ndarray, rng: np.random.Generator, max_shift: int) -> np.ndarray:
    """Translates every clip by its own integer offset, the same for all its frames.

    Args:
      clips: uint8[N Tv H W 3].
      rng: draws the offsets, uniform in [-max_shift, max_shift] per axis and clip.
      max_shift: the largest offset in pixels (0 returns ``clips``); vacated pixels repeat the
        edge (the toy floor).

    Returns:
      uint8[N Tv H W 3].

    Raises:
      ValueError: for a clip array of another rank or a negative shift.
    """
    if clips.ndim != 5 or clips.shape[-1] != 3:
        raise ValueError(f"clips: expected [N Tv H W 3], got shape {list(clips.shape)}")
    m = int(max_shift)
    if m < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    if m == 0:
        return clips
    n, _, h, w, _ = clips.shape
    padded = np.pad(clips, ((0, 0), (0, 0), (m, m), (m, m), (0, 0)), mode="edge")
    dy, dx = rng.integers(-m, m + 1, size=(2, n))
    return np.stack([padded[i, :, m - dy[i]:m - dy[i] + h, m - dx[i]:m - dx[i] + w]
                     for i in range(n)])


__all__ = ["EndingPairs", "cached_ending_pairs", "ending_pairs", "shift_clips"]
