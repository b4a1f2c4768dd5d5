"""Language instructions -> token-level embeddings ``tokens float32[Lt D]`` + ``mask bool[Lt]``.

FLIP conditions on per-token language states. They are computed offline, once per distinct
instruction, by one of these backends (``make_text_encoder(name, **options)``):

``hash`` (``HashedTokenEncoder``)
  Deterministic and weight-free, the embedded default. Each lower-cased word (runs of letters
  and digits; punctuation dropped) maps to a unit-norm vector drawn from a SHAKE-256 stream of
  ``(seed, word)``, plus a small sin-cos position term so that word order matters. Identical
  across processes, machines and numpy versions.
``file`` (``FileTextEncoder``)
  Looks instructions up in a user-given ``.npz``, which is how externally computed states (the
  paper's Llama 3.1 8B hidden states) get in. Layout, all arrays with matching leading axes:

  - ``instructions``: str[M], unicode (numpy ``<U``) array; matched after ``.strip()``.
  - ``tokens``: float16 / float32 / float64 [M Lt D], token states, padded to a common Lt.
  - ``mask``: bool[M Lt], True on real tokens; padded positions are zeroed on load.

  It can be written with ``np.savez(path, instructions=np.array(strs), tokens=t, mask=m)``.
``minilm`` (``MiniLMEncoder``)
  Last-layer token states (384-d) of the pretrained sentence-transformers/all-MiniLM-L6-v2,
  a BERT forward pass in numpy (``data_pipelines.text.bert``); any BERT model dir works.

The dataset's own sentence embedding (e.g. BridgeData's 512-d ``language_embedding``) is not a
backend: callers turn it into a single token with ``sentence_embedding_tokens``.

Every backend maps an empty or whitespace-only instruction to all-zero tokens with an all-False
mask, so that callers can count and drop instruction-less clips instead of training on zeros
that look valid.

No instruction is cut silently: every backend reports the tokens each instruction needs
(``token_counts``), ``encode`` warns (:class:`TextTruncationWarning`) naming any instruction
longer than ``max_tokens``, and ``build_clips`` counts them in its manifest.
"""

from __future__ import annotations

import inspect
from typing import Any

from data_pipelines.text.base import (
    TextEncoder,
    TextTruncationWarning,
    is_empty_instruction,
    pad_tokens,
    sentence_embedding_tokens,
    truncated,
)
from data_pipelines.text.file import FileTextEncoder
from data_pipelines.text.hashed import HashedTokenEncoder
from data_pipelines.text.minilm import MiniLMEncoder

_BACKENDS: dict[str, type] = {
    "hash": HashedTokenEncoder,
    "file": FileTextEncoder,
    "minilm": MiniLMEncoder,
}


def make_text_encoder(name: str, **options: Any) -> TextEncoder:
    """Builds a text encoder by backend name.

    Args:
      name: "hash", "file" or "minilm".
      **options: the backend's constructor arguments.

    Returns:
      The encoder.

    Raises:
      ValueError: on an unknown name or option; "dataset" is explained, not built.
    """
    if name == "dataset":
        raise ValueError(
            "text backend 'dataset' uses the dataset's own sentence embedding and is handled by "
            "the caller with sentence_embedding_tokens(); make_text_encoder builds only "
            f"{sorted(_BACKENDS)}"
        )
    if name not in _BACKENDS:
        raise ValueError(f"unknown text backend {name!r}; valid names: {sorted(_BACKENDS)}")
    cls = _BACKENDS[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"text backend {name!r} got unknown options {unknown}; accepts {accepted}")
    return cls(**options)


__all__ = [
    "FileTextEncoder", "HashedTokenEncoder", "MiniLMEncoder", "TextEncoder",
    "TextTruncationWarning", "is_empty_instruction", "make_text_encoder", "pad_tokens",
    "sentence_embedding_tokens", "truncated",
]
