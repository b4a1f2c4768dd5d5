"""FLIP's dynamics module: a latent video DiT conditioned on flows and language.

The network denoises SD-VAE latents of a clip ``[B T h w C]`` whose first ``history`` frames are
clean observations and whose last ``flow_horizon - 1`` frames are noised futures. Tokens are
2x2 latent patches with fixed sin-cos embeddings over patches and over frames. Blocks alternate
spatial attention (the patches of one frame; even blocks) and temporal attention (one patch
across frames; odd blocks), as in the official ``DynamicsModel``. Each block is

    x += gate_msa * SelfAttn(modulate(LN(x), shift_msa, scale_msa))
    x += FlowAttn(LN(x); flow tokens)          # no modulation, no gate
    x += gate_mlp * Mlp(modulate(LN(x), shift_mlp, scale_mlp))

with ``LN`` a LayerNorm without affine parameters (eps 1e-6) and the six modulation vectors a
zero-initialised linear map of ``SiLU(timestep embedding + sentence embedding)``.

The flow attention differs from the official implementation in cost only. The official block
concatenates ``[LN(x_g); flow tokens]`` for every group ``g`` (a frame in spatial blocks, a patch
in temporal blocks), runs fused-qkv self-attention over the concatenation and keeps the video
rows. That is attention whose queries are the group's normalised tokens and whose keys/values
are the union of the group's own normalised tokens and the N flow tokens. Here the flow keys
and values are computed once per sample and block (:meth:`VideoDiT.encode_conditions`) and
shared by every group and every sampler step; the softmax runs over the joint logits
``[own | flow]``, so the result is the official one up to float rounding.

Shapes (einops): B batch, T frames, h w latent grid, C latent channels, P patches per frame,
G groups, L tokens per group, N flow points, Lf flow horizon, Lt text tokens, D width, H heads,
K head width.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from flipjax.models import variants
from flipjax.models.flow_tokens import (
    FlowEmbedder,
    motion_mask,
    splat_along_tracks,
    unit_to_cells,
    warp_latents,
)
from flipjax.models.layers import (
    Mlp,
    MultiHeadAttention,
    PatchEmbed,
    PostLNEncoderLayer,
    TimestepEmbedder,
    dense,
    layer_norm,
    padding_mask,
    sincos_1d,
    sincos_2d,
)

Array = jax.Array
Dtype = Any

# Official sizes (DynamicsModel-S/B/L) and a tiny one for tests. The remaining settings are the
# FLIP defaults: 128x128 frames -> 16x16x4 SD-VAE latents, 4 history frames, flow horizon 16.
FLOW_ATTENTION = ("shared", "concat", "cross")
FLOW_EMBEDDING = ("mlp", "positional")
VARIANTS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden=64, depth=4, num_heads=4),
    "S": dict(hidden=384, depth=8, num_heads=6),
    "B": dict(hidden=768, depth=12, num_heads=12),
    "L": dict(hidden=1024, depth=16, num_heads=16),
}


@flax.struct.dataclass
class Conditions:
    """Per-sample conditioning that does not change across diffusion steps.

    Attributes:
      language: float[B D] sentence embedding (added to the timestep embedding).
      flow_kv: one (k, v) pair per block, each float[B N H K]: the flow tokens' keys and values
        in that block's flow attention.
      flow_tokens: float[B N D] the embedded trajectories (used by ``flow_attention="concat"``).
      flow_cells: float[B N Lf 2] the tracks in patch-grid coordinates (col, row), for
        ``flow_splat`` and ``flow_warp``; None otherwise.
    """

    language: Array
    flow_kv: tuple[tuple[Array, Array], ...]
    flow_tokens: Array | None = None
    flow_cells: Array | None = None


def _modulate(x: Array, shift: Array, scale: Array) -> Array:
    """x float[B G L D] * (1 + scale[B D]) + shift[B D], broadcast over groups and tokens."""
    return x * (1 + scale[:, None, None]) + shift[:, None, None]


def _plain_norm(dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
    # DiT's norms carry no affine parameters: adaLN supplies scale and shift instead.
    return layer_norm(1e-6, use_scale=False, use_bias=False, dtype=dtype, name=name)


class FlowCrossAttention(MultiHeadAttention):
    """Attention from a group's normalised tokens to [the group's own tokens; flow tokens].

    Parameters are those of :class:`MultiHeadAttention` (the official fused qkv split in three),
    shared between the video and the flow rows exactly as in the official concatenation.
    """

    def attend(self, x: Array, flow_kv: tuple[Array, Array]) -> Array:
        """Joint-softmax attention without replicating the flow keys/values per group.

        Args:
          x: float[B G L D] normalised tokens, attention runs within each group.
          flow_kv: (k, v) float[B N H K] from :meth:`keys_values` of the flow tokens.

        Returns:
          float[B G L D].
        """
        fk, fv = flow_kv
        if fk.shape[0] != x.shape[0] or fk.ndim != 4:
            raise ValueError(f"flow keys {fk.shape} do not fit tokens {x.shape}")
        q, k, v = self.query(x), self.key(x), self.value(x)  # [B G L H K]
        scale = 1.0 / math.sqrt(q.shape[-1])
        own = jnp.einsum("bglhk,bgshk->bghls", q, k, preferred_element_type=jnp.float32)
        ext = jnp.einsum("bglhk,bnhk->bghln", q, fk, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(jnp.concatenate([own, ext], axis=-1) * scale, axis=-1)
        weights = weights.astype(v.dtype)
        n_own = k.shape[2]
        y = (jnp.einsum("bghls,bgshk->bglhk", weights[..., :n_own], v)
             + jnp.einsum("bghln,bnhk->bglhk", weights[..., n_own:], fv.astype(v.dtype)))
        return self.out(y)


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention, flow attention, adaLN-Zero MLP over groups of tokens."""

    hidden: int
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    flow_attention: str = "shared"
    flow_gate: bool = False

    def setup(self) -> None:
        if self.flow_gate:
            # Flamingo's tanh gate, zero at init: the block starts as if without flow attention.
            self.flow_gate_alpha = self.param(
                "flow_gate", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                (self.hidden,))
        self.self_attn = MultiHeadAttention(self.num_heads, self.hidden, dtype=self.dtype)
        self.cross_attn = FlowCrossAttention(self.num_heads, self.hidden, dtype=self.dtype)
        self.mlp = Mlp(int(self.hidden * self.mlp_ratio),
                       functools.partial(nn.gelu, approximate=True), dtype=self.dtype)
        self.adaLN_modulation = dense(6 * self.hidden, ("embed", None), dtype=self.dtype,
                                      kernel_init=nn.initializers.zeros)
        self.norm = _plain_norm(self.dtype)

    def flow_keys_values(self, flow_tokens: Array) -> tuple[Array, Array]:
        """(k, v) float[B N H K] of flow tokens float[B N D] for this block's flow attention."""
        return self.cross_attn.keys_values(flow_tokens)

    def __call__(self, x: Array, c: Array, flow_kv: tuple[Array, Array],
                 flow_tokens: Array | None = None) -> Array:
        """Args: x float[B G L D] grouped tokens; c float[B D]; flow_kv float[B N H K] pair;
        flow_tokens float[B N D] (only for ``flow_attention="concat"``).

        Returns:
          float[B G L D].
        """
        b, g, n, d = x.shape
        mod = self.adaLN_modulation(nn.silu(c))
        sh_msa, sc_msa, gate_msa, sh_mlp, sc_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        h = _modulate(self.norm(x), sh_msa, sc_msa).reshape(b * g, n, d)
        x = x + gate_msa[:, None, None] * self.self_attn(h).reshape(b, g, n, d)
        # The official concatenation normalises the video rows but does not modulate them.
        if self.flow_attention == "concat":
            y = self._concat_flow_attention(self.norm(x), flow_tokens)
        elif self.flow_attention == "cross":
            y = self.cross_attn(self.norm(x).reshape(b, g * n, d), kv=flow_kv).reshape(b, g, n, d)
        else:
            y = self.cross_attn.attend(self.norm(x), flow_kv)
        if self.flow_gate:
            y = jnp.tanh(self.flow_gate_alpha).astype(y.dtype) * y
        x = x + y
        h = _modulate(self.norm(x), sh_mlp, sc_mlp)
        return x + gate_mlp[:, None, None] * self.mlp(h)


    def _concat_flow_attention(self, x: Array, flow_tokens: Array) -> Array:
        """The official computation: self-attention over [group tokens; all N flow tokens] for
        every group, keeping the group rows. Same result, G times the flow work; kept as the
        cost baseline (benchmarks/models.py) and as an independent check."""
        b, g, n, d = x.shape
        flow = jnp.broadcast_to(flow_tokens[:, None].astype(x.dtype),
                                (b, g, flow_tokens.shape[1], d))
        cat = jnp.concatenate([x, flow], axis=2).reshape(b * g, -1, d)
        return self.cross_attn(cat)[:, :n].reshape(b, g, n, d)


