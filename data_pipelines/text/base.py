"""What every text backend shares: the ``TextEncoder`` protocol, truncation reporting, input
checks, padding and the dataset-embedding token (see :mod:`data_pipelines.text`)."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class TextEncoder(Protocol):
    """Maps instructions to padded token-level embeddings."""

    name: str  # backend name, recorded in a manifest
    dim: int  # D
    max_tokens: int  # Lt

    def encode(self, instructions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Embeds instructions.

        Args:
          instructions: [M] strings.

        Returns:
          ``(tokens float32[M Lt D], mask bool[M Lt])``; empty instructions are fully masked.
        """
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-able options recording exactly how text was embedded."""
        ...

    def token_counts(self, instructions: Sequence[str]) -> list[int]:
        """Tokens each instruction needs before truncation to ``max_tokens``."""
        ...


class TextTruncationWarning(UserWarning):
    """An instruction had more tokens than the encoder keeps, so its tail was dropped."""


def truncated(encoder: TextEncoder, instructions: Sequence[str]) -> list[tuple[str, int]]:
    """The instructions ``encoder`` would cut, with the tokens each needs.

    Args:
      encoder: any backend.
      instructions: [M] strings.

    Returns:
      ``(instruction, tokens needed)`` for every instruction longer than ``encoder.max_tokens``.
    """
    instructions = check_instructions(instructions)
    return [(s, n) for s, n in zip(instructions, encoder.token_counts(instructions), strict=True)
            if n > encoder.max_tokens]


def warn_truncated(encoder: TextEncoder, counts: Sequence[int],
                    instructions: Sequence[str]) -> None:
    cut = [(s, n) for s, n in zip(instructions, counts, strict=True) if n > encoder.max_tokens]
    if cut:
        shown = "; ".join(f"{s!r} needs {n}" for s, n in cut[:3])
        warnings.warn(f"text backend {encoder.name!r} keeps {encoder.max_tokens} tokens per "
                      f"instruction and cut {len(cut)} of {len(instructions)}: {shown}"
                      f"{' ...' if len(cut) > 3 else ''}; raise max_tokens to keep them whole",
                      TextTruncationWarning, stacklevel=3)


def is_empty_instruction(instruction: str) -> bool:
    """True for an empty or whitespace-only instruction.

    Args:
      instruction: the text.

    Returns:
      Whether it carries no text.
    """
    return not instruction.strip()


def check_instructions(instructions: Sequence[str]) -> list[str]:
    # A bare string is a Sequence[str] too; encoding it char by char would be a silent bug.
    if isinstance(instructions, (str, bytes)):
        raise ValueError("encode: expected a sequence of instructions, got a single string")
    out = list(instructions)
    for i, s in enumerate(out):
        if not isinstance(s, str):
            raise ValueError(f"encode: instruction {i} is {type(s).__name__}, expected str")
    return out


def check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def pad_tokens(
    tokens: np.ndarray, mask: np.ndarray, max_tokens: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pads with masked zeros, or truncates, token states to a common length.

    Args:
      tokens: float[L D].
      mask: bool[L].
      max_tokens: Lt, the output length.

    Returns:
      ``(tokens float32[Lt D], mask bool[Lt])``; positions beyond L are zero and masked.

    Raises:
      ValueError: on mismatched shapes or a non-positive ``max_tokens``.
    """
    check_positive("max_tokens", max_tokens)
    tokens = np.asarray(tokens)
    mask = np.asarray(mask)
    if tokens.ndim != 2 or mask.shape != tokens.shape[:1]:
        raise ValueError(
            f"pad_tokens: expected tokens [L D] and mask [L], got {tokens.shape} and {mask.shape}"
        )
    if mask.dtype != bool:
        raise ValueError(f"pad_tokens: mask must be bool, got {mask.dtype}")
    n = min(tokens.shape[0], max_tokens)
    out_t = np.zeros((max_tokens, tokens.shape[1]), dtype=np.float32)
    out_m = np.zeros((max_tokens,), dtype=bool)
    out_t[:n] = tokens[:n]
    out_m[:n] = mask[:n]
    out_t[~out_m] = 0.0
    return out_t, out_m


def sentence_embedding_tokens(
    embedding: np.ndarray, valid: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Wraps a dataset's sentence embedding (e.g. BridgeData's ``language_embedding``) as 1 token.

    Args:
      embedding: float[D].
      valid: False when the instruction behind it is empty: the token is then zero and masked,
        as every backend does for empty instructions.

    Returns:
      ``(tokens float32[1 D], mask bool[1])``.

    Raises:
      ValueError: when ``embedding`` is not a finite 1-D float vector.
    """
    emb = np.asarray(embedding)
    if emb.ndim != 1 or emb.shape[0] == 0 or not np.issubdtype(emb.dtype, np.floating):
        raise ValueError(
            f"sentence_embedding_tokens: expected float[D], got {emb.dtype}{list(emb.shape)}"
        )
    if not np.all(np.isfinite(emb)):
        raise ValueError("sentence_embedding_tokens: embedding has NaN or inf entries")
    if not valid:
        return np.zeros((1, emb.shape[0]), np.float32), np.zeros((1,), bool)
    return emb.astype(np.float32)[None], np.ones((1,), bool)


def sha256_file(path: str) -> str:
    """Hex SHA-256 of a file (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
