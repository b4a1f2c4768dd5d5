"""One shard of ``build_clips``: RLDS episodes -> prepared frames, tracks and text -> ArrayRecord.

A shard holds whole episodes and is the unit of parallelism and of resume: :func:`build_shard`
runs in a worker process and writes the shard's files under temporary names, renamed only when
complete, then its done marker (counts, skip reasons with examples, statistics, file sizes and
CRCs). Episodes that cannot become clips raise :class:`SkipEpisode` and are counted by reason.
The orchestration, the manifest and the command line are in :mod:`data_pipelines.build_clips`.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from data_pipelines import records
from data_pipelines import text as text_lib
from data_pipelines.frames import plan_frames
from data_pipelines.rlds import Episode, open_builder, read_episodes
from data_pipelines.schemas import Schema
from data_pipelines.tracks import files as track_files
from data_pipelines.tracks import ground_truth as ground_truth_tracks
from data_pipelines.tracks import trackers as tracking

if TYPE_CHECKING:
    from data_pipelines.build_clips import BuildOptions


def make_text_encoder(options: BuildOptions) -> Any:
    if options.text == "dataset":
        return None
    if options.text == "hash":
        return text_lib.make_text_encoder("hash", dim=options.text_dim,
                                          max_tokens=options.text_max_tokens)
    if options.text == "file":
        return text_lib.make_text_encoder("file", path=options.text_file)
    return text_lib.make_text_encoder("minilm", model_dir=options.text_model_dir,
                                      max_tokens=options.text_max_tokens)


class SkipEpisode(Exception):
    """An episode that cannot become clips: ``reason`` is the category counted in the manifest,
    ``detail`` the specifics kept as an example."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


# A camera stream whose every pixel of every frame has one value (all zeros in BridgeData V2
# where a camera was absent; its has_image_* flags are not reliable, so the pixels decide).
BLANK_CAMERA = "blank camera (every frame one constant value)"


def check_frames(ep: Episode) -> str | None:
    """Returns why an episode's frames are unusable, or None."""
    f = ep.frames
    if f.ndim != 4 or f.shape[-1] != 3:
        return f"image shape {list(f.shape[1:])} is not [H W 3]"
    if f.dtype != np.uint8:
        return f"image dtype {f.dtype} is not uint8"
    if f.size and f.min() == f.max():
        return BLANK_CAMERA
    return None


