"""RLDS episodes -> tracked clip shards (ArrayRecord) plus a manifest.

    python -m data_pipelines.build_clips --rlds_dir=DIR/bridge_dataset/1.0.0 \
        --schema=bridge_dataset --split=train --out=OUT [--camera --size --grid --horizon \
        --history --future --tracker --text --workers ...]

One clip per frame of every episode: the frame, the tracks of a grid of query points started
at that frame for ``horizon`` frames, their visibility, and the instruction's token states.
Episode ends are padded by repeating the last frame (the paper does the same). Shards hold
whole episodes (``--episodes_per_shard``) and are built in parallel (``--workers``); finished
shards are kept when a run is restarted, so an interrupted build resumes. Bad episodes are
skipped and counted with their reason in ``manifest.json``. One shard: ``clip_shard.py``;
layout: ``records.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from data_pipelines import records
from data_pipelines import text as text_lib
from data_pipelines.clip_shard import BLANK_CAMERA, build_shard, check_frames, make_text_encoder
from data_pipelines.rlds import (
    check_keys,
    feature_keys,
    num_episodes,
    open_builder,
    read_episodes,
    required_keys,
)
from data_pipelines.schemas import (
    ORIENTATIONS,
    SCHEMAS,
    Schema,
    get_schema,
    matching_schemas,
)
from flipjax.settings_record import record_or_check

TRACKERS = ("lk", "dis", "ground_truth", "file")
TEXT_BACKENDS = ("hash", "dataset", "file", "minilm")
# Options that do not change the output (a resumed build may change them freely).
_RUNTIME_ONLY = ("workers", "progress")


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """Everything that determines a clip dataset (recorded verbatim in the manifest)."""

    rlds_dir: str
    out: str
    schema: str = "bridge_dataset"
    split: str = "train"
    camera: str | None = None
    size: tuple[int, int] = (128, 128)
    aspect: str = "crop"
    grid: int = 23
    horizon: int = 16
    history: int = 16
    future: int = 15
    tracker: str = "lk"
    tracks_dir: str | None = None
    fb_threshold: float = 1.0
    # 9 px windows on 3 pyramid levels (2 above full resolution) follow motions up to ~15 px
    # per frame, plenty at 128 px, ~5x faster than 15 px windows on 4 levels and as accurate
    # on the toy world (benchmarks/data.py measures both).
    lk_window: int = 9
    lk_levels: int = 2
    text: str = "hash"
    text_file: str | None = None
    text_model_dir: str | None = None
    text_dim: int = 128
    text_max_tokens: int = 16
    episodes_per_shard: int = 64
    max_episodes: int | None = None
    min_episode_length: int = 2
    image_key: str | None = None
    language_key: str | None = None
    embedding_key: str | None = None
    # None: the schema's own orientation; a value overrides it (any schema, generic included).
    orientation: str | None = None
    workers: int = 1
    progress: bool = True

    def validate(self) -> None:
        """Raises ValueError naming the first inconsistent option."""
        if self.tracker not in TRACKERS:
            raise ValueError(f"--tracker must be one of {TRACKERS}, got {self.tracker!r}")
        if self.tracker == "file" and not self.tracks_dir:
            raise ValueError("--tracker=file needs --tracks_dir")
        if self.text not in TEXT_BACKENDS:
            raise ValueError(f"--text must be one of {TEXT_BACKENDS}, got {self.text!r}")
        if self.text == "file" and not self.text_file:
            raise ValueError("--text=file needs --text_file")
        if self.orientation is not None and self.orientation not in ORIENTATIONS:
            raise ValueError(f"--orientation must be one of {ORIENTATIONS}, got "
                             f"{self.orientation!r}")
        if len(self.size) != 2 or min(self.size) < 8:
            raise ValueError(f"--size must be H,W with both >= 8, got {self.size}")
        for name in ("grid", "horizon", "history", "episodes_per_shard", "min_episode_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.future < 0:
            raise ValueError(f"--future must be >= 0, got {self.future}")
        if self.horizon < 2:
            raise ValueError(f"--horizon counts the start frame and must be >= 2, got "
                             f"{self.horizon}")

    def get_schema(self) -> Schema:
        if self.schema == "generic":
            return get_schema(self.schema, image_key=self.image_key,
                              language_key=self.language_key, embedding_key=self.embedding_key,
                              orientation=self.orientation or "none")
        schema = get_schema(self.schema)
        if self.orientation is not None:
            schema = dataclasses.replace(schema, orientation=self.orientation)
        return schema

    def output_defining(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in _RUNTIME_ONLY:
            d.pop(k)
        d["size"] = list(d["size"])
        return d


def resolve_schema(options: BuildOptions, keys: list[str], dataset: str) -> BuildOptions:
    """Checks the schema against the dataset's keys; ``--schema=auto`` picks it from them.

    Args:
      options: the build options.
      keys: the dataset's leaf feature paths.
      dataset: the dataset's tfds name (only breaks ties: names do not identify layouts).

    Returns:
      ``options``, with ``schema`` set to the detected one for ``auto``.

    Raises:
      ValueError: for ``auto`` when no or several layouts fit; for a named schema whose keys the
        dataset lacks while another schema's layout fits, naming both and the --schema to use.
    """
    matches = matching_schemas(keys)
    if options.schema == "auto":
        named = [m for m in matches if m.name == dataset]
        top = [m for m in matches if len(m.signature) == len(matches[0].signature)] or matches
        # Layouts that differ in name only (toy and metaworld) read alike: any of them will do.
        alike = all(dataclasses.replace(m, name="") == dataclasses.replace(top[0], name="")
                    for m in top)
        if named or (top and alike):
            return dataclasses.replace(options, schema=(named or top)[0].name)
        if not matches:
            raise ValueError(f"--schema=auto: RLDS dataset {dataset!r} has no known layout "
                             f"(known: {[s.describe() for s in SCHEMAS.values()]}); use "
                             f"--schema=generic --image_key=... (keys it has: {keys})")
        raise ValueError(f"--schema=auto: RLDS dataset {dataset!r} fits several layouts: "
                         f"{[m.describe() for m in top]}; name one with --schema")
    if options.schema == "generic":
        return options
    schema = options.get_schema()
    if set(schema.signature) <= set(keys):
        return options
    others = [m for m in matches if m.name != schema.name]
    if others:
        missing = sorted(set(schema.signature) - set(keys))
        raise ValueError(f"RLDS dataset {dataset!r} has the layout of {others[0].describe()}, "
                         f"not that of {schema.describe()} (it has no {missing}); use "
                         f"--schema={others[0].name} or --schema=auto")
    return options


def _plan_shards(options: BuildOptions, total: int) -> list[tuple[int, int, int]]:
    n = total if options.max_episodes is None else min(total, options.max_episodes)
    e = options.episodes_per_shard
    return [(i, a, min(a + e, n)) for i, a in enumerate(range(0, n, e))]


def _prepare_out(options: BuildOptions) -> Path:
    """Creates OUT, or checks that an existing OUT was built with the same options."""
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    record_or_check(out / "build_options.json", options.output_defining(),
                    refusal=f"--out {out} holds clips built with other options",
                    remedy="use a new --out or delete it")
    for stray in out.glob("*.tmp"):  # left by an interrupted shard
        stray.unlink()
    return out


def _run_shards(options: BuildOptions, todo: list[tuple[int, int, int]], total_episodes: int,
                already: int) -> list[dict[str, Any]]:
    from tqdm import tqdm

    bar = tqdm(total=total_episodes, initial=already, unit="ep", desc="build_clips",
               disable=not options.progress, smoothing=0.05)
    results = []
    try:
        if options.workers <= 1 or len(todo) <= 1:
            class _Bar:
                def put(self, n: int) -> None:
                    bar.update(n)

            for shard, a, b in todo:
                results.append(build_shard(options, shard, a, b, _Bar()))
            return results
        import multiprocessing as mp

        # TensorFlow and OpenCV do not survive fork; spawn gives every worker a clean process.
        ctx = mp.get_context("spawn")
        with ctx.Manager() as manager, ctx.Pool(options.workers) as pool:
            queue = manager.Queue()
            pending = [pool.apply_async(build_shard, (options, s, a, b, queue))
                       for s, a, b in todo]
            while pending:
                while not queue.empty():
                    bar.update(queue.get())
                still = []
                for r in pending:
                    if r.ready():
                        results.append(r.get())  # re-raises a worker's exception here
                    else:
                        still.append(r)
                pending = still
                time.sleep(0.1)
            while not queue.empty():
                bar.update(queue.get())
        return results
    finally:
        bar.close()


def build_clips(options: BuildOptions) -> dict[str, Any]:
    """Builds (or resumes) a clip dataset and writes ``OUT/manifest.json``.

    Args:
      options: the build options.

    Returns:
      The manifest: options, sizes, counts, skip reasons, statistics, shards and timing.
    """
    options.validate()
    builder = open_builder(options.rlds_dir)
    options = resolve_schema(options, feature_keys(builder), builder.info.name)
    schema = options.get_schema()
    check_keys(builder, required_keys(schema, options.camera,
                                      embedding=options.text == "dataset",
                                      ground_truth=options.tracker == "ground_truth"))
    if options.text not in ("dataset",):
        make_text_encoder(options)  # fail now on a missing model or text file, not in a worker
    total = num_episodes(builder, options.split)
    plan = _plan_shards(options, total)
    out = _prepare_out(options)
    t0 = time.time()
    done, todo = {}, []
    for s, a, b in plan:
        marker = records.shard_is_complete(records.shard_stem(out, s))
        if marker is not None and marker["episodes_range"] == [a, b]:
            done[s] = marker
        else:
            todo.append((s, a, b))
    kept = sum(b - a for s, a, b in plan if s in done)
    for r in _run_shards(options, todo, sum(b - a for _, a, b in plan), kept):
        done[r["shard"]] = r
    text = records.merge_text_tables(out, [records.shard_stem(out, s) for s, _, _ in plan])
    manifest = _manifest(options, schema, [done[s] for s, _, _ in plan], text,
                         time.time() - t0, resumed_shards=len(plan) - len(todo))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    counts = manifest["counts"]
    if counts["episodes"] == 0 and counts["skipped"].get(BLANK_CAMERA, 0):
        raise ValueError(_blank_camera_message(options, schema, builder, counts))
    if counts["truncated_instructions"]:
        warnings.warn(truncation_message(options, counts), text_lib.TextTruncationWarning,
                      stacklevel=2)
    return manifest


def truncation_message(options: BuildOptions, counts: dict[str, Any]) -> str:
    """One line on the instructions a build cut (from its manifest counts)."""
    return (f"--text={options.text} keeps {options.text_max_tokens} tokens per instruction: "
            f"{counts['truncated_instructions']} instruction(s) of "
            f"{counts['truncated_instruction_episodes']} episode(s) were cut, e.g. "
            f"{'; '.join(counts['truncated_examples'])}; rebuild with a larger "
            f"--text_max_tokens to keep them whole")


def _blank_camera_message(options: BuildOptions, schema: Schema, builder: Any,
                          counts: dict[str, Any]) -> str:
    """The error for a build whose chosen camera has no content, naming cameras that have."""
    camera = options.camera or schema.default_camera
    lit = []
    for name in sorted(schema.cameras):
        try:
            ep = next(read_episodes(builder, schema, options.split, 0, 1, camera=name), None)
        except ValueError:  # the dataset lacks that camera's key
            continue
        if ep is not None and check_frames(ep) is None:
            lit.append(name)
    return (f"camera {camera!r} ({schema.image_key(camera)}) has no content: "
            f"{counts['skipped'][BLANK_CAMERA]} of {counts['episodes_in_split_range']} episodes "
            f"are one constant value in every frame and no episode was usable (the dataset's "
            f"has_image_* flags are not trusted); cameras with content in the first episode: "
            f"{lit or 'none'}; choose one with --camera")


def _manifest(options: BuildOptions, schema: Schema, shards: list[dict[str, Any]],
              text: dict[str, Any], seconds: float, resumed_shards: int) -> dict[str, Any]:
    skipped: Counter = Counter()
    stats: Counter = Counter()
    sizes: Counter = Counter()
    examples: dict[str, list[str]] = {}
    cut: dict[str, int] = {}
    for d in shards:
        skipped.update(d["skipped"])
        for reason, ex in d.get("skipped_examples", {}).items():
            examples.setdefault(reason, []).extend(ex[:3 - len(examples.get(reason, []))])
        stats.update(d["stats"])
        sizes.update(d["frame_sizes"])
        cut.update(d.get("truncated_instructions", {}))
    data_bytes = sum(f["bytes"] for d in shards for f in d["files"].values()) + text["bytes"]
    clips = int(stats["clips"])
    h, w = options.size
    n = options.grid ** 2
    return {
        "format_version": records.FORMAT_VERSION,
        "options": options.output_defining(),
        "schema": dataclasses.asdict(schema),
        "layout": {"height": h, "width": w, "grid": options.grid, "num_points": n,
                   "horizon": options.horizon,
                   "history": options.history, "future": options.future,
                   "text_tokens": text["tokens"], "text_dim": text["dim"],
                   "index_fields": list(records.INDEX_FIELDS),
                   "writer_options": records.WRITER_OPTIONS},
        "counts": {"episodes_in_split_range": sum(d["episodes_range"][1] - d["episodes_range"][0]
                                                  for d in shards),
                   "episodes": int(stats["episodes"]), "clips": clips,
                   "skipped": dict(skipped), "skipped_total": int(sum(skipped.values())),
                   "skipped_examples": examples,
                   "empty_instruction_episodes": int(stats["empty_instruction_episodes"]),
                   "padded_short_episodes": int(stats["padded_short_episodes"]),
                   # Instructions longer than --text_max_tokens (their tails were cut).
                   "truncated_instruction_episodes": int(stats["truncated_instruction_episodes"]),
                   "truncated_instructions": len(cut),
                   "truncated_examples": [f"{s!r} needs {n} tokens"
                                          for s, n in sorted(cut.items())[:3]],
                   "frame_sizes_in": dict(sizes)},
        "statistics": {
            "visible_fraction": stats["visible_points"] / max(1, stats["tracked_points"]),
            "mean_displacement_px": stats["displacement_sum"] / max(1,
                                                                    stats["displacement_count"]),
        },
        "bytes": {"total": data_bytes, "per_clip": data_bytes / max(1, clips)},
        "text": {"instructions": text["instructions"], "files": records.GLOBAL_TEXT_FILES},
        "shards": [{"stem": records.shard_stem("", d["shard"]).name, "records": d["records"],
                    "episodes_range": d["episodes_range"], "files": d["files"],
                    "text_ids": ids}
                   for d, ids in zip(shards, text["remap"], strict=True)],
        "timing": {"seconds": seconds, "resumed_shards": resumed_shards,
                   "shard_seconds": sum(d["seconds"] for d in shards)},
    }


def _flags() -> Any:
    from absl import flags

    f = flags
    f.DEFINE_string("rlds_dir", None, "Prepared RLDS directory DIR/name/version.")
    f.DEFINE_string("out", None, "Output directory for clip shards and manifest.json.")
    f.DEFINE_string("schema", "bridge_dataset",
                    "bridge_dataset (rail-berkeley BridgeData V2) | bridge (Open X-Embodiment) | "
                    "libero | toy | metaworld | generic | auto (detected from the keys; the "
                    "dataset name alone is ambiguous: tfds catalogues also call the "
                    "rail-berkeley layout 'bridge').")
    f.DEFINE_string("split", "train", "Split to convert.")
    f.DEFINE_string("camera", None, "Camera name (schema default when unset).")
    f.DEFINE_list("size", ["128", "128"], "Output frame size H,W (one value: square).")
    f.DEFINE_enum("aspect", "crop", ["crop", "pad"], "Fix the aspect ratio by centre crop or pad.")
    f.DEFINE_integer("grid", 23, "Track a GxG grid of query points per frame.")
    f.DEFINE_integer("horizon", 16, "Track length L including the start frame.")
    f.DEFINE_integer("history", 16, "Frames up to and including the current one (loader default).")
    f.DEFINE_integer("future", 15, "Frames after the current one (loader default).")
    f.DEFINE_enum("tracker", "lk", list(TRACKERS),
                  "lk: pyramidal Lucas-Kanade; dis: dense DIS flow (~10x faster, coarser); "
                  "ground_truth: from depth/segmentation/poses; file: precomputed tracks.")
    f.DEFINE_string("tracks_dir", None, "Directory of per-episode track files (--tracker=file).")
    f.DEFINE_float("fb_threshold", 1.0, "Forward-backward error (px) that ends a track.")
    f.DEFINE_integer("lk_window", 9, "LK window side (px) at every pyramid level.")
    f.DEFINE_integer("lk_levels", 2, "LK pyramid levels above full resolution.")
    f.DEFINE_enum("text", "hash", list(TEXT_BACKENDS), "Language embedding backend.")
    f.DEFINE_string("text_file", None, "npz of instruction -> token states (--text=file).")
    f.DEFINE_string("text_model_dir", None, "Local sentence-encoder directory (--text=minilm).")
    f.DEFINE_integer("text_dim", 128, "Width of the hashed-token embedding.")
    f.DEFINE_integer("text_max_tokens", 16, "Tokens per instruction (hash, minilm).")
    f.DEFINE_integer("episodes_per_shard", 64, "Episodes per shard (the unit of resume).")
    f.DEFINE_integer("max_episodes", None, "Convert only the first N episodes.")
    f.DEFINE_integer("min_episode_length", 2, "Skip episodes with fewer frames.")
    f.DEFINE_string("image_key", None, "generic schema: image key, e.g. steps/observation/rgb.")
    f.DEFINE_string("language_key", None, "generic schema: instruction key.")
    f.DEFINE_string("embedding_key", None, "generic schema: sentence embedding key.")
    f.DEFINE_enum("orientation", None, list(ORIENTATIONS),
                  "How stored frames differ from the camera view, undone on frames and tracks: "
                  "none | rotate_180 | mirror_lr (columns reversed) | flip_ud (rows reversed). "
                  "Default: the schema's (libero: mirror_lr; others and generic: none).")
    f.DEFINE_integer("workers", max(1, (os.cpu_count() or 2) - 1), "Parallel shard builders.")
    return flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    from absl import app

    fl = FLAGS
    if not fl.rlds_dir or not fl.out:
        raise app.UsageError("--rlds_dir and --out are required")
    size = [int(s) for s in fl.size]
    size = size * 2 if len(size) == 1 else size
    options = BuildOptions(
        rlds_dir=fl.rlds_dir, out=fl.out, schema=fl.schema, split=fl.split, camera=fl.camera,
        size=tuple(size), aspect=fl.aspect, grid=fl.grid, horizon=fl.horizon,
        history=fl.history, future=fl.future, tracker=fl.tracker, tracks_dir=fl.tracks_dir,
        fb_threshold=fl.fb_threshold, lk_window=fl.lk_window, lk_levels=fl.lk_levels,
        text=fl.text, text_file=fl.text_file,
        text_model_dir=fl.text_model_dir, text_dim=fl.text_dim,
        text_max_tokens=fl.text_max_tokens, episodes_per_shard=fl.episodes_per_shard,
        max_episodes=fl.max_episodes, min_episode_length=fl.min_episode_length,
        image_key=fl.image_key, language_key=fl.language_key, embedding_key=fl.embedding_key,
        orientation=fl.orientation, workers=fl.workers)
    # Bad input (a key, a directory, a camera, an option) is one line, not a traceback:
    # console.run below.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", text_lib.TextTruncationWarning)  # said below
        m = build_clips(options)
    c = m["counts"]
    if c["truncated_instructions"]:
        print(f"build_clips: warning: {truncation_message(options, c)}", file=sys.stderr)
    print(f"{c['clips']} clips from {c['episodes']} episodes in {len(m['shards'])} shards -> "
          f"{fl.out} ({m['bytes']['per_clip'] / 1e3:.1f} KB/clip, "
          f"{m['timing']['seconds']:.1f}s); skipped {c['skipped_total']}: {c['skipped']}")


if __name__ == "__main__":
    from flipjax import console

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    FLAGS = _flags()
    # tfds logs every dataset it constructs at INFO: quiet unless --verbosity says otherwise.
    console.run(main, "build_clips", packages=("data_pipelines",))
