"""DynamicsModel-S (latent video DiT, official S sizes) on clips from ``config.data_dir``.

    python -m experiments.train --config=experiments/configs/dit_small.py --workdir=DIR \
        --config.data_dir=CLIPS --config.codec.diffusers_dir=SD_VAE_DIR

``--config.codec.workdir=AE_RUN`` uses a flipjax autoencoder run instead of the SD-VAE.
``:runlocal`` trains a tiny model for 50 steps on toy data generated in the workdir.
"""

from __future__ import annotations

import ml_collections

from experiments.configs.dit_common import dit_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the locked config; ``arg`` may be "runlocal"."""
    return dit_config("S", arg)
