"""FLIP value module: a LIV-style vision-language value model whose states are short clips.

LIV (Ma et al. 2023) fine-tunes CLIP so that the cosine similarity between the embedding of an
observation and that of a goal (the last frame, or the instruction) is a goal-conditioned value,
``V(s; g) = cos(phi(s), phi(g)) / (1 - gamma)`` (:mod:`flipjax.models.value_loss` has the
losses and the references). FLIP scores long, imperfect generated videos with it, where a single
frame is ambiguous (occlusions, blur, a gripper pausing); so a state here is a short clip:

  1. Every frame goes through a CLIP ViT image tower (patch conv, class token, learned positions,
     pre-LN transformer with QuickGELU, ``ln_post`` on the class token) -> float[B Tc Dv].
  2. A temporal fusion pools the Tc frame features -> float[B Dv] (``ValueConfig.
     temporal_fusion``): ``"mean"`` averages them; ``"attention"`` adds a learned temporal
     position embedding, runs a small pre-LN transformer over the Tc frame tokens and adds its
     update to every frame through a per-channel gate initialised at 0 before averaging, so an
     untrained fusion is exactly the mean and a pretrained CLIP's features are not disturbed.
  3. CLIP's bias-free projection -> float[B E].

A one-frame clip skips the fusion altogether, so ``clip_len=1`` is LIV's single-frame model
whatever the fusion (``embed_frame``).

Images are float[... H W 3] in [-1, 1] inside flipjax; the image tower maps them to [0, 1] and
then applies CLIP's per-channel normalisation ((x - CLIP_MEAN) / CLIP_STD), so checkpoints
converted from OpenAI CLIP / LIV see the statistics they were trained with. Frames must already
be ``image_size`` square (CLIP: resize the short side to 224 and centre-crop, done by the data
pipeline).

Departure from CLIP's text tower: the data pipeline stores instructions as float token states
float[B Lt D_in] (hashed tokens, MiniLM or Llama hidden states) with a validity mask, not BPE
ids, so ``token_embedding`` is replaced by a Linear D_in -> Dt. The tokens then get learned
positions and go through CLIP's pre-LN transformer. Pooling (``text_pool``): ``"cls"`` appends a
learned summary token at the front and attends bidirectionally over the valid tokens (the
default: there is no EOT token to point at); ``"last"`` is CLIP's recipe, a causal mask and the
features of the last valid token. Padded tokens are masked out of attention and pooling either
way, so they never change the embedding.

Departure (``ValueConfig.text_conditioning``, off by default): the official value is the cosine
of two separate towers' embeddings, so the image embedding must carry everything any
instruction could ask about. With ``"token"`` the instruction's pooled text features (before
``text_proj``) enter the image tower as one extra token after the class token (a Linear Dt ->
Dv), so the image tower can look for what the instruction names; the value is still the cosine
of the (now instruction-dependent) clip embedding and the text embedding, and :meth:`ValueModel.
__call__` (the planner's entry) passes the instruction through. ``"none"`` is the official model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flipjax import shapes
from flipjax.models import variants
from flipjax.models.layers import (
    Mlp,
    MultiHeadAttention,
    PatchEmbed,
    dense,
    layer_norm,
    padding_mask,
)
from flipjax.models.value_loss import DEFAULT_GAMMA, value_from_embeddings
from flipjax.typing import Array

Dtype = Any

# OpenAI CLIP's preprocessing statistics, for images in [0, 1] (clip.py, LIV model_liv.py).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# CLIP's LayerNorm is torch's default.
LN_EPS = 1e-5

FUSIONS = ("mean", "attention")
TEXT_POOLS = ("cls", "last")
CONDITIONINGS = ("none", "token")


def quick_gelu(x: Array) -> Array:
    """CLIP's activation, x * sigmoid(1.702 x) (its checkpoints need it, not exact GELU)."""
    return x * jax.nn.sigmoid(1.702 * x)


