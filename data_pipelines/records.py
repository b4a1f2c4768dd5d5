"""On-disk layout of clip shards: what one shard holds and how its records are encoded.

A clip is defined by its current frame. Frames are stored once (not once per clip that
contains them) and clip windows are assembled at read time, which is what makes the format
compact and lets one build serve both the action module (16 history frames) and the dynamics
module (4 history + 15 future). A shard ``clips-00007`` holds whole episodes in four files:

- ``clips-00007.frames.array_record``: one record per frame, raw ``uint8[H W 3]``.
- ``clips-00007.tracks.array_record``: one record per frame, ``float16[N L 2]`` displacements
  of the tracks from their query points (the G x G grid, so positions come back exact at the
  start and to ~1e-3 px for small motions, where float16 positions would be off by up to
  0.03 px at 128 px), followed by the visibility bits ``packbits(bool[N L])``.
- ``clips-00007.index.npy``: ``int64[R 5]`` per record: episode_id, frame_index,
  episode_length, episode_start (record index of the episode's frame 0 in the shard), text_id.
- ``clips-00007.text.npz``: the shard's distinct instructions (``instructions`` str[M]) with
  ``tokens`` float16[M Lt D] and ``mask`` bool[M Lt]; ``text_id`` indexes it.

``clips-00007.done.json`` is written last, with the record count, byte sizes and CRC32 of
the files; a shard without it (or whose files no longer match it) is rebuilt on resume.

When every shard is done, the shards' text tables are merged into one table of the distinct
instructions of the whole dataset (same instruction and same token states = one entry):
``text_tokens.npy`` float16[M Lt D] (memory-mapped by the loader, so Llama-sized states of
thousands of instructions cost page cache, not RAM), ``text_mask.npy`` bool[M Lt] and
``text_instructions.json``; the manifest maps each shard's text ids to rows of it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
INDEX_FIELDS = ("episode_id", "frame_index", "episode_length", "episode_start", "text_id")
# Random access: one record per chunk, no read-ahead. Frames are raw because decoding is the
# loader's bottleneck, not disk space (zstd saves little on textured uint8 frames).
WRITER_OPTIONS = "group_size:1,uncompressed"
READER_OPTIONS = "readahead_buffer_size:0"


@dataclasses.dataclass(frozen=True)
class Layout:
    """Sizes shared by every record of a clip dataset."""

    height: int
    width: int
    grid: int
    horizon: int

    @property
    def num_points(self) -> int:
        return self.grid * self.grid

    @functools.cached_property
    def queries(self) -> np.ndarray:
        """float32[N 2] the grid of query points every track starts from."""
        from data_pipelines.tracks.trackers import grid_queries

        return grid_queries(self.grid, self.height, self.width)

    @property
    def frame_bytes(self) -> int:
        return self.height * self.width * 3

    @property
    def tracks_bytes(self) -> int:
        return self.num_points * self.horizon * 2 * 2

    @property
    def visible_bytes(self) -> int:
        return (self.num_points * self.horizon + 7) // 8

    def encode_tracks(self, tracks: np.ndarray, visible: np.ndarray) -> bytes:
        """float[N L 2] tracks and bool[N L] visibility -> one tracks record."""
        n, length = self.num_points, self.horizon
        if tracks.shape != (n, length, 2) or visible.shape != (n, length):
            raise ValueError(f"tracks/visible: expected [{n} {length} 2]/[{n} {length}], got "
                             f"{list(tracks.shape)}/{list(visible.shape)}")
        offsets = np.asarray(tracks, np.float32) - self.queries[:, None]
        return (offsets.astype(np.float16).tobytes()
                + np.packbits(np.asarray(visible, bool).reshape(-1)).tobytes())

    def decode_tracks(self, record: bytes) -> tuple[np.ndarray, np.ndarray]:
        """One tracks record -> (float32[N L 2], bool[N L])."""
        if len(record) != self.tracks_bytes + self.visible_bytes:
            raise ValueError(f"tracks record has {len(record)} bytes, expected "
                             f"{self.tracks_bytes + self.visible_bytes}")
        n, length = self.num_points, self.horizon
        tracks = np.frombuffer(record, np.float16, n * length * 2).reshape(n, length, 2)
        bits = np.frombuffer(record, np.uint8, offset=self.tracks_bytes)
        visible = np.unpackbits(bits, count=n * length).astype(bool).reshape(n, length)
        return tracks.astype(np.float32) + self.queries[:, None], visible

    def decode_frames(self, records: list[bytes], rows: np.ndarray | None = None) -> np.ndarray:
        """Frame records -> uint8[T H W 3], optionally picking ``records[rows]`` (repeats ok).

        Copies each record once straight into the result (no intermediate join): clip assembly
        is memory-bound and this is the loader's hot path.
        """
        rows = np.arange(len(records)) if rows is None else rows
        out = np.empty((len(rows), self.height, self.width, 3), np.uint8)
        flat = out.reshape(len(rows), -1)
        for k, r in enumerate(rows):
            rec = records[r]
            if len(rec) != self.frame_bytes:
                raise ValueError(f"frame record has {len(rec)} bytes, expected "
                                 f"{self.frame_bytes}")
            flat[k] = np.frombuffer(rec, np.uint8)
        return out


def shard_stem(directory: str | Path, shard: int) -> Path:
    """Path prefix of shard ``shard`` (``DIR/clips-00007``)."""
    return Path(directory) / f"clips-{shard:05d}"


def shard_files(stem: Path) -> dict[str, Path]:
    """The data files of a shard by role."""
    return {"frames": stem.with_name(stem.name + ".frames.array_record"),
            "tracks": stem.with_name(stem.name + ".tracks.array_record"),
            "index": stem.with_name(stem.name + ".index.npy"),
            "text": stem.with_name(stem.name + ".text.npz")}


def done_path(stem: Path) -> Path:
    return stem.with_name(stem.name + ".done.json")


def file_crc32(path: Path, chunk: int = 1 << 22) -> int:
    """CRC32 of a file, streamed."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def describe_files(stem: Path) -> dict[str, dict[str, int]]:
    """Byte size and CRC32 of each data file of a shard (what the done marker records)."""
    return {role: {"bytes": p.stat().st_size, "crc32": file_crc32(p)}
            for role, p in shard_files(stem).items()}


