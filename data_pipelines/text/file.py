"""The ``file`` backend: precomputed token states looked up in a user's ``.npz``."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from data_pipelines.text.base import (
    check_instructions,
    check_positive,
    pad_tokens,
    sha256_file,
    warn_truncated,
)


class FileTextEncoder:
    """Looks up precomputed token states in an ``.npz``; layout in the module docstring.

    Args:
      path: the ``.npz`` file.
      max_tokens: pad / truncate to this Lt; the file's Lt when None.

    Raises:
      FileNotFoundError: when ``path`` does not exist.
      ValueError: on a bad layout, naming the file and the offending key.
    """

    name = "file"

    def __init__(self, path: str, max_tokens: int | None = None) -> None:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"text embedding file {path!r} does not exist")
        self.path = path
        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path}: not a readable .npz file ({e})") from e
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError(f"{path}: expected an .npz archive of named arrays, got one array")
        with data:
            arrays = {}
            for key in ("instructions", "tokens", "mask"):
                if key not in data:
                    raise ValueError(
                        f"{path}: missing key {key!r}; expected keys instructions, tokens, mask "
                        f"(found {sorted(data.files)})"
                    )
                try:
                    arrays[key] = data[key]
                except ValueError as e:  # object arrays need pickle, which stays off
                    raise ValueError(
                        f"{path}: key {key!r} cannot be read without pickle ({e}); store "
                        "instructions as a numpy unicode array, e.g. np.array(list_of_str)"
                    ) from e
        self._tokens, self._mask, names = self._check_layout(arrays)
        self._index = {s: i for i, s in enumerate(names)}
        self.dim = int(self._tokens.shape[2])
        file_tokens = int(self._tokens.shape[1])
        if max_tokens is not None:
            check_positive("max_tokens", max_tokens)
        self.max_tokens = file_tokens if max_tokens is None else int(max_tokens)
        self._sha256 = sha256_file(path)

    def _check_layout(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, list]:
        path = self.path
        instr, tokens, mask = arrays["instructions"], arrays["tokens"], arrays["mask"]
        if instr.ndim != 1 or instr.dtype.kind != "U":
            raise ValueError(
                f"{path}: key 'instructions' must be a 1-D unicode str array, got "
                f"{instr.dtype}{list(instr.shape)}"
            )
        if tokens.ndim != 3 or not np.issubdtype(tokens.dtype, np.floating):
            raise ValueError(
                f"{path}: key 'tokens' must be float[M Lt D], got "
                f"{tokens.dtype}{list(tokens.shape)}"
            )
        m = instr.shape[0]
        if tokens.shape[0] != m or 0 in tokens.shape[1:]:
            raise ValueError(
                f"{path}: key 'tokens' has shape {list(tokens.shape)}, expected [{m} Lt D] with "
                f"Lt, D > 0 ({m} instructions)"
            )
        if mask.dtype != bool or mask.shape != tokens.shape[:2]:
            raise ValueError(
                f"{path}: key 'mask' must be bool{list(tokens.shape[:2])} to match 'tokens', "
                f"got {mask.dtype}{list(mask.shape)}"
            )
        tokens = tokens.astype(np.float32)
        if not np.all(np.isfinite(tokens[mask])):
            raise ValueError(f"{path}: key 'tokens' has NaN or inf at unmasked positions")
        tokens[~mask] = 0.0
        names = [str(s).strip() for s in instr]
        seen: dict[str, int] = {}
        for i, s in enumerate(names):
            if s in seen:
                raise ValueError(
                    f"{path}: key 'instructions' has {s!r} twice (rows {seen[s]} and {i}) "
                    "after stripping whitespace"
                )
            seen[s] = i
            if s and not mask[i].any():
                raise ValueError(f"{path}: key 'mask' is all False for instruction {s!r}")
        return tokens, mask, names

    def __len__(self) -> int:
        return len(self._index)

    def encode(self, instructions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Looks instructions up.

        Args:
          instructions: [M] strings, matched after ``.strip()``.

        Returns:
          ``(tokens float32[M Lt D], mask bool[M Lt])``.

        Raises:
          ValueError: when an instruction is not in the file.
        """
        instructions = check_instructions(instructions)
        tokens = np.zeros((len(instructions), self.max_tokens, self.dim), np.float32)
        mask = np.zeros((len(instructions), self.max_tokens), bool)
        for i, text in enumerate(instructions):
            key = text.strip()
            if not key:
                continue
            row = self._index.get(key)
            if row is None:
                raise ValueError(
                    f"instruction {key!r} is not in {self.path} ({len(self._index)} "
                    "instructions); regenerate the file to cover every instruction"
                )
            tokens[i], mask[i] = pad_tokens(self._tokens[row], self._mask[row], self.max_tokens)
        warn_truncated(self, self.token_counts(instructions), instructions)
        return tokens, mask

    def token_counts(self, instructions: Sequence[str]) -> list[int]:
        """Real (unmasked) token states of each instruction in the file; 0 for empty or absent
        instructions (``encode`` refuses the absent ones)."""
        rows = [self._index.get(s.strip()) for s in check_instructions(instructions)]
        return [0 if r is None else int(self._mask[r].sum()) for r in rows]

    def describe(self) -> dict[str, Any]:
        """JSON-able options recording exactly how text was embedded."""
        return {
            "backend": self.name,
            "path": os.path.abspath(self.path),
            "sha256": self._sha256,
            "num_instructions": len(self._index),
            "dim": self.dim,
            "max_tokens": self.max_tokens,
            "file_max_tokens": int(self._tokens.shape[1]),
        }