def clip_normalize(images: Array) -> Array:
    """float[... H W 3] in [-1, 1] -> CLIP-normalised float[... H W 3]."""
    mean = jnp.asarray(CLIP_MEAN, images.dtype)
    std = jnp.asarray(CLIP_STD, images.dtype)
    return ((images + 1.0) * 0.5 - mean) / std


class PreLNBlock(nn.Module):
    """CLIP ``ResidualAttentionBlock``: x += Attn(LN1(x)); x += Mlp(LN2(x)) with QuickGELU.

    Not in :mod:`flipjax.models.layers` (which has the post-LN torch layer only); kept here as
    the value module is its only user so far.
    """

    num_heads: int
    mlp_ratio: int = 4
    activation: Callable[[Array], Array] = quick_gelu
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        """x float[B L D]; mask bool broadcastable to [B H L L] (True = attend) -> float[B L D]."""
        d = x.shape[-1]
        h = layer_norm(LN_EPS, dtype=self.dtype, name="ln_1")(x)
        x = x + MultiHeadAttention(self.num_heads, d, dtype=self.dtype, name="attn")(h, mask=mask)
        h = layer_norm(LN_EPS, dtype=self.dtype, name="ln_2")(x)
        return x + Mlp(self.mlp_ratio * d, self.activation, dtype=self.dtype, name="mlp")(h)


