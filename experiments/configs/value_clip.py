"""FLIP's value module: CLIP ViT-B/16 towers over 4-frame clip states, LIV objective.

    python -m experiments.train --config=experiments/configs/value_clip.py --workdir=DIR \
        --config.data_dir=CLIPS [--config.eval_data_dir=VAL_CLIPS]

Clip frames are centre-cropped and resized to the model's 224 px inside the train step. The
towers start from random weights (no CLIP weight converter exists yet; see value_common.py).
``:runlocal`` trains the tiny value model for 50 steps on toy data generated in the workdir.
"""

from __future__ import annotations

import ml_collections

from experiments.configs.value_common import value_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the locked config; ``arg`` may be "runlocal"."""
    return value_config("clip-b16", arg, clip_len=4)