class EpisodeProcessor:
    """Turns one RLDS episode into prepared frames, tracks and a text key (one per worker)."""

    def __init__(self, options: BuildOptions, schema: Schema):
        self.options, self.schema = options, schema
        h, w = options.size
        self.queries = tracking.grid_queries(options.grid, h, w)
        self.transforms: dict[tuple[int, int], Any] = {}

    def transform(self, in_size: tuple[int, int]) -> Any:
        if in_size not in self.transforms:
            self.transforms[in_size] = plan_frames(in_size, self.options.size,
                                                   self.options.aspect, self.schema.orientation)
        return self.transforms[in_size]

    def __call__(self, ep: Episode) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        o = self.options
        tf = self.transform(tuple(ep.frames.shape[1:3]))
        frames = tf(ep.frames)
        if o.tracker == "lk":
            tracks, visible = tracking.track_lk(frames, self.queries, o.horizon,
                                                fb_threshold=o.fb_threshold, window=o.lk_window,
                                                levels=o.lk_levels, num_threads=1)
            return frames, tracks, visible
        if o.tracker == "dis":
            tracks, visible = tracking.track_dense_flow(frames, self.queries, o.horizon,
                                                        fb_threshold=o.fb_threshold,
                                                        num_threads=1)
            return frames, tracks, visible
        if o.tracker == "ground_truth":
            # Query the grid where it lies in the stored frames, then map the tracks forward.
            s, off = np.asarray(tf.scale), np.asarray(tf.offset)
            raw_queries = ((self.queries + 0.5 - off) / s - 0.5).astype(np.float32)
            try:
                tracks, visible = ground_truth_tracks.track_ground_truth(
                    ep.depth, ep.segmentation, ep.object_poses, ep.intrinsics, raw_queries,
                    o.horizon)
            except ValueError as e:
                raise SkipEpisode("bad ground-truth geometry fields", str(e)) from e
        else:
            try:
                tracks, visible = track_files.load_track_file(
                    track_files.track_file_path(o.tracks_dir, ep.index), len(ep.frames))
            except (ValueError, FileNotFoundError) as e:
                raise SkipEpisode("missing or invalid track file", str(e)) from e
            if tracks.shape[1] != len(self.queries) or tracks.shape[2] != o.horizon:
                raise SkipEpisode("track file has another grid or horizon",
                                  f"{tracks.shape[1]} points x {tracks.shape[2]} steps; the "
                                  f"build expects {len(self.queries)} (--grid {o.grid}) x "
                                  f"{o.horizon}")
        tracks, visible = track_files.transform_tracks(tracks, tf.scale, tf.offset, o.size, visible)
        if o.tracker == "file":
            miss = np.abs(tracks[:, :, 0] - self.queries).max()
            if miss > 0.5:
                raise SkipEpisode(f"track file does not start on the {o.grid}x{o.grid} grid",
                                  f"off by {miss:.2f} px after resize")
        # Anchor every track exactly at its grid point (removes round-off of the round trip,
        # and the sub-0.5 px query jitter a file's tracker may have).
        tracks = tracks - tracks[:, :, :1] + self.queries[None, :, None]
        return frames, tracks, visible


def embed(encoder: Any, instruction: str, embedding: np.ndarray | None
           ) -> tuple[np.ndarray, np.ndarray]:
    """Token states and mask of one instruction (the dataset's own embedding if no encoder)."""
    try:
        if encoder is None:
            return text_lib.sentence_embedding_tokens(embedding, valid=bool(instruction))
        with warnings.catch_warnings():
            # Counted per episode in the manifest and reported once by build_clips instead.
            warnings.simplefilter("ignore", text_lib.TextTruncationWarning)
            tok, mask = encoder.encode([instruction])
    except ValueError as e:  # e.g. an instruction the --text_file does not have
        raise SkipEpisode("instruction cannot be embedded", str(e)) from e
    return tok[0], mask[0]