@dataclasses.dataclass(frozen=True)
class ValueConfig:
    """Sizes of the value model (defaults: CLIP ViT-B/16, LIV's gamma, 4-frame clips).

    Attributes:
      image_size: square frame side in pixels (multiple of ``patch``).
      patch: ViT patch side.
      vision_width, vision_layers, vision_heads: image transformer.
      text_width, text_layers, text_heads: text transformer.
      max_text_len: longest token sequence (CLIP's context length, 77).
      text_pool: ``"cls"`` (learned summary token) or ``"last"`` (causal, last valid token).
      embed_dim: joint embedding width E.
      clip_len: frames per state Tc used by :func:`clip_states` callers; 1 = LIV.
      max_clip_len: longest clip the temporal position table covers.
      temporal_fusion: ``"mean"`` or ``"attention"`` (module docstring).
      temporal_layers: transformer layers of the attention fusion.
      mlp_ratio: MLP hidden width / model width.
      gamma: discount of the value V = cos / (1 - gamma).
      text_conditioning: ``"none"`` (official: separate towers) or ``"token"`` (a departure:
        the instruction's text features are an extra token of the image tower; module
        docstring).
      dtype: compute dtype (parameters stay float32).
    """

    image_size: int = 224
    patch: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    max_text_len: int = 77
    text_pool: str = "cls"
    embed_dim: int = 512
    clip_len: int = 4
    max_clip_len: int = 16
    temporal_fusion: str = "mean"
    temporal_layers: int = 1
    mlp_ratio: int = 4
    gamma: float = DEFAULT_GAMMA
    text_conditioning: str = "none"
    dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        if self.image_size % self.patch:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch "
                             f"{self.patch}")
        if self.temporal_fusion not in FUSIONS:
            raise ValueError(f"temporal_fusion must be one of {FUSIONS}, got "
                             f"{self.temporal_fusion!r}")
        if self.text_pool not in TEXT_POOLS:
            raise ValueError(f"text_pool must be one of {TEXT_POOLS}, got {self.text_pool!r}")
        if self.text_conditioning not in CONDITIONINGS:
            raise ValueError(f"text_conditioning must be one of {CONDITIONINGS}, got "
                             f"{self.text_conditioning!r}")
        if not 1 <= self.clip_len <= self.max_clip_len:
            raise ValueError(f"clip_len must be in [1, max_clip_len={self.max_clip_len}], got "
                             f"{self.clip_len}")
        if not 0.0 <= self.gamma < 1.0:
            raise ValueError(f"gamma must be in [0, 1), got {self.gamma}")

    @classmethod
    def variant(cls, name: str, **overrides: Any) -> ValueConfig:
        """The :data:`VARIANTS` entry ``name`` ("clip-b16", "liv-b16", "tiny") with overrides.

        Raises:
          ValueError: an unknown name, or overrides that :meth:`__post_init__` refuses.
        """
        return cls(**variants.resolve("value", VARIANTS, name, overrides))

    @property
    def grid(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch


VARIANTS: dict[str, dict[str, Any]] = {
    # CLIP ViT-B/16 towers, FLIP's clip states.
    "clip-b16": {},
    # The official single-frame LIV with a ViT-B/16 (LIV's released model is RN50).
    "liv-b16": dict(clip_len=1),
    # Unit tests and toy tasks: 16x16 frames, 2-layer towers.
    "tiny": dict(image_size=16, patch=4, vision_width=32, vision_layers=2, vision_heads=2,
                 text_width=32, text_layers=2, text_heads=2, max_text_len=16, embed_dim=32,
                 clip_len=3, max_clip_len=8),
}


def _embedding_param(module: nn.Module, name: str, shape: tuple[int, ...], std: float,
                     axes: tuple[str | None, ...]) -> Array:
    init = nn.with_logical_partitioning(nn.initializers.normal(std), axes)
    return module.param(name, init, shape, jnp.float32)


class VisionTower(nn.Module):
    """CLIP ViT image tower up to ``ln_post`` (the projection lives in :class:`ValueModel`)."""

    config: ValueConfig

    @nn.compact
    def __call__(self, images: Array, condition: Array | None = None) -> Array:
        """images float[N H W 3] in [-1, 1] (condition float[N Dt] with ``text_conditioning=
        "token"``) -> class-token features float[N Dv]."""
        cfg = self.config
        d = cfg.vision_width
        x = PatchEmbed(d, cfg.patch, dtype=cfg.dtype, name="patch_embed")(
            clip_normalize(images.astype(cfg.dtype)))  # [N P Dv]
        # CLIP initialises class token and positions with std width^-1/2.
        cls = _embedding_param(self, "class_embedding", (d,), d ** -0.5, ("embed",))
        pos = _embedding_param(self, "positional_embedding", (cfg.grid ** 2 + 1, d), d ** -0.5,
                               (None, "embed"))
        cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, d))
        x = jnp.concatenate([cls, x], axis=1) + pos.astype(x.dtype)
        if cfg.text_conditioning == "token":
            tok = dense(d, (None, "embed"), dtype=cfg.dtype, name="text_token")(
                condition.astype(cfg.dtype))
            x = jnp.concatenate([x[:, :1], tok[:, None], x[:, 1:]], axis=1)
        x = layer_norm(LN_EPS, dtype=cfg.dtype, name="ln_pre")(x)
        for i in range(cfg.vision_layers):
            x = PreLNBlock(cfg.vision_heads, cfg.mlp_ratio, dtype=cfg.dtype, name=f"block{i}")(x)
        return layer_norm(LN_EPS, dtype=cfg.dtype, name="ln_post")(x[:, 0])


class TemporalFusion(nn.Module):
    """Pools per-frame features of a clip, float[B Tc Dv] -> float[B Dv] (module docstring)."""

    config: ValueConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        _, tc, d = x.shape
        if tc > cfg.max_clip_len:
            raise ValueError(f"clip of {tc} frames exceeds max_clip_len={cfg.max_clip_len}")
        if cfg.temporal_fusion == "mean":
            return jnp.mean(x, axis=1)
        pos = _embedding_param(self, "temporal_embedding", (cfg.max_clip_len, d), 0.02,
                               (None, "embed"))
        h = x + pos[:tc].astype(x.dtype)
        for i in range(cfg.temporal_layers):
            h = PreLNBlock(cfg.vision_heads, cfg.mlp_ratio, dtype=cfg.dtype, name=f"block{i}")(h)
        h = layer_norm(LN_EPS, dtype=cfg.dtype, name="ln")(h)
        gate = self.param("gate", nn.with_logical_partitioning(nn.initializers.zeros,
                                                               ("embed",)), (d,), jnp.float32)
        return jnp.mean(x + gate.astype(x.dtype) * h, axis=1)


