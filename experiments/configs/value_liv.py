"""Single-frame LIV (states are single frames) with CLIP ViT-B/16 towers, LIV objective.

    python -m experiments.train --config=experiments/configs/value_liv.py --workdir=DIR \
        --config.data_dir=CLIPS [--config.eval_data_dir=VAL_CLIPS]

The baseline FLIP's clip states improve on: ``clip_len = 1``, so the temporal fusion is
skipped. Random initial weights (no CLIP weight converter exists yet; see value_common.py).
``:runlocal`` trains the tiny value model for 50 steps on toy data generated in the workdir.
"""

from __future__ import annotations

import ml_collections

from experiments.configs.value_common import value_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the locked config; ``arg`` may be "runlocal"."""
    return value_config("liv-b16", arg, clip_len=1)
