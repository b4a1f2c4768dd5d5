"""Blocks shared by the FLIP models: attention, MLPs, transformer layers, embeddings, adaLN.

Every parameter carries logical axis names (``embed``, ``mlp``, ``heads``, ``kv``, ``patch``,
``vocab``) that ``flipjax.sharding.LOGICAL_RULES`` maps onto the mesh, so the same module runs
replicated, FSDP-sharded or tensor-parallel. Shapes use the glossary of ``flipjax.typing``:
B batch, L/S sequence lengths, D model width, H heads, K head width.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any

# torch.nn.Linear / timm initialise differently; training recipes set their own inits, these
# defaults follow DiT (xavier-uniform weights, zero biases).
default_kernel_init = nn.initializers.xavier_uniform()


def dense(features: int, axes: tuple[str | None, str | None], *, use_bias: bool = True,
          dtype: Dtype = jnp.float32, kernel_init: Callable = default_kernel_init,
          name: str | None = None) -> nn.Dense:
    """A Dense layer whose kernel [in out] is annotated with logical ``axes``.

    A square projection names its output ``mlp``, not ``embed`` again: one mesh axis cannot
    shard two dimensions of the same array.
    """
    named = [a for a in axes if a is not None]
    if len(named) != len(set(named)):
        raise ValueError(f"logical axes {axes} repeat a name; use e.g. ('embed', 'mlp')")
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(kernel_init, axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)))


def layer_norm(eps: float = 1e-5, *, use_scale: bool = True, use_bias: bool = True,
               dtype: Dtype = jnp.float32, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm over the last axis (statistics in float32 whatever the compute dtype)."""
    return nn.LayerNorm(epsilon=eps, use_scale=use_scale, use_bias=use_bias, dtype=dtype,
                        param_dtype=jnp.float32, name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


# ------------------------------------------------------------------------------------------
# Fixed sin-cos tables (MAE / DiT convention; not parameters)
# ------------------------------------------------------------------------------------------


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """float32[P dim]: [sin(p w_i), cos(p w_i)] with w_i = 10000^(-i / (dim/2))."""
    if dim % 2:
        raise ValueError(f"sin-cos width must be even, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.asarray(positions, np.float64).reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


def sincos_2d(dim: int, height: int, width: int) -> np.ndarray:
    """float32[(height width) dim] for a row-major grid of patches.

    The first half of the channels encodes the column and the second half the row, the
    layout of MAE's ``get_2d_sincos_pos_embed`` that FLIP's checkpoints were trained with.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos width must be divisible by 4, got {dim}")
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)


def timestep_frequencies(t: Array, dim: int = 256, max_period: float = 10000.0) -> Array:
    """float32[B dim] DiT timestep features: [cos(t f_i), sin(t f_i)], f_i = T^(-i/(dim/2))."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """t int/float[B] -> float[B D]: sinusoidal features, Linear, SiLU, Linear (DiT)."""

    hidden: int
    frequency_dim: int = 256
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t: Array) -> Array:
        init = nn.initializers.normal(0.02)
        x = timestep_frequencies(t, self.frequency_dim).astype(self.dtype)
        x = dense(self.hidden, (None, "embed"), kernel_init=init, dtype=self.dtype,
                  name="fc1")(x)
        return dense(self.hidden, ("embed", "mlp"), kernel_init=init, dtype=self.dtype,
                     name="fc2")(nn.silu(x))


# ------------------------------------------------------------------------------------------
# Attention
# ------------------------------------------------------------------------------------------


# jax.nn.dot_product_attention's implementations: None (XLA's, which XLA fuses on TPU), "xla"
# (the same, named) and "cudnn" (cuDNN's fused flash kernel on NVIDIA GPUs: bf16 / fp16
# inputs, head width at most 128).
ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn")


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array | None = None,
                          implementation: str | None = None) -> Array:
    """Softmax attention through ``jax.nn.dot_product_attention`` (logits and softmax in
    float32), so an accelerator can run its fused kernel.

    Args:
      q: float[B Lq H K]; k, v: float[B Lk H K], all of one dtype.
      mask: bool broadcastable to [B H Lq Lk], True where attending is allowed.
      implementation: one of ``ATTENTION_IMPLEMENTATIONS``.

    Returns:
      float[B Lq H K] in q's dtype.

    Raises:
      ValueError: for an unknown implementation or a mask of more than 4 axes.
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of "
                         f"{ATTENTION_IMPLEMENTATIONS}, got {implementation!r}")
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        if mask.ndim > 4:
            raise ValueError(f"attention mask must broadcast to [B H Lq Lk], got {mask.shape}")
        # jax.nn wants exactly four axes; leading ones broadcast as before.
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def reference_attention(q: Array, k: Array, v: Array, mask: Array | None = None) -> Array:
    """The einsum softmax attention :func:`dot_product_attention` replaced; kept as the parity
    reference of its tests. Same arguments and result."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("bqhk,bshk->bhqs", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqs,bshk->bqhk", weights, v)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections (so keys and values can be
    computed once and reused, e.g. flow tokens shared by every frame and patch).

    ``__call__(x)`` is self-attention; ``__call__(x, context)`` attends from x to context;
    ``__call__(x, kv=(k, v))`` reuses keys and values from
    ``module.apply(..., context, method=MultiHeadAttention.keys_values)``.
    """

    num_heads: int
    dim: int
    dtype: Dtype = jnp.float32
    use_bias: bool = True
    implementation: str | None = None  # see ATTENTION_IMPLEMENTATIONS

    def setup(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"width {self.dim} is not divisible by {self.num_heads} heads")
        head = self.dim // self.num_heads

        def proj() -> nn.DenseGeneral:
            return nn.DenseGeneral(
                (self.num_heads, head), use_bias=self.use_bias, dtype=self.dtype,
                kernel_init=nn.with_logical_partitioning(default_kernel_init,
                                                         ("embed", "heads", "kv")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "kv")))

        self.query, self.key, self.value = proj(), proj(), proj()
        self.out = nn.DenseGeneral(
            self.dim, axis=(-2, -1), use_bias=self.use_bias, dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(default_kernel_init,
                                                     ("heads", "kv", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))

    def keys_values(self, context: Array) -> tuple[Array, Array]:
        """(k, v) float[B S H K] of context float[B S D]."""
        return self.key(context), self.value(context)

    def __call__(self, x: Array, context: Array | None = None, mask: Array | None = None,
                 kv: tuple[Array, Array] | None = None) -> Array:
        """Attends from x float[B L D] to context float[B S D] (x itself when None).

        Args:
          x: queries' inputs.
          context: keys' and values' inputs.
          mask: bool broadcastable to [B H L S], True = attend.
          kv: precomputed (k, v) float[B S H K] from :meth:`keys_values` (context ignored).

        Returns:
          float[B L D].
        """
        k, v = self.keys_values(x if context is None else context) if kv is None else kv
        return self.out(dot_product_attention(self.query(x), k, v, mask, self.implementation))


# ------------------------------------------------------------------------------------------
# Feed-forward and transformer layers
# ------------------------------------------------------------------------------------------


class Mlp(nn.Module):
    """fc1 -> activation -> fc2 (timm Mlp; DiT uses tanh-approximated GELU)."""

    hidden: int
    activation: Callable[[Array], Array] = nn.gelu
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        x = dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
        return dense(d, ("mlp", "embed"), dtype=self.dtype, name="fc2")(self.activation(x))


class PostLNEncoderLayer(nn.Module):
    """torch.nn.TransformerEncoderLayer in eval mode (post-LN, ReLU by default):
    x = LN1(x + SelfAttn(x)); x = LN2(x + W2 act(W1 x))."""

    num_heads: int
    mlp_hidden: int
    activation: Callable[[Array], Array] = nn.relu
    eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        """x float[B L D]; mask bool broadcastable to [B H L L] (True = attend)."""
        x = layer_norm(self.eps, dtype=self.dtype, name="norm1")(
            x + MultiHeadAttention(self.num_heads, x.shape[-1], dtype=self.dtype,
                                   name="attn")(x, mask=mask))
        y = Mlp(self.mlp_hidden, self.activation, dtype=self.dtype, name="mlp")(x)
        return layer_norm(self.eps, dtype=self.dtype, name="norm2")(x + y)


def padding_mask(valid: Array) -> Array:
    """bool[B S] valid keys -> bool[B 1 1 S] attention mask (True = attend)."""
    return valid[:, None, None, :]


def modulate(x: Array, shift: Array, scale: Array) -> Array:
    """adaLN: x float[B L D] * (1 + scale[B D]) + shift[B D]."""
    return x * (1 + scale[:, None]) + shift[:, None]


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> D (a strided conv), NHWC in, float[B (h w) D] out."""

    hidden: int
    patch: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, h, w, _ = x.shape
        if h % self.patch or w % self.patch:
            raise ValueError(f"image {h}x{w} is not divisible into {self.patch}px patches")
        y = nn.Conv(self.hidden, (self.patch, self.patch), strides=(self.patch, self.patch),
                    padding="VALID", dtype=self.dtype, name="proj",
                    kernel_init=nn.with_logical_partitioning(
                        default_kernel_init, (None, None, "patch", "embed")),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                           ("embed",)))(x)
        return y.reshape(b, -1, self.hidden)