class TextTower(nn.Module):
    """CLIP text transformer on float token states, up to ``ln_final`` (module docstring)."""

    config: ValueConfig

    @nn.compact
    def __call__(self, tokens: Array, mask: Array) -> Array:
        """tokens float[B Lt D_in], mask bool[B Lt] (True = real token) -> float[B Dt]."""
        cfg = self.config
        b, lt, _ = tokens.shape
        d = cfg.text_width
        x = dense(d, (None, "embed"), dtype=cfg.dtype, name="token_proj")(
            tokens.astype(cfg.dtype))
        # The zero vector for padded slots keeps huge or NaN padding values out of the sums.
        x = jnp.where(mask[..., None], x, 0)
        n = lt + (cfg.text_pool == "cls")
        # CLIP initialises its text positions with std 0.01.
        pos = _embedding_param(self, "positional_embedding", (cfg.max_text_len + 1, d), 0.01,
                               (None, "embed"))
        if cfg.text_pool == "cls":
            cls = _embedding_param(self, "class_embedding", (d,), d ** -0.5, ("embed",))
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d)), x], axis=1)
            valid = jnp.concatenate([jnp.ones((b, 1), bool), mask], axis=1)
            attn_mask = padding_mask(valid)
        else:
            valid = mask
            causal = jnp.tril(jnp.ones((n, n), bool))[None, None]
            attn_mask = causal & padding_mask(valid)
        x = x + pos[:n].astype(x.dtype)
        for i in range(cfg.text_layers):
            x = PreLNBlock(cfg.text_heads, cfg.mlp_ratio, dtype=cfg.dtype, name=f"block{i}")(
                x, attn_mask)
        x = layer_norm(LN_EPS, dtype=cfg.dtype, name="ln_final")(x)
        if cfg.text_pool == "cls":
            return x[:, 0]
        # Last valid position; robust to holes in the mask (an all-padded row pools token 0).
        last = jnp.max(jnp.where(mask, jnp.arange(lt)[None], 0), axis=1)
        return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]


