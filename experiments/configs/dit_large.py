"""The DynamicsModel-L recipe (latent video DiT, official L sizes) on clips from
``config.data_dir``: AdamW 1e-4 constant, no weight decay, EMA 0.9999, 4 history + 15 future
frames at 128x128 encoded by the SD-VAE (see ``dit_common.py``).

    python -m experiments.train --config=experiments/configs/dit_large.py --workdir=DIR \
        --config.data_dir=CLIPS --config.codec.diffusers_dir=SD_VAE_DIR

``--config.codec.workdir=AE_RUN`` uses a flipjax autoencoder run instead of the SD-VAE.
``:runlocal`` trains a tiny model for 50 steps on toy data generated in the workdir.
"""

from __future__ import annotations

import ml_collections

from experiments.configs.dit_common import dit_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the locked config; ``arg`` may be "runlocal"."""
    return dit_config("L", arg)
