"""The frame codec: the Stable Diffusion KL autoencoder (diffusers ``AutoencoderKL``) in Linen.

FLIP encodes video frames with ``stabilityai/sd-vae-ft-ema``: 8x spatial downsampling to 4
latent channels, latents scaled by 0.18215. The layout of parameters mirrors diffusers'
module tree (``encoder/down_blocks_0/resnets_1/conv2/kernel`` for
``encoder.down_blocks.0.resnets.1.conv2.weight``) so :mod:`flipjax.models.convert_sd_vae`
maps a diffusers state dict one name to one name.

Images are NHWC inside flipjax (B batch, H W pixels, C channels; h w the latent grid,
``h = H / 2^(len(block_out_channels) - 1)``). GroupNorm statistics and attention softmax are
computed in float32 whatever the compute ``dtype``; parameters are always float32.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flipjax import shapes
from flipjax.models import variants
from flipjax.models.layers import dense, dot_product_attention

Array = jax.Array
Dtype = Any

# diffusers AutoencoderKL.__init__ defaults, used for keys a config dict leaves out so that a
# sparse config means the same model here as in diffusers.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",), "block_out_channels": (64,),
    "layers_per_block": 1, "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32,
    "sample_size": 32, "scaling_factor": 0.18215, "shift_factor": None,
    "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
}


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """Architecture of a diffusers-style KL autoencoder.

    Attributes:
      in_channels: image channels read by the encoder.
      out_channels: image channels written by the decoder.
      latent_channels: channels of the latent (the encoder predicts twice as many: mean and
        log-variance).
      block_out_channels: width of each resolution level, finest first; every level but the
        last halves the resolution.
      layers_per_block: ResNet blocks per encoder level (the decoder has one more).
      norm_num_groups: GroupNorm groups (every width must divide by it).
      eps: GroupNorm epsilon.
      scaling_factor: multiplies (latent - shift_factor) to give unit-variance latents.
      shift_factor: subtracted from the latent before scaling (0 for SD-1/2 VAEs).
      sample_size: nominal image size the weights were trained at (metadata only).
      mid_block_add_attention: self-attention between the two mid-block ResNets.
      use_quant_conv: 1x1 conv on the encoder's moments.
      use_post_quant_conv: 1x1 conv on the latent before the decoder.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
      remat: rematerialise every ResNet/attention block in the backward pass (saves
        activation memory when gradients flow through the codec).
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    eps: float = 1e-6
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    sample_size: int = 256
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    dtype: Dtype = jnp.float32
    remat: bool = False

    def __post_init__(self) -> None:
        boc = tuple(int(c) for c in self.block_out_channels)
        object.__setattr__(self, "block_out_channels", boc)
        if not boc:
            raise ValueError("block_out_channels must name at least one level")
        bad = [c for c in boc if c <= 0 or c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {boc} must be positive multiples of "
                             f"norm_num_groups={self.norm_num_groups}; offending: {bad}")
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell along each side (8 for the SD VAE)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def variant(cls, name: str, **overrides: Any) -> AutoencoderConfig:
        """The :data:`VARIANTS` entry ``name`` ("sd-vae-ft-ema", "tiny") with field overrides.

        Raises:
          ValueError: an unknown name.
        """
        return cls(**variants.resolve("autoencoder", VARIANTS, name, overrides))

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any] | str, **overrides: Any
                       ) -> AutoencoderConfig:
        """Builds the config of a diffusers ``AutoencoderKL`` ``config.json``.

        Args:
          config: the config dict or its JSON text. Bookkeeping keys (``_class_name``,
            ``force_upcast``, ``latents_mean``, ...) are ignored; missing keys take
            diffusers' defaults.
          **overrides: fields of this dataclass to set afterwards (e.g. ``dtype``, ``remat``).

        Returns:
          The matching :class:`AutoencoderConfig`.

        Raises:
          ValueError: for block types or activations this implementation does not have.
        """
        if isinstance(config, str):
            config = json.loads(config)
        c = {**_DIFFUSERS_DEFAULTS, **dict(config)}
        down, up = tuple(c["down_block_types"]), tuple(c["up_block_types"])
        boc = tuple(c["block_out_channels"])
        if any(t != "DownEncoderBlock2D" for t in down) or len(down) != len(boc):
            raise ValueError(f"expected {len(boc)} DownEncoderBlock2D down blocks, got {down}")
        if any(t != "UpDecoderBlock2D" for t in up) or len(up) != len(boc):
            raise ValueError(f"expected {len(boc)} UpDecoderBlock2D up blocks, got {up}")
        if c["act_fn"] != "silu":
            raise ValueError(f"only act_fn='silu' is implemented, got {c['act_fn']!r}")
        fields = dict(
            in_channels=int(c["in_channels"]), out_channels=int(c["out_channels"]),
            latent_channels=int(c["latent_channels"]), block_out_channels=boc,
            layers_per_block=int(c["layers_per_block"]),
            norm_num_groups=int(c["norm_num_groups"]),
            scaling_factor=float(c["scaling_factor"]),
            shift_factor=float(c["shift_factor"] or 0.0),
            sample_size=int(c["sample_size"] if not isinstance(c["sample_size"], list | tuple)
                            else c["sample_size"][0]),
            mid_block_add_attention=bool(c["mid_block_add_attention"]),
            use_quant_conv=bool(c["use_quant_conv"]),
            use_post_quant_conv=bool(c["use_post_quant_conv"]),
        )
        fields.update(overrides)
        return cls(**fields)


