"""Full training of the SD-VAE architecture (sd-vae-ft-ema sizes, kl-f8) from scratch.

    python -m experiments.train --config=experiments/configs/autoencoder_sd.py --workdir=DIR \
        --config.data_dir=CLIPS [--config.eval_data_dir=VAL_CLIPS]

Recipe (LDM ``autoencoder_kl_32x32x4``, minus its LPIPS and discriminator terms, which this
trainer does not implement; see ``experiments/trainers/autoencoder.py``): L1 reconstruction of
a posterior sample + 1e-6 x KL; Adam with betas (0.5, 0.9), no weight decay, no clipping, a
constant rate of ``base_learning_rate`` (4.5e-6) x the effective global batch
(``batch_size x grad_accum_steps``: 64 -> 2.88e-4), as LDM's ``main.py`` scales it; no EMA
(LDM keeps none for its autoencoders; ``--config.ema_decay=0.999`` adds one). Frames are
FLIP's 128x128 (LDM trained at 256x256 crops), two per clip.

``:runlocal`` trains the tiny 3-level codec on 32x32 toy frames for 50 steps at 1e-3.
"""

from __future__ import annotations

import ml_collections

from experiments.configs.autoencoder_common import autoencoder_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the locked config; ``arg`` may be "runlocal"."""
    return autoencoder_config("full", arg)
