"""Decoder fine-tuning of a pretrained SD-VAE on robot frames, the way sd-vae-ft-ema was made.

    python -m experiments.train --config=experiments/configs/autoencoder_finetune.py \
        --workdir=DIR --config.data_dir=CLIPS --config.init_from=/path/to/sd-vae-ft-ema

``init_from`` (required) is a local diffusers ``AutoencoderKL`` directory (``config.json`` +
``diffusion_pytorch_model.safetensors``), a diffusers-named ``.safetensors`` file or a flipjax
autoencoder workdir. The encoder and ``quant_conv`` stay frozen, so latents, and a DiT trained
on them, remain valid; ``post_quant_conv`` and the decoder adapt to the data.

Recipe: stabilityai's ft-EMA run (decoder only, EMA weights; batch 192 on LAION, 313k steps)
does not publish its learning rate or EMA decay. Used here: Adam (0.5, 0.9) as in LDM, no
weight decay, a constant 1e-5 (a fine-tuning rate below LDM's from-scratch 2.88e-4 at batch
64), EMA 0.999, batch 64, 50k steps; the loss is L1 + 1e-6 x KL without ft-EMA's LPIPS and
discriminator terms (not implemented here).

``:runlocal`` is a smoke run: the tiny codec on 32x32 toy frames for 50 steps; with an empty
``init_from`` it starts from random weights (still freezing the encoder); EMA 0.99.
"""

from __future__ import annotations

import ml_collections

from experiments.configs.autoencoder_common import autoencoder_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the locked config; ``arg`` may be "runlocal"."""
    c = autoencoder_config("decoder", arg)
    with c.unlocked():
        # 0.999 under :runlocal would leave the EMA of a 50-step run at its initial weights.
        c.ema_decay = 0.99 if c.runlocal else 0.999
        if not c.runlocal:
            c.learning_rate = 1e-5
            c.total_steps = 50_000
    return c
