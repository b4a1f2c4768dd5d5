"""The frame autoencoder (SD-VAE architecture): ``sd`` training from scratch or ``finetune``.

    python -m experiments.train --config=experiments/configs/autoencoder.py:sd --workdir=DIR \
        --config.data_dir=CLIPS [--config.eval_data_dir=VAL_CLIPS]
    python -m experiments.train --config=experiments/configs/autoencoder.py:finetune \
        --workdir=DIR --config.data_dir=CLIPS --config.init_from=/path/to/sd-vae-ft-ema

``sd``: full training of the sd-vae-ft-ema sizes (kl-f8) from scratch.
Recipe (LDM ``autoencoder_kl_32x32x4``, minus its LPIPS and discriminator terms, which this
trainer does not implement; see ``experiments/trainers/autoencoder.py``): L1 reconstruction of
a posterior sample + 1e-6 x KL; Adam with betas (0.5, 0.9), no weight decay, no clipping, a
constant rate of ``base_learning_rate`` (4.5e-6) x the effective global batch
(``batch_size x grad_accum_steps``: 64 -> 2.88e-4), as LDM's ``main.py`` scales it; no EMA
(LDM keeps none for its autoencoders; ``--config.ema_decay=0.999`` adds one). Frames are
FLIP's 128x128 (LDM trained at 256x256 crops), two per clip.

``finetune``: decoder fine-tuning of a pretrained SD-VAE on robot frames, the way
sd-vae-ft-ema was made.
``init_from`` (required) is a local diffusers ``AutoencoderKL`` directory (``config.json`` +
``diffusion_pytorch_model.safetensors``), a diffusers-named ``.safetensors`` file or a flipjax
autoencoder workdir. The encoder and ``quant_conv`` stay frozen, so latents, and a DiT trained
on them, remain valid; ``post_quant_conv`` and the decoder adapt to the data.

Recipe: stabilityai's ft-EMA run (decoder only, EMA weights; batch 192 on LAION, 313k steps)
does not publish its learning rate or EMA decay. Used here: Adam (0.5, 0.9) as in LDM, no
weight decay, a constant 1e-5 (a fine-tuning rate below LDM's from-scratch 2.88e-4 at batch
64), EMA 0.999, batch 64, 50k steps; the loss is L1 + 1e-6 x KL without ft-EMA's LPIPS and
discriminator terms (not implemented here).

``:runlocal`` (after either variant) is a smoke run: the tiny 3-level codec on 32x32 toy
frames for 50 steps at 1e-3; ``finetune`` with an empty ``init_from`` then starts from random
weights (still freezing the encoder), with an EMA of 0.99.

The model fields mirror :class:`flipjax.models.autoencoder.AutoencoderConfig` (``dtype`` comes
from ``compute_dtype`` and ``remat`` from the top-level field), so the trainer builds the
model with ``AutoencoderConfig(**config.model)``. See ``experiments/trainers/autoencoder.py``
for what the trainer does with each field.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from experiments.configs.common import apply_runlocal, base_config, parse_variant
from flipjax.models.autoencoder import AutoencoderConfig

MODES = ("full", "decoder")
# variant -> trainer mode
VARIANTS = {"sd": "full", "finetune": "decoder"}
# LDM (latent-diffusion/main.py) scales its base rate by the effective batch:
# lr = accumulate_grad_batches * num_gpus * batch_size * base_learning_rate.
LDM_BASE_LEARNING_RATE = 4.5e-6
# Set by the trainer from other fields, never from the model section of a config.
_RUNTIME_FIELDS = ("dtype", "remat")


def model_fields(tiny: bool) -> dict:
    """The AutoencoderConfig fields of sd-vae-ft-ema (or the tiny test codec) as plain values.

    Args:
      tiny: the 3-level ``"tiny"`` variant instead of ``"sd-vae-ft-ema"``.

    Returns:
      Field name -> value, without the runtime fields ``dtype`` and ``remat``.
    """
    cfg = AutoencoderConfig.variant("tiny" if tiny else "sd-vae-ft-ema")
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RUNTIME_FIELDS}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the locked config; ``arg`` is a variant of :data:`VARIANTS`, then ``,runlocal``."""
    variant, runlocal = parse_variant(arg, "autoencoder", tuple(VARIANTS))
    c = autoencoder_config(VARIANTS[variant or "sd"], runlocal)
    if variant == "finetune":
        with c.unlocked():
            # 0.999 under :runlocal would leave the EMA of a 50-step run at its initial weights.
            c.ema_decay = 0.99 if c.runlocal else 0.999
            if not c.runlocal:
                c.learning_rate = 1e-5
                c.total_steps = 50_000
    return c


def autoencoder_config(mode: str, runlocal: bool = False) -> ml_collections.ConfigDict:
    """A locked frame-autoencoder training config.

    Args:
      mode: "full" (train every parameter, from scratch unless ``init_from`` is set) or
        "decoder" (encoder and quant_conv frozen, initialised from ``init_from``).
      runlocal: the tiny CPU smoke run.

    Returns:
      The locked config (the module docstring documents the recipes).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
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
