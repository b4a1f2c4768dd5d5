"""FlowCVAE-B (official CVAE-B sizes) on clips from ``config.data_dir``.

    python -m experiments.train --config=experiments/configs/cvae_base.py --workdir=DIR \
        --config.data_dir=CLIPS [--config.eval_data_dir=VAL_CLIPS]

``:runlocal`` trains a tiny model for 50 steps on toy data generated in the workdir.
"""

from __future__ import annotations

import ml_collections

from experiments.configs.common import cvae_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the locked config; ``arg`` may be "runlocal"."""
    return cvae_config("B", arg)