def shard_is_complete(stem: Path, check_crc: bool = True) -> dict[str, Any] | None:
    """Returns the done marker if the shard is finished and its files still match it."""
    marker = done_path(stem)
    if not marker.exists():
        return None
    try:
        done = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return None
    for role, p in shard_files(stem).items():
        want = done.get("files", {}).get(role)
        if want is None or not p.exists() or p.stat().st_size != want["bytes"]:
            return None
        if check_crc and file_crc32(p) != want["crc32"]:
            return None
    return done


def write_text_table(path: Path, instructions: list[str], tokens: np.ndarray,
                     mask: np.ndarray) -> None:
    """Writes a shard's text table (float16 tokens: instruction states need no more)."""
    np.savez(path, instructions=np.asarray(instructions, dtype=str),
             tokens=np.asarray(tokens, np.float16), mask=np.asarray(mask, bool))


def read_text_table(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Reads a shard's text table -> (instructions, float16[M Lt D], bool[M Lt])."""
    try:
        with np.load(path) as z:
            return list(z["instructions"]), z["tokens"], z["mask"]
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"text table {path} is unreadable or incomplete: {e}") from e


GLOBAL_TEXT_FILES = {"tokens": "text_tokens.npy", "mask": "text_mask.npy",
                     "instructions": "text_instructions.json"}


def merge_text_tables(directory: Path, stems: list[Path]) -> dict[str, Any]:
    """Merges the shards' text tables into the dataset's table of distinct instructions.

    Streams shard by shard (two passes) so memory stays at one shard's table.

    Returns:
      ``{"instructions": M, "tokens": Lt, "dim": D, "remap": [[global id per shard id], ...]}``.
    """
    keys: dict[str, int] = {}
    remap: list[list[int]] = []
    instructions: list[str] = []
    lt, dims = 1, set()
    for stem in stems:
        names, tokens, mask = read_text_table(shard_files(stem)["text"])
        ids = []
        for j, name in enumerate(names):
            if tokens.shape[0] == 0:
                break
            digest = hashlib.sha1(np.ascontiguousarray(tokens[j]).tobytes()
                                  + np.ascontiguousarray(mask[j]).tobytes()).hexdigest()
            key = f"{name}\x00{digest}"
            if key not in keys:
                keys[key] = len(instructions)
                instructions.append(name)
            ids.append(keys[key])
        remap.append(ids)
        if len(names):
            lt = max(lt, tokens.shape[1])
            dims.add(int(tokens.shape[2]))
    if len(dims) > 1:
        raise ValueError(f"shards disagree on the text embedding width: {sorted(dims)}")
    dim = next(iter(dims), 1)
    paths = {k: directory / v for k, v in GLOBAL_TEXT_FILES.items()}
    tmp = {k: p.with_name(p.name + ".tmp") for k, p in paths.items()}
    out_tokens = np.lib.format.open_memmap(tmp["tokens"], mode="w+", dtype=np.float16,
                                           shape=(len(instructions), lt, dim))
    out_mask = np.zeros((len(instructions), lt), bool)
    for stem, ids in zip(stems, remap, strict=True):
        if not ids:
            continue
        _, tokens, mask = read_text_table(shard_files(stem)["text"])
        out_tokens[ids, :tokens.shape[1]] = tokens
        out_mask[ids, :mask.shape[1]] = mask
    out_tokens.flush()
    del out_tokens
    with open(tmp["mask"], "wb") as f:
        np.save(f, out_mask)
    tmp["instructions"].write_text(json.dumps(instructions, indent=0))
    for k, p in tmp.items():
        os.replace(p, paths[k])
    return {"instructions": len(instructions), "tokens": int(lt), "dim": int(dim),
            "remap": remap, "bytes": sum(p.stat().st_size for p in paths.values())}
