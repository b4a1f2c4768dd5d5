"""The DynamicsModel-L recipe (latent video DiT, official L sizes): ``dit.py:L`` under the
name the documentation uses. AdamW 1e-4 constant, no weight decay, EMA 0.9999, 4 history + 15
future frames at 128x128 encoded by the SD-VAE (see ``dit.py``).

    python -m experiments.train --config=experiments/configs/dit_large.py --workdir=DIR \
        --config.data_dir=CLIPS --config.codec.diffusers_dir=SD_VAE_DIR

``--config.codec.workdir=AE_RUN`` uses a flipjax autoencoder run instead of the SD-VAE.
``:runlocal`` trains a tiny model for 50 steps on toy data generated in the workdir.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import dit


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the locked ``dit.py:L`` config; ``arg`` may be "runlocal"."""
    return dit.get_config(",".join(p for p in ("L", arg) if p))