VARIANTS: dict[str, dict[str, Any]] = {
    # stabilityai/sd-vae-ft-ema (83,653,863 parameters), the codec FLIP uses.
    "sd-vae-ft-ema": {},
    # A 3-level (4x downsampling) codec of 1.3M parameters, for tests and runlocal.
    "tiny": dict(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=32,
                 sample_size=32),
}


# ------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------


def _conv(features: int, kernel: int, dtype: Dtype, name: str | None, *, stride: int = 1,
          padding: Any = "SAME", axes: tuple[str | None, ...] | None = None) -> nn.Conv:
    """nn.Conv with an HWIO kernel, optionally annotated with logical ``axes``.

    Only block widths (multiples of the GroupNorm groups) are named: the narrow image and
    latent widths (3, 4, 8) would not split over a mesh axis, so the 1x1 quant convs stay
    unannotated.
    """
    kernel_init = nn.initializers.lecun_normal()
    bias_init = nn.initializers.zeros
    if axes is not None:
        kernel_init = nn.with_logical_partitioning(kernel_init, axes)
        bias_init = nn.with_logical_partitioning(bias_init, (axes[-1],))
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                   dtype=dtype, param_dtype=jnp.float32, kernel_init=kernel_init,
                   bias_init=bias_init, name=name)


