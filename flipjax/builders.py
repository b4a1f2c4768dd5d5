"""Run configs -> models, frame codec and diffusion schedule: where a config becomes a model.

A training run's ``ml_collections`` config (``experiments/configs``, saved with every
checkpoint) names each module's architecture in ``config.model`` and its compute dtype in
``config.compute_dtype``. The trainers build their models here, and so does
:func:`flipjax.planning.world_model_from_checkpoints` from a saved config, so a checkpoint
always loads into the architecture that wrote it. The configs are read by field name only
(a plain ``ConfigDict`` or anything with the same attributes), never imported.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from flipjax import codec as codec_lib
from flipjax.codec import LatentCodec
from flipjax.models import diffusion
from flipjax.models.autoencoder import AutoencoderConfig, AutoencoderKL
from flipjax.models.flow_cvae import CVAEConfig, FlowCVAE
from flipjax.models.value import ValueConfig, ValueModel
from flipjax.models.video_dit import VideoDiT

Config = Any  # an ml_collections.ConfigDict of experiments/configs
DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
SCHEDULES = {"linear": diffusion.linear_schedule, "cosine": diffusion.cosine_schedule}
# config.model fields of the value module that are not ValueConfig fields.
_NOT_VALUE_CONFIG = ("name", "language_dim")


def compute_dtype(config: Config) -> Any:
    """``config.compute_dtype`` ("float32" | "bfloat16") as a jnp dtype (None = float32).

    Raises:
      ValueError: for another name.
    """
    name = config.get("compute_dtype", "float32") or "float32"
    if name not in DTYPES:
        raise ValueError(f"compute_dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _dtype(config: Config) -> Any:
    dtype = compute_dtype(config)
    return jnp.float32 if dtype is None else dtype


# ------------------------------------------------------------------------------------------
# Action module
# ------------------------------------------------------------------------------------------


SIZE_FIELDS = ("hidden", "encoder_layers", "decoder_layers", "num_heads")


def cvae_config(config: Config) -> CVAEConfig:
    """``CVAEConfig.variant(config.model.size, **the other model fields)``, validated."""
    m = config.model.to_dict()
    # 0 (or None) keeps the size's own width and depth (the configs' capacity overrides).
    m = {k: v for k, v in m.items() if k not in SIZE_FIELDS or v}
    size = m.pop("size")
    m["img_size"] = tuple(int(s) for s in m["img_size"])
    cfg = CVAEConfig.variant(size, **m)
    cfg.validate()
    return cfg


def build_cvae(config: Config) -> FlowCVAE:
    """The FlowCVAE of ``config.model``, computing in ``config.compute_dtype``."""
    return FlowCVAE(cvae_config(config), dtype=_dtype(config))


# ------------------------------------------------------------------------------------------
# Dynamics module: codec, model, schedule
# ------------------------------------------------------------------------------------------


def codec_kind(config: Config) -> str:
    """``config.codec.kind`` with "auto" resolved ("autoencoder" when a source is given)."""
    cc = config.codec
    kind = str(cc.kind)
    if kind == "auto":
        return "autoencoder" if (cc.workdir or cc.diffusers_dir) else "pixels"
    if kind not in codec_lib.KINDS:
        raise ValueError(f"config.codec.kind must be 'auto' or one of {codec_lib.KINDS}, "
                         f"got {kind!r}")
    return kind


def build_codec(config: Config) -> LatentCodec:
    """The frozen frame codec of ``config.codec`` (parameters on the host's first device).

    Raises:
      ValueError: an autoencoder codec without exactly one of ``codec.workdir`` /
        ``codec.diffusers_dir``, or an unusable source (see :mod:`flipjax.codec`).
      FileNotFoundError: an autoencoder run without checkpoints.
    """
    cc = config.codec
    kind = codec_kind(config)
    if kind == "pixels":
        return codec_lib.pixel_codec(int(cc.factor))
    if bool(cc.workdir) == bool(cc.diffusers_dir):
        raise ValueError("config.codec.kind='autoencoder' needs exactly one of "
                         "--config.codec.workdir (a flipjax autoencoder run) or "
                         "--config.codec.diffusers_dir (a local diffusers SD-VAE directory); "
                         f"got workdir={cc.workdir!r}, diffusers_dir={cc.diffusers_dir!r}")
    scale = float(cc.scale) if cc.scale and cc.scale > 0 else None
    if cc.workdir:
        return codec_lib.from_workdir(cc.workdir, ema=bool(cc.ema), scale=scale)
    return codec_lib.from_diffusers_dir(cc.diffusers_dir, scale=scale)


def check_codec_fits(config: Config, codec: LatentCodec) -> tuple[int, int, int]:
    """(h, w, C) of the latents of the configured frames, checked against the DiT.

    Raises:
      ValueError: frames that the codec cannot encode, latents that do not split into the
        DiT's patches, or a codec for other than RGB frames.
    """
    image_size = tuple(int(s) for s in config.image_size)
    if codec.image_channels != 3:
        raise ValueError(f"the {codec.kind} codec encodes {codec.image_channels}-channel "
                         "frames; clips are RGB")
    h, w, c = codec.latent_shape(image_size)
    patch = int(config.model.patch)
    if h % patch or w % patch:
        raise ValueError(f"the {codec.kind} codec (factor {codec.factor}) turns "
                         f"{image_size[0]}x{image_size[1]} frames into {h}x{w} latents, which "
                         f"do not split into the DiT's {patch}x{patch} patches; change "
                         "config.image_size, config.model.patch or the codec")
    return h, w, c


def build_dit(config: Config, codec: LatentCodec) -> VideoDiT:
    """The VideoDiT of ``config.model`` on the codec's latents, computing in
    ``config.compute_dtype``."""
    h, w, c = check_codec_fits(config, codec)
    m = config.model
    if int(m.history) < 1 or int(m.flow_horizon) < 2:
        raise ValueError(f"model.history must be >= 1 and model.flow_horizon >= 2, got "
                         f"{m.history}, {m.flow_horizon}")
    on_tracks = [f for f in ("flow_splat", "flow_warp", "flow_residual") if m.get(f, False)]
    if on_tracks and str(config.get("flow_normalization", "pixels")) != "unit":
        raise ValueError(f"model.{', model.'.join(on_tracks)} place the tracks on the latent "
                         f"grid and need flow_normalization='unit', got "
                         f"{config.get('flow_normalization', 'pixels')!r}")
    if m.get("residual_gate", False) and not m.get("flow_residual", False):
        raise ValueError("model.residual_gate gates the flow_residual correction; set "
                         "model.flow_residual=True")
    return VideoDiT.variant(
        str(m.size), patch=int(m.patch), in_channels=c, latent_size=(h, w),
        flow_horizon=int(m.flow_horizon), history=int(m.history),
        learn_sigma=bool(m.learn_sigma), text_dim=int(m.text_dim),
        text_layers=int(m.text_layers), text_heads=int(m.text_heads),
        flow_attention=str(m.flow_attention), flow_gate=bool(m.get("flow_gate", False)),
        flow_embedding=str(m.get("flow_embedding", "mlp")),
        flow_splat=bool(m.get("flow_splat", False)),
        flow_warp=bool(m.get("flow_warp", False)),
        flow_residual=bool(m.get("flow_residual", False)),
        residual_gate=bool(m.get("residual_gate", False)), remat=bool(config.remat),
        dtype=_dtype(config))


def build_schedule(config: Config) -> diffusion.Schedule:
    """The training process: ``config.noise_schedule`` over ``config.diffusion_steps``."""
    kind = str(config.noise_schedule)
    if kind not in SCHEDULES:
        raise ValueError(f"noise_schedule must be one of {sorted(SCHEDULES)}, got {kind!r}")
    return SCHEDULES[kind](int(config.diffusion_steps))


# ------------------------------------------------------------------------------------------
# Value module and frame autoencoder
# ------------------------------------------------------------------------------------------


def value_config(config: Config) -> ValueConfig:
    """``ValueConfig.variant(config.model.name, **the other model fields)`` in the compute dtype.

    Raises:
      ValueError: for an unknown model name, unknown fields or invalid sizes.
    """
    m = config.model.to_dict()
    fields = {f.name for f in dataclasses.fields(ValueConfig)}
    unknown = sorted(set(m) - fields - set(_NOT_VALUE_CONFIG))
    if unknown:
        raise ValueError(f"config.model has fields ValueConfig does not know: {unknown}")
    overrides = {k: v for k, v in m.items() if k not in _NOT_VALUE_CONFIG}
    return ValueConfig.variant(m["name"], **overrides, dtype=_dtype(config))


def build_value(config: Config) -> ValueModel:
    """The ValueModel of ``config.model``."""
    return ValueModel(value_config(config))


def autoencoder_config(config: Config) -> AutoencoderConfig:
    """``AutoencoderConfig(**config.model)`` with the run's compute dtype and remat."""
    return AutoencoderConfig(**config.model.to_dict(), dtype=_dtype(config),
                             remat=bool(config.remat))


def build_autoencoder(config: Config) -> AutoencoderKL:
    """The AutoencoderKL of ``config.model``."""
    return AutoencoderKL(autoencoder_config(config))


__all__ = [
    "DTYPES", "SCHEDULES", "autoencoder_config", "build_autoencoder", "build_codec",
    "build_cvae", "build_dit", "build_schedule", "build_value", "check_codec_fits",
    "codec_kind", "compute_dtype", "cvae_config", "value_config",
]
