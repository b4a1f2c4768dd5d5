"""The frame-autoencoder config shared by ``autoencoder_sd.py`` and ``autoencoder_finetune.py``.

The model fields mirror :class:`flipjax.models.autoencoder.AutoencoderConfig` (``dtype`` comes
from ``compute_dtype`` and ``remat`` from the top-level field), so the trainer builds the
model with ``AutoencoderConfig(**config.model)``. See ``experiments/trainers/autoencoder.py``
for what the trainer does with each field.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from experiments.configs.common import apply_runlocal, base_config, parse_arg
from flipjax.models.autoencoder import sd_vae_ft_ema, tiny_autoencoder

MODES = ("full", "decoder")
# LDM (latent-diffusion/main.py) scales its base rate by the effective batch:
# lr = accumulate_grad_batches * num_gpus * batch_size * base_learning_rate.
LDM_BASE_LEARNING_RATE = 4.5e-6
# Set by the trainer from other fields, never from the model section of a config.
_RUNTIME_FIELDS = ("dtype", "remat")


def model_fields(tiny: bool) -> dict:
    """The AutoencoderConfig fields of sd-vae-ft-ema (or the tiny test codec) as plain values.

    Args:
      tiny: the 3-level :func:`tiny_autoencoder` instead of :func:`sd_vae_ft_ema`.

    Returns:
      Field name -> value, without the runtime fields ``dtype`` and ``remat``.
    """
    cfg = tiny_autoencoder() if tiny else sd_vae_ft_ema()
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RUNTIME_FIELDS}


def autoencoder_config(mode: str, arg: str | None) -> ml_collections.ConfigDict:
    """A locked frame-autoencoder training config.

    Args:
      mode: "full" (train every parameter, from scratch unless ``init_from`` is set) or
        "decoder" (encoder and quant_conv frozen, initialised from ``init_from``).
      arg: the config-file argument: None or "runlocal".

    Returns:
      The locked config. The caller's file documents the recipe values it sets.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    runlocal = parse_arg(arg)
    c = base_config()
    c.trainer = "autoencoder"
    c.mode = mode
    # A local diffusers AutoencoderKL directory (config.json + *.safetensors, or a pipeline
    # directory with a vae/ folder), a diffusers-named .safetensors file, or a flipjax
    # autoencoder workdir. Required in "decoder" mode (except under :runlocal).
    c.init_from = ""
    c.init_from_ema = True  # from a flipjax workdir: its EMA params when it has them

    c.model = ml_collections.ConfigDict(model_fields(tiny=False))
    c.remat = False
    c.image_size = (128, 128)  # FLIP's frames; multiples of the model's downsample factor

    # Each clip gives its last `frames_per_clip` history frames, so a batch of B clips holds
    # B * frames_per_clip images from B different places in the data.
    c.frames_per_clip = 2
    c.recon_loss = "l1"  # "l1" (LDM) or "l2"
    c.kl_weight = 1e-6  # LDM's kl-f8 value
    c.eval_batches = 4  # 0 disables evaluation, also at the last step
    c.eval_samples = 4  # frames in the input | reconstruction sample image
    # Toy clips (only when build_toy_data_if_missing): a track horizon and text width the
    # other modules' toy clips share, though this trainer reads only frames.
    c.toy_horizon = 16
    c.toy_text_dim = 384

    # LDM's autoencoder optimizer: Adam(betas=(0.5, 0.9)), no weight decay, no clipping,
    # no warmup, constant rate; the base rate is scaled by the effective global batch.
    c.b1 = 0.5
    c.b2 = 0.9
    c.weight_decay = 0.0
    c.grad_clip_norm = None
    c.base_learning_rate = LDM_BASE_LEARNING_RATE
    c.batch_size = 64
    c.learning_rate = (c.get_ref("batch_size").to_float() * c.get_ref("grad_accum_steps")
                       * c.get_ref("base_learning_rate"))
    c.ema_decay = None

    if runlocal:
        apply_runlocal(c)
        c.model = ml_collections.ConfigDict(model_fields(tiny=True))
        c.image_size = (32, 32)
        c.toy_horizon = 4
        c.toy_text_dim = 32
        c.eval_batches = 2
        # A smoke run has no time for LDM's rate: 50 steps at 1e-3 visibly reconstruct.
        c.learning_rate = 1e-3
        c.grad_clip_norm = 1.0
    c.lock()
    return c
