"""The ``hash`` backend: deterministic, weight-free hashed word tokens with positions."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from data_pipelines.text.base import check_instructions, check_positive, warn_truncated

_WORD = re.compile(r"[^\W_]+")  # unicode letters and digits; `_` counts as punctuation


def _words(instruction: str) -> list[str]:
    return _WORD.findall(instruction.lower())


def _stream_unit_vector(key: bytes, dim: int) -> np.ndarray:
    # Normals from a hash stream (Box-Muller) rather than np.random, whose Generator streams are
    # not guaranteed stable across numpy versions: an embedding must not change on upgrade.
    n_pairs = (dim + 1) // 2
    raw = np.frombuffer(hashlib.shake_256(key).digest(8 * n_pairs), dtype="<u4")
    u = (raw.astype(np.float64) + 0.5) / 2.0**32  # uniform in (0, 1), never 0
    u1, u2 = u[0::2], u[1::2]
    r = np.sqrt(-2.0 * np.log(u1))
    normal = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])[:dim]
    return (normal / np.linalg.norm(normal)).astype(np.float32)


def _sincos_positions(length: int, dim: int) -> np.ndarray:
    """Transformer sin-cos position codes, float32[length dim], entries in [-1, 1]."""
    pos = np.arange(length, dtype=np.float64)[:, None]
    freq = 1.0 / 10000.0 ** (2 * (np.arange(dim) // 2) / dim)
    angle = pos * freq[None]
    return np.where(np.arange(dim) % 2 == 0, np.sin(angle), np.cos(angle)).astype(np.float32)


class HashedTokenEncoder:
    """Weight-free deterministic word embeddings with a position term; see module docstring.

    Args:
      dim: D.
      max_tokens: Lt; words beyond it are dropped.
      seed: picks a different, equally deterministic, vocabulary of vectors.
      position_scale: size of the position term relative to the unit word vectors; small so
        that word identity dominates, non-zero so that "a on b" differs from "b on a".
    """

    name = "hash"

    def __init__(
        self, dim: int = 128, max_tokens: int = 16, seed: int = 0, position_scale: float = 0.1
    ) -> None:
        check_positive("dim", dim)
        check_positive("max_tokens", max_tokens)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if not np.isfinite(position_scale) or position_scale < 0:
            raise ValueError(f"position_scale must be finite and >= 0, got {position_scale!r}")
        self.dim = int(dim)
        self.max_tokens = int(max_tokens)
        self.seed = int(seed)
        self.position_scale = float(position_scale)
        self._positions = self.position_scale * _sincos_positions(self.max_tokens, self.dim)
        self._cache: dict[str, np.ndarray] = {}

    def word_vector(self, word: str) -> np.ndarray:
        """Unit-norm vector of one (lower-cased) word, float32[D]."""
        vec = self._cache.get(word)
        if vec is None:
            # The NUL separator keeps (seed=1, "2x") and (seed=12, "x") apart.
            key = f"flipjax-text-hash\0{self.seed}\0{word}".encode()
            vec = self._cache[word] = _stream_unit_vector(key, self.dim)
        return vec

    def encode(self, instructions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Embeds instructions.

        Args:
          instructions: [M] strings.

        Returns:
          ``(tokens float32[M Lt D], mask bool[M Lt])``.
        """
        instructions = check_instructions(instructions)
        tokens = np.zeros((len(instructions), self.max_tokens, self.dim), np.float32)
        mask = np.zeros((len(instructions), self.max_tokens), bool)
        counts = []
        for i, text in enumerate(instructions):
            words = _words(text)
            counts.append(len(words))
            words = words[: self.max_tokens]
            if not words:  # also covers punctuation-only text: nothing to embed
                continue
            tokens[i, : len(words)] = np.stack([self.word_vector(w) for w in words])
            tokens[i, : len(words)] += self._positions[: len(words)]
            mask[i, : len(words)] = True
        warn_truncated(self, counts, instructions)
        return tokens, mask

    def token_counts(self, instructions: Sequence[str]) -> list[int]:
        """Words of each instruction (one token per word)."""
        return [len(_words(s)) for s in check_instructions(instructions)]

    def describe(self) -> dict[str, Any]:
        """JSON-able options recording exactly how text was embedded."""
        return {
            "backend": self.name,
            "version": 1,
            "dim": self.dim,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "position_scale": self.position_scale,
            "words": "lower-cased runs of unicode letters/digits",
            "word_vectors": "unit-norm Box-Muller normals from shake_256",
        }