class ValueModel(nn.Module):
    """LIV value model on clip states (module docstring).

    ``init`` with :meth:`__call__` (frames, text tokens, mask) creates every parameter; use
    ``apply(..., method=ValueModel.embed_clip)`` etc. for the parts.
    """

    config: ValueConfig

    def setup(self) -> None:
        cfg = self.config
        self.vision = VisionTower(cfg)
        self.fusion = TemporalFusion(cfg)
        self.text = TextTower(cfg)
        # CLIP's projections have no bias (and std width^-1/2 init).
        self.image_proj = dense(cfg.embed_dim, ("embed", None), use_bias=False, dtype=cfg.dtype,
                                kernel_init=nn.initializers.normal(cfg.vision_width ** -0.5))
        self.text_proj = dense(cfg.embed_dim, ("embed", None), use_bias=False, dtype=cfg.dtype,
                               kernel_init=nn.initializers.normal(cfg.text_width ** -0.5))

    def embed_clip(self, frames: Array, condition: Array | None = None) -> Array:
        """Embeds clip states.

        Args:
          frames: float[B Tc H W 3] in [-1, 1]; Tc <= max_clip_len, H = W = image_size.
          condition: float[B Dt], the instruction's :meth:`text_features`; required with
            ``text_conditioning="token"``, refused otherwise.

        Returns:
          float[B E] (not normalised; the value only uses directions).
        """
        cfg = self.config
        dims = shapes.check(frames, "frames", f"B Tc {cfg.image_size} {cfg.image_size} 3",
                            dtype="float")
        b, tc = dims["B"], dims["Tc"]
        if not 1 <= tc <= cfg.max_clip_len:
            raise ValueError(f"frames: clip length must be in [1, {cfg.max_clip_len}], got {tc}")
        if (condition is None) != (cfg.text_conditioning == "none"):
            raise ValueError(f"text_conditioning={cfg.text_conditioning!r}: condition must be "
                             f"{'None' if cfg.text_conditioning == 'none' else 'given'}")
        if condition is not None:
            shapes.check(condition, "condition", f"B {cfg.text_width}", dims, dtype="float")
            condition = jnp.repeat(condition, tc, axis=0)  # [B*Tc Dt], frame-major per clip
        feats = self.vision(frames.reshape(b * tc, *frames.shape[2:]), condition).reshape(
            b, tc, -1)
        fused = self.fusion(feats)
        # A single frame has nothing to fuse: this is exactly LIV's single-frame embedding.
        # (The fusion still runs so that its parameters exist whatever the init clip length.)
        pooled = feats[:, 0] if tc == 1 else fused
        return self.image_proj(pooled)

    def embed_frame(self, images: Array, condition: Array | None = None) -> Array:
        """LIV's single-frame embedding: images float[B H W 3] in [-1, 1] -> float[B E]."""
        shapes.check(images, "images", "B H W 3", dtype="float")
        return self.embed_clip(images[:, None], condition)

    def text_features(self, text_tokens: Array, text_mask: Array) -> Array:
        """The text tower's pooled features, before ``text_proj``.

        Args:
          text_tokens: float[B Lt D_in] token states from the data pipeline, Lt <= max_text_len.
          text_mask: bool[B Lt], True for real tokens; padded tokens do not affect the result.

        Returns:
          float[B Dt].
        """
        dims = shapes.check(text_tokens, "text_tokens", "B Lt Din", dtype="float")
        shapes.check(text_mask, "text_mask", "B Lt", dims, dtype="bool")
        if dims["Lt"] > self.config.max_text_len:
            raise ValueError(f"text_tokens: {dims['Lt']} tokens exceed max_text_len="
                             f"{self.config.max_text_len}")
        return self.text(text_tokens, text_mask)

    def project_text(self, features: Array) -> Array:
        """Text features float[B Dt] (:meth:`text_features`) -> text embeddings float[B E]."""
        shapes.check(features, "features", f"B {self.config.text_width}", dtype="float")
        return self.text_proj(features)

    def embed_text(self, text_tokens: Array, text_mask: Array) -> Array:
        """Embeds instructions: float[B Lt D_in], bool[B Lt] -> float[B E]
        (:meth:`text_features` then ``text_proj``)."""
        return self.text_proj(self.text_features(text_tokens, text_mask))

    def value(self, clip_emb: Array, goal_emb: Array) -> Array:
        """V(s; g) = cos(clip_emb, goal_emb) / (1 - gamma): float[B E] x float[B E] -> float[B]."""
        dims = shapes.check(clip_emb, "clip_emb", "B E", dtype="float")
        shapes.check(goal_emb, "goal_emb", "B E", dims, dtype="float")
        return value_from_embeddings(clip_emb, goal_emb, self.config.gamma)

    def __call__(self, frames: Array, text_tokens: Array, text_mask: Array) -> Array:
        """Value of each clip given its instruction.

        Args:
          frames: float[B Tc H W 3] in [-1, 1].
          text_tokens: float[B Lt D_in]; text_mask: bool[B Lt].

        Returns:
          float[B] values in [-1/(1-gamma), 1/(1-gamma)].
        """
        feats = self.text_features(text_tokens, text_mask)
        condition = None if self.config.text_conditioning == "none" else feats
        return self.value(self.embed_clip(frames, condition), self.text_proj(feats))