class SentenceEncoder(nn.Module):
    """Per-token language features [B Lt Dl] -> float[B D]: project, prepend a learned cls
    token, post-LN transformer encoder (torch eval semantics), read the cls row, Linear."""

    hidden: int
    num_layers: int = 3
    num_heads: int = 8
    ff_dim: int | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: Array, valid: Array) -> Array:
        """Args: tokens float[B Lt Dl]; valid bool[B Lt] (False = padding). Returns float[B D]."""
        b = tokens.shape[0]
        cls = self.param("cls_token",
                         nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                      (None, None, "embed")),
                         (1, 1, self.hidden))
        x = dense(self.hidden, (None, "embed"), dtype=self.dtype, name="compress_fn")(tokens)
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.hidden)).astype(x.dtype), x], 1)
        valid = jnp.concatenate([jnp.ones((b, 1), bool), valid.astype(bool)], axis=1)
        mask = padding_mask(valid)
        for i in range(self.num_layers):
            x = PostLNEncoderLayer(self.num_heads, self.ff_dim or self.hidden, dtype=self.dtype,
                                   name=f"layers_{i}")(x, mask)
        return dense(self.hidden, ("embed", "mlp"), dtype=self.dtype,
                     name="output_head")(x[:, 0])


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then Linear to p*p*out channels, zero-initialised."""

    hidden: int
    patch: int
    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, c: Array) -> Array:
        """x float[B G L D], c float[B D] -> float[B G L (p q c)]."""
        mod = dense(2 * self.hidden, ("embed", None), dtype=self.dtype,
                    kernel_init=nn.initializers.zeros, name="adaLN_modulation")(nn.silu(c))
        shift, scale = jnp.split(mod, 2, axis=-1)
        x = _modulate(_plain_norm(self.dtype, name="norm_final")(x), shift, scale)
        return dense(self.patch * self.patch * self.out_channels, ("embed", None),
                     dtype=self.dtype, kernel_init=nn.initializers.zeros, name="linear")(x)


class VideoDiT(nn.Module):
    """FLIP dynamics model (latent video DiT); its fields are the dynamics config.

    ``VideoDiT.variant("S", history=2)`` builds a named size of :data:`VARIANTS`.

    Attributes:
      hidden, depth, num_heads, mlp_ratio: transformer size (depth must be even).
      patch: latent patch size.
      in_channels: latent channels C.
      latent_size: (h, w) of the latents.
      flow_horizon: Lf, points per trajectory; the clip has history + Lf - 1 frames.
      history: clean observation frames at the start of the clip.
      learn_sigma: output 2C channels (eps and the learned-range variance) instead of C.
      text_dim, text_layers, text_heads, text_ff: sentence encoder (text_ff default: hidden).
      dtype: compute dtype (parameters stay float32).
      remat: rematerialise each block in the backward pass.
      flow_attention: ``"shared"`` (flow keys/values once per sample, shared by every group),
        ``"concat"`` (the official replication of the flow tokens into every group; same
        output, kept as the cost baseline) or ``"cross"`` (a departure: plain cross-attention
        to the flow tokens, its own softmax, instead of one softmax shared with the group's
        own tokens, where ~256 flow keys take most of the mass at init).
      flow_gate: a departure: the flow attention's output passes a per-channel tanh gate
        initialised at zero, so training starts from the unconditioned video model.
      flow_embedding: ``"mlp"`` (official) or ``"positional"`` (a departure: flow tokens carry
        the video tokens' position embedding along their path; flows in unit coordinates).
      flow_splat: a departure (flows in unit coordinates): every future frame's tokens also
        receive the current frame's tokens carried along the tracks to where the tracks are
        at that frame (:func:`splat_along_tracks`), through a zero-initialised projection.
      flow_warp: a departure (flows in unit coordinates): the current frame's clean latents
        forward-warped along the tracks at latent resolution (:func:`warp_latents`, finer than
        a patch; what moves covers what it lands on, the place it leaves is filled from its
        surroundings), patchified and added to each future frame's tokens through a
        zero-initialised projection: the frame the flow predicts, for the model to correct.
      flow_residual: a departure for x0 prediction (flows in unit coordinates): the future
        frames' output is the warp above plus the network's output, so an untrained model
        predicts the warped current frame and training learns the correction.
      residual_gate: a departure on top of ``flow_residual``: the network corrects only the
        cells near a moving track (:func:`motion_mask`); elsewhere the prediction is the
        current frame itself, so what the flow holds still is copied, not re-rendered.
    """

    hidden: int = 384
    depth: int = 8
    num_heads: int = 6
    mlp_ratio: float = 4.0
    patch: int = 2
    in_channels: int = 4
    latent_size: tuple[int, int] = (16, 16)
    flow_horizon: int = 16
    history: int = 4
    learn_sigma: bool = True
    text_dim: int = 4096
    text_layers: int = 3
    text_heads: int = 8
    text_ff: int | None = None
    dtype: Dtype = jnp.float32
    remat: bool = False
    flow_attention: str = "shared"
    flow_gate: bool = False
    flow_embedding: str = "mlp"
    flow_splat: bool = False
    flow_warp: bool = False
    flow_residual: bool = False
    residual_gate: bool = False

    @classmethod
    def variant(cls, name: str, **overrides: Any) -> VideoDiT:
        """The :data:`VARIANTS` size ``name`` ("tiny", "S", "B", "L") with field overrides.

        Raises:
          ValueError: an unknown name.
        """
        return cls(**variants.resolve("DiT", VARIANTS, name, overrides))

    @property
    def num_frames(self) -> int:
        return self.history + self.flow_horizon - 1

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    def setup(self) -> None:
        if self.flow_attention not in FLOW_ATTENTION:
            raise ValueError(f"flow_attention must be one of {FLOW_ATTENTION}, got "
                             f"{self.flow_attention!r}")
        if self.depth % 2:
            raise ValueError(f"depth must be even (spatial/temporal pairs), got {self.depth}")
        h, w = self.latent_size
        if h % self.patch or w % self.patch:
            raise ValueError(f"latents {h}x{w} are not divisible into {self.patch}-patches")
        self.language_encoder = SentenceEncoder(self.hidden, self.text_layers, self.text_heads,
                                                self.text_ff, dtype=self.dtype)
        self.x_embedder = PatchEmbed(self.hidden, self.patch, dtype=self.dtype)
        self.t_embedder = TimestepEmbedder(self.hidden, dtype=self.dtype)
        if self.flow_embedding not in FLOW_EMBEDDING:
            raise ValueError(f"flow_embedding must be one of {FLOW_EMBEDDING}, got "
                             f"{self.flow_embedding!r}")
        self.flow_embedder = FlowEmbedder(self.hidden, dtype=self.dtype,
                                          embedding=self.flow_embedding,
                                          grid=(h // self.patch, w // self.patch))
        block = nn.remat(DiTBlock) if self.remat else DiTBlock
        self.blocks = [block(self.hidden, self.num_heads, self.mlp_ratio, dtype=self.dtype,
                             flow_attention=self.flow_attention, flow_gate=self.flow_gate)
                       for _ in range(self.depth)]
        self.final_layer = FinalLayer(self.hidden, self.patch, self.out_channels,
                                      dtype=self.dtype)
        if self.flow_splat:
            self.splat_proj = dense(self.hidden, (None, "embed"), dtype=self.dtype,
                                    kernel_init=nn.initializers.zeros, name="flow_splat")
        if self.flow_warp:
            self.warp_proj = dense(self.hidden, (None, "embed"), dtype=self.dtype,
                                   kernel_init=nn.initializers.zeros, name="flow_warp")

    # -------------------------------------------------------------------------------------

    def encode_conditions(self, flow: Array, text_tokens: Array, text_mask: Array) -> Conditions:
        """Everything that stays fixed while a sample is denoised; compute once per sample.

        Args:
          flow: float[B N Lf 2] point trajectories (pixels or normalised, as trained).
          text_tokens: float[B Lt Dl] per-token language features.
          text_mask: bool[B Lt], True for real tokens (officially: rows that are not all zero).

        Returns:
          :class:`Conditions`.
        """
        b = flow.shape[0]
        if flow.ndim != 4 or flow.shape[2:] != (self.flow_horizon, 2):
            raise ValueError(f"flow must be [B N {self.flow_horizon} 2], got {flow.shape}")
        if text_tokens.ndim != 3 or text_tokens.shape[0] != b \
                or text_tokens.shape[2] != self.text_dim:
            raise ValueError(f"text_tokens must be [{b} Lt {self.text_dim}], "
                             f"got {text_tokens.shape}")
        if text_mask.shape != text_tokens.shape[:2]:
            raise ValueError(f"text_mask {text_mask.shape} does not match text_tokens "
                             f"{text_tokens.shape}")
        language = self.language_encoder(text_tokens.astype(self.dtype), text_mask)
        tokens = self.flow_embedder(flow)
        flow_kv = tuple(blk.flow_keys_values(tokens) for blk in self.blocks)
        cells = None
        if self.flow_splat or self.flow_warp or self.flow_residual:
            hp, wp = (n // self.patch for n in self.latent_size)
            cells = unit_to_cells(flow.astype(jnp.float32), (hp, wp))
        return Conditions(language=language, flow_kv=flow_kv, flow_tokens=tokens,
                          flow_cells=cells)

    def denoise(self, x: Array, t: Array, cond: Conditions,
                history: Array | None = None) -> Array:
        """One network evaluation given precomputed conditions.

        Args:
          x: float[B T h w C] latents. With ``history`` None, the whole clip (T = history +
            Lf - 1, history frames clean); otherwise only the frames that follow ``history``.
          t: int/float[B] diffusion timesteps.
          cond: from :meth:`encode_conditions`.
          history: optional float[B Th h w C] clean frames to prepend.

        Returns:
          float32[B T h w out_channels] for the frames of ``x`` (eps, then the variance values
          in [-1, 1] when ``learn_sigma``).
        """
        n_hist = 0
        if history is not None:
            if history.ndim != 5 or history.shape[0] != x.shape[0] \
                    or history.shape[2:] != x.shape[2:]:
                raise ValueError(f"history {history.shape} does not fit latents {x.shape}")
            n_hist = history.shape[1]
            x = jnp.concatenate([history.astype(x.dtype), x], axis=1)
        b, nt, h, w, c = x.shape
        if (h, w) != tuple(self.latent_size) or c != self.in_channels:
            raise ValueError(f"latents must be [B T {self.latent_size[0]} {self.latent_size[1]} "
                             f"{self.in_channels}], got {x.shape}")
        if nt != self.num_frames:
            raise ValueError(f"the clip must have history + flow_horizon - 1 = {self.num_frames} "
                             f"frames, got {nt}")
        if t.shape != (b,):
            raise ValueError(f"t must be [{b}], got {t.shape}")
        hp, wp = h // self.patch, w // self.patch

        tokens = self.x_embedder(x.reshape(b * nt, h, w, c).astype(self.dtype))
        pos = sincos_2d(self.hidden, hp, wp)[None]
        temp = sincos_1d(self.hidden, np.arange(nt))[:, None]
        tokens = tokens.reshape(b, nt, hp * wp, self.hidden) + jnp.asarray(
            pos + temp, self.dtype)

        if self.flow_splat:
            tokens = tokens + self._splat(tokens, cond.flow_cells, (hp, wp))
        warped = self._warped(x, cond.flow_cells) if self.flow_warp or self.flow_residual \
            else None
        if self.flow_warp:
            tokens = tokens + self._warp(warped)
        c_vec = self.t_embedder(t) + cond.language
        for i in range(0, self.depth, 2):
            tokens = self.blocks[i](tokens, c_vec, cond.flow_kv[i], cond.flow_tokens)  # B T P D
            tokens = rearrange(tokens, "b t p d -> b p t d")
            tokens = self.blocks[i + 1](tokens, c_vec, cond.flow_kv[i + 1],
                                        cond.flow_tokens)                            # B P T D
            tokens = rearrange(tokens, "b p t d -> b t p d")
        y = self.final_layer(tokens, c_vec)
        y = rearrange(y, "b t (h w) (p q c) -> b t (h p) (w q) c", h=hp, p=self.patch,
                      q=self.patch).astype(jnp.float32)
        if self.flow_residual:
            future, anchor = y[:, self.history:, ..., :c], warped[..., :c]
            if self.residual_gate:
                m = motion_mask(cond.flow_cells, self.patch, (h, w))
                anchor = m * anchor + (1 - m) * x[:, self.history - 1:self.history, ...,
                                                  :c].astype(jnp.float32)
                future = m * future
            y = y.at[:, self.history:, ..., :c].set(future + anchor)
        return y[:, n_hist:]

    def _splat(self, tokens: Array, cells: Array, grid: tuple[int, int]) -> Array:
        """float[B T P D] additions: zero on the history, the projected splat on the futures."""
        if cells is None:
            raise ValueError("flow_splat needs Conditions.flow_cells (encode_conditions)")
        b, _, _, d = tokens.shape
        current = tokens[:, self.history - 1]
        moved, count = splat_along_tracks(current, cells, grid)    # B Lf-1 P D, B Lf-1 P 1
        add = self.splat_proj(jnp.concatenate([moved, count], axis=-1).astype(self.dtype))
        return jnp.concatenate([jnp.zeros((b, self.history, add.shape[2], d), add.dtype), add],
                               axis=1)

    def _warped(self, x: Array, cells: Array | None) -> Array:
        """float32[B Lf-1 h w (C+1)]: the current latents warped along the tracks (with the
        deposited weight), one per future frame."""
        if cells is None:
            raise ValueError("flow_warp / flow_residual need Conditions.flow_cells "
                             "(encode_conditions)")
        return warp_latents(x[:, self.history - 1], cells, self.patch)

    def _warp(self, warped: Array) -> Array:
        """float[B T P D] additions: zero on the history, the projected warp on the futures."""
        b = warped.shape[0]
        patches = rearrange(warped, "b k (h p) (w q) c -> b k (h w) (p q c)", p=self.patch,
                            q=self.patch)
        add = self.warp_proj(patches.astype(self.dtype))
        return jnp.concatenate(
            [jnp.zeros((b, self.history, *add.shape[2:]), add.dtype), add], axis=1)

    def __call__(self, x: Array, t: Array, flow: Array, text_tokens: Array,
                 text_mask: Array) -> Array:
        """float[B T h w C] whole clip -> float32[B T h w out_channels] (see :meth:`denoise`)."""
        return self.denoise(x, t, self.encode_conditions(flow, text_tokens, text_mask))