_WIDE = (None, None, None, "embed")  # conv whose output width is a block width
_NARROW = (None, None, "embed", None)  # block width in, 3 or 2*latent channels out


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm over the last (channel) axis, statistics in float32.

    Works on any float[B ... C] (images [B H W C] or token sequences [B L C]); statistics are
    taken per sample and group over every other axis.
    """

    num_groups: int
    eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels do not split into {self.num_groups} "
                             "groups")
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                                 ("embed",)), (c,))
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                               ("embed",)), (c,))
        g = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)
        axes = (*range(1, g.ndim - 2), g.ndim - 1)
        mean = g.mean(axes, keepdims=True)
        # Two-pass variance: E[x^2] - E[x]^2 loses digits on large-mean activations.
        var = jnp.square(g - mean).mean(axes, keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        return (y * scale + bias).astype(self.dtype)


class ResnetBlock(nn.Module):
    """diffusers ResnetBlock2D without time embedding: x + conv(silu(gn(conv(silu(gn(x))))))."""

    out_channels: int
    groups: int
    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """float[B H W Cin] -> float[B H W out_channels]."""
        gn = lambda name: GroupNorm(self.groups, self.eps, self.dtype, name=name)
        h = _conv(self.out_channels, 3, self.dtype, "conv1", axes=_WIDE)(nn.silu(gn("norm1")(x)))
        h = _conv(self.out_channels, 3, self.dtype, "conv2", axes=_WIDE)(nn.silu(gn("norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, self.dtype, "conv_shortcut", axes=_WIDE)(x)
        return x.astype(self.dtype) + h


class SpatialSelfAttention(nn.Module):
    """The mid-block attention: one head over all h*w positions, GroupNorm first, residual."""

    groups: int
    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """float[B h w C] -> float[B h w C]."""
        b, h, w, c = x.shape
        t = GroupNorm(self.groups, self.eps, self.dtype, name="group_norm")(x)
        t = t.reshape(b, h * w, 1, c)  # a single head of width C: scale 1/sqrt(C)
        proj = lambda name: dense(c, ("embed", "mlp"), dtype=self.dtype, name=name)
        o = dot_product_attention(proj("to_q")(t), proj("to_k")(t), proj("to_v")(t))
        o = proj("to_out_0")(o).reshape(b, h, w, c)
        return x.astype(self.dtype) + o


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one zero row/column at the bottom/right only."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """float[B H W C] -> float[B ceil(H/2) ceil(W/2) C] (H/2 x W/2 for even sizes)."""
        # diffusers pads (0, 1, 0, 1), not symmetrically: the same weights with SAME padding
        # would sample the grid half a pixel off.
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(self.channels, 3, self.dtype, "conv", stride=2, padding="VALID",
                     axes=_WIDE)(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """float[B h w C] -> float[B 2h 2w C]."""
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(self.channels, 3, self.dtype, "conv", axes=_WIDE)(x)


def _blocks(cfg: AutoencoderConfig) -> tuple[type[ResnetBlock], type[SpatialSelfAttention]]:
    if cfg.remat:
        return nn.remat(ResnetBlock), nn.remat(SpatialSelfAttention)
    return ResnetBlock, SpatialSelfAttention


class MidBlock(nn.Module):
    """ResNet, (optional) self-attention, ResNet at the coarsest resolution."""

    config: AutoencoderConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        res, att = _blocks(cfg)
        c = x.shape[-1]
        x = res(c, cfg.norm_num_groups, cfg.eps, cfg.dtype, name="resnets_0")(x)
        if cfg.mid_block_add_attention:
            x = att(cfg.norm_num_groups, cfg.eps, cfg.dtype, name="attentions_0")(x)
        return res(c, cfg.norm_num_groups, cfg.eps, cfg.dtype, name="resnets_1")(x)


class DownEncoderBlock(nn.Module):
    """``num_layers`` ResNets to ``channels`` wide, then (optionally) a Downsample."""

    config: AutoencoderConfig
    channels: int
    num_layers: int
    add_downsample: bool

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        res, _ = _blocks(cfg)
        for j in range(self.num_layers):
            x = res(self.channels, cfg.norm_num_groups, cfg.eps, cfg.dtype,
                    name=f"resnets_{j}")(x)
        if self.add_downsample:
            x = Downsample(self.channels, cfg.dtype, name="downsamplers_0")(x)
        return x


class UpDecoderBlock(nn.Module):
    """``num_layers`` ResNets to ``channels`` wide, then (optionally) an Upsample."""

    config: AutoencoderConfig
    channels: int
    num_layers: int
    add_upsample: bool

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        res, _ = _blocks(cfg)
        for j in range(self.num_layers):
            x = res(self.channels, cfg.norm_num_groups, cfg.eps, cfg.dtype,
                    name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample(self.channels, cfg.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """float[B H W in_channels] -> moments float[B h w 2*latent_channels] (before quant_conv)."""

    config: AutoencoderConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        boc = cfg.block_out_channels
        x = _conv(boc[0], 3, cfg.dtype, "conv_in", axes=_WIDE)(x)
        for i, ch in enumerate(boc):
            x = DownEncoderBlock(cfg, ch, cfg.layers_per_block, i < len(boc) - 1,
                                 name=f"down_blocks_{i}")(x)
        x = MidBlock(cfg, name="mid_block")(x)
        x = nn.silu(GroupNorm(cfg.norm_num_groups, cfg.eps, cfg.dtype, name="conv_norm_out")(x))
        return _conv(2 * cfg.latent_channels, 3, cfg.dtype, "conv_out", axes=_NARROW)(x)


class Decoder(nn.Module):
    """Latent float[B h w latent_channels] (after post_quant_conv) -> float[B H W out_channels]."""

    config: AutoencoderConfig

    @nn.compact
    def __call__(self, z: Array) -> Array:
        cfg = self.config
        boc = tuple(reversed(cfg.block_out_channels))
        x = _conv(boc[0], 3, cfg.dtype, "conv_in", axes=_WIDE)(z)
        x = MidBlock(cfg, name="mid_block")(x)
        for i, ch in enumerate(boc):
            x = UpDecoderBlock(cfg, ch, cfg.layers_per_block + 1, i < len(boc) - 1,
                               name=f"up_blocks_{i}")(x)
        x = nn.silu(GroupNorm(cfg.norm_num_groups, cfg.eps, cfg.dtype, name="conv_norm_out")(x))
        return _conv(cfg.out_channels, 3, cfg.dtype, "conv_out", axes=_NARROW)(x)


# ------------------------------------------------------------------------------------------
# The autoencoder
# ------------------------------------------------------------------------------------------


class AutoencoderKL(nn.Module):
    """The KL-regularised image autoencoder of Stable Diffusion (diffusers ``AutoencoderKL``).

    ``init`` through ``__call__`` creates every parameter; ``apply(..., method=...)`` runs
    :meth:`encode`, :meth:`decode`, :meth:`encode_to_latents` or :meth:`decode_latents`.
    Outputs are float32 whatever the compute dtype.
    """

    config: AutoencoderConfig

    def setup(self) -> None:
        cfg = self.config
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.use_quant_conv:
            self.quant_conv = _conv(2 * cfg.latent_channels, 1, cfg.dtype, None)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = _conv(cfg.latent_channels, 1, cfg.dtype, None)

    def encode(self, x: Array) -> tuple[Array, Array]:
        """Posterior of images.

        Args:
          x: float[B H W in_channels], nominally in [-1, 1]; H and W multiples of
            ``config.downsample_factor``.

        Returns:
          (mean, logvar), each float32[B h w latent_channels]; logvar is clamped to [-30, 20]
          like diffusers' DiagonalGaussianDistribution.
        """
        cfg = self.config
        shapes.check_images(x, "images", cfg.in_channels, cfg.downsample_factor)
        moments = self.encoder(x)
        if cfg.use_quant_conv:
            moments = self.quant_conv(moments)
        moments = moments.astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: Array) -> Array:
        """Images of (unscaled) latents.

        Args:
          z: float[B h w latent_channels].

        Returns:
          float32[B H W out_channels], H = h * ``config.downsample_factor``.
        """
        cfg = self.config
        shapes.check_images(z, "latents", cfg.latent_channels)
        if cfg.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: Array, key: Array | None = None, sample_posterior: bool = False
                 ) -> tuple[Array, Array, Array]:
        """Reconstruction of images through the posterior mean or a posterior sample.

        Args:
          x: float[B H W in_channels].
          key: PRNG key, required when ``sample_posterior``.
          sample_posterior: decode z ~ N(mean, exp(logvar)) instead of the mean.

        Returns:
          (reconstruction float32[B H W out_channels], mean, logvar float32[B h w latent]).
        """
        mean, logvar = self.encode(x)
        z = _sample(mean, logvar, key) if sample_posterior else mean
        return self.decode(z), mean, logvar

    def encode_to_latents(self, x: Array, key: Array | None = None) -> Array:
        """Diffusion-space latents of images: (z - shift_factor) * scaling_factor.

        Args:
          x: float[B H W in_channels] in [-1, 1].
          key: when given, z is a posterior sample; otherwise the posterior mean.

        Returns:
          float32[B h w latent_channels].
        """
        mean, logvar = self.encode(x)
        z = mean if key is None else _sample(mean, logvar, key)
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def decode_latents(self, latents: Array) -> Array:
        """Inverse of :meth:`encode_to_latents`: float[B h w latent] -> float32[B H W out]."""
        cfg = self.config
        return self.decode(latents / cfg.scaling_factor + cfg.shift_factor)


def _sample(mean: Array, logvar: Array, key: Array | None) -> Array:
    if key is None:
        raise ValueError("sampling the posterior needs a PRNG key")
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


def num_parameters(config: AutoencoderConfig) -> int:
    """Parameter count of a config, from abstract shapes only (nothing is allocated)."""
    f = config.downsample_factor
    x = jax.ShapeDtypeStruct((1, f, f, config.in_channels), jnp.float32)
    shapes = jax.eval_shape(lambda k, x: AutoencoderKL(config).init(k, x),
                            jax.random.key(0), x)
    return sum(int(a.size) for a in jax.tree.leaves(nn.meta.unbox(shapes)))