def build_shard(options: BuildOptions, shard: int, start: int, stop: int,
                progress_queue: Any = None) -> dict[str, Any]:
    """Builds one shard from episodes ``start:stop`` and writes its done marker.

    Returns:
      The done marker (counts, skip reasons, statistics, file sizes and CRCs).
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    t0 = time.time()
    schema = options.get_schema()
    builder = open_builder(options.rlds_dir)
    process = EpisodeProcessor(options, schema)
    encoder = make_text_encoder(options)
    h, w = options.size
    layout = records.Layout(h, w, options.grid, options.horizon)
    stem = records.shard_stem(options.out, shard)
    files = records.shard_files(stem)
    tmp = {k: p.with_name(p.name + ".tmp") for k, p in files.items()}
    frames_w = ArrayRecordWriter(str(tmp["frames"]), records.WRITER_OPTIONS)
    tracks_w = ArrayRecordWriter(str(tmp["tracks"]), records.WRITER_OPTIONS)
    index_rows: list[np.ndarray] = []
    text_ids: dict[str, int] = {}
    text_rows: list[tuple[np.ndarray, np.ndarray]] = []
    skipped: Counter = Counter()
    examples: dict[str, list[str]] = {}
    stats: Counter = Counter()
    sizes: Counter = Counter()
    read_errors: dict[str, int] = {}
    cut: dict[str, int] = {}  # instruction -> tokens it needs, for those the encoder cuts
    gt = options.tracker == "ground_truth"
    for ep in read_episodes(builder, schema, options.split, start, stop, camera=options.camera,
                            embedding=options.text == "dataset", ground_truth=gt,
                            errors=read_errors):
        if progress_queue is not None:
            progress_queue.put(1)
        instruction = ep.instruction
        key = instruction if options.text != "dataset" else (
            instruction + "\x00" + np.asarray(ep.embedding, np.float32).tobytes().hex())
        try:
            reason = check_frames(ep)
            if reason is not None:
                raise SkipEpisode(reason, f"value {int(ep.frames.flat[0])}"
                                  if reason == BLANK_CAMERA else "")
            if len(ep.frames) < options.min_episode_length:
                raise SkipEpisode(f"short episode (< {options.min_episode_length} frames)",
                                  f"{len(ep.frames)} frames")
            frames, tracks, visible = process(ep)
            if key not in text_ids:
                text_rows.append(embed(encoder, instruction, ep.embedding))
                text_ids[key] = len(text_rows) - 1
                if encoder is not None:
                    cut.update(dict(text_lib.truncated(encoder, [instruction])))
        except SkipEpisode as e:
            skipped[e.reason] += 1
            if len(examples.setdefault(e.reason, [])) < 3:
                examples[e.reason].append(f"episode {ep.index}: {e.detail}"[:300])
            continue
        sizes["x".join(map(str, ep.frames.shape[1:3]))] += 1
        if not instruction:
            stats["empty_instruction_episodes"] += 1
        if instruction in cut:
            stats["truncated_instruction_episodes"] += 1
        if len(ep.frames) < options.horizon:
            stats["padded_short_episodes"] += 1
        first = sum(len(r) for r in index_rows)
        t_len = len(frames)
        for t in range(t_len):
            frames_w.write(frames[t].tobytes())
            tracks_w.write(layout.encode_tracks(tracks[t], visible[t]))
        index_rows.append(np.stack([np.full(t_len, ep.index), np.arange(t_len),
                                    np.full(t_len, t_len), np.full(t_len, first),
                                    np.full(t_len, text_ids[key])], -1).astype(np.int64))
        stats["episodes"] += 1
        stats["clips"] += t_len
        vis = visible[:, :, 1:]
        stats["visible_points"] += int(vis.sum())
        stats["tracked_points"] += int(vis.size)
        disp = np.linalg.norm(tracks[:, :, -1] - tracks[:, :, 0], axis=-1)
        stats["displacement_sum"] += float(disp[visible[:, :, -1]].sum())
        stats["displacement_count"] += int(visible[:, :, -1].sum())
    frames_w.close()
    tracks_w.close()
    index = (np.concatenate(index_rows) if index_rows
             else np.zeros((0, len(records.INDEX_FIELDS)), np.int64))
    with open(tmp["index"], "wb") as f:
        np.save(f, index)
    if text_rows:
        lt = max(t.shape[0] for t, _ in text_rows)
        tokens = np.stack([np.pad(t, ((0, lt - t.shape[0]), (0, 0))) for t, _ in text_rows])
        masks = np.stack([np.pad(m, (0, lt - m.shape[0])) for _, m in text_rows])
    else:
        tokens, masks = np.zeros((0, 1, 1), np.float16), np.zeros((0, 1), bool)
    instructions = [k.split("\x00")[0] for k in text_ids]
    with open(tmp["text"], "wb") as f:
        records.write_text_table(f, instructions, tokens, masks)
    for role, p in tmp.items():
        os.replace(p, files[role])
    skipped.update(read_errors)
    done = {"shard": shard, "episodes_range": [start, stop], "records": len(index),
            "skipped": dict(skipped), "skipped_examples": examples, "stats": dict(stats),
            "frame_sizes": dict(sizes), "truncated_instructions": cut,
            "text_shape": list(tokens.shape[1:]), "seconds": time.time() - t0,
            "files": records.describe_files(stem)}
    records.done_path(stem).write_text(json.dumps(done, indent=1))
    return done