def fit_frames(frames: Array, image_size: int) -> Array:
    """Frames of any size -> the model's square input.

    Args:
      frames: float[... h w 3] in [-1, 1].
      image_size: the model's square side S.

    Returns:
      float32[... S S 3]: centre-cropped to a square, then resized (bilinear with
      antialiasing) when the size differs.
    """
    if frames.ndim < 3 or frames.shape[-1] != 3:
        raise ValueError(f"frames: expected [... h w 3], got shape {list(frames.shape)}")
    x = frames.astype(jnp.float32)
    h, w = x.shape[-3:-1]
    side = min(h, w)
    if h != w:
        top, left = (h - side) // 2, (w - side) // 2
        x = x[..., top:top + side, left:left + side, :]
    if side != image_size:
        x = jax.image.resize(x, (*x.shape[:-3], image_size, image_size, 3), "linear",
                             antialias=True)
    return x


# ------------------------------------------------------------------------------------------
# Clip states from videos
# ------------------------------------------------------------------------------------------


def clip_state_indices(num_frames: int, clip_len: int, stride: int = 1) -> np.ndarray:
    """int32[S clip_len] frame indices of the clip states of a ``num_frames`` video.

    State k ends at frame e_k and holds frames e_k - clip_len + 1 .. e_k, indices below 0
    clamped to 0 (the first frame repeated). Ends are spaced ``stride`` apart and aligned so
    that the last state ends on the last frame (the goal): e_k = (T-1) % stride + k stride,
    S = (T-1) // stride + 1.
    """
    if num_frames < 1 or clip_len < 1 or stride < 1:
        raise ValueError(f"need num_frames, clip_len, stride >= 1, got {num_frames}, "
                         f"{clip_len}, {stride}")
    ends = np.arange((num_frames - 1) % stride, num_frames, stride)
    idx = ends[:, None] - np.arange(clip_len - 1, -1, -1)[None]
    return np.maximum(idx, 0).astype(np.int32)


def clip_states(video: Array, clip_len: int, stride: int = 1) -> Array:
    """Overlapping clip states of videos, for value curves.

    Args:
      video: float[B T H W C].
      clip_len: frames per state.
      stride: frames between the ends of successive states.

    Returns:
      float[B S clip_len H W C] with S = (T-1) // stride + 1; state k ends at frame
      (T-1) % stride + k stride, the first frame is repeated where a state would start before
      the video (:func:`clip_state_indices`).
    """
    dims = shapes.check(video, "video", "B T H W C")
    return jnp.asarray(video)[:, clip_state_indices(dims["T"], clip_len, stride)]


def vip_clip_states(video: Array, t: Array, clip_len: int) -> tuple[Array, Array, Array, Array]:
    """The four clip states of a VIP / LIV sample: initial, s_t, s_{t+1} and goal.

    Args:
      video: float[B T H W C] (T >= 2).
      t: int[B] times in [0, T-2] of the middle pair (LIV samples them uniformly).
      clip_len: frames per state.

    Returns:
      (s0, s_t, s_{t+1}, goal), each float[B clip_len H W C], the states ending at frames 0, t,
      t+1 and T-1 (the first frame repeated before the video starts).
    """
    dims = shapes.check(video, "video", "B T H W C")
    shapes.check(t, "t", "B", dims, dtype="int")
    if dims["T"] < 2:
        raise ValueError(f"video: need at least 2 frames, got {dims['T']}")
    video = jnp.asarray(video)
    offsets = jnp.arange(clip_len - 1, -1, -1)

    def at(end: Array) -> Array:  # end int[B] -> float[B clip_len H W C]
        idx = jnp.clip(end[:, None] - offsets[None], 0, dims["T"] - 1)
        return jnp.take_along_axis(video, idx[:, :, None, None, None], axis=1)

    t = jnp.clip(jnp.asarray(t), 0, dims["T"] - 2)
    zeros = jnp.zeros_like(t)
    return at(zeros), at(t), at(t + 1), at(zeros + dims["T"] - 1)
