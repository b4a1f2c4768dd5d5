"""The value module (LIV-style) on ``config.data_dir`` clips: ``clip`` or ``liv`` states.

    python -m experiments.train --config=experiments/configs/value.py:clip --workdir=DIR \
        --config.data_dir=CLIPS [--config.eval_data_dir=VAL_CLIPS]

Variants: ``clip`` is FLIP's value module, CLIP ViT-B/16 towers over 4-frame clip states;
``liv`` is single-frame LIV (``clip_len = 1``, so the temporal fusion is skipped), the
baseline FLIP's clip states improve on. Clip frames are centre-cropped and resized to the
model's 224 px inside the train step. ``:clip,runlocal`` (or ``:runlocal``) trains the tiny
value model for 50 steps on toy data generated in the workdir.

Recipe (LIV, Ma et al. 2023, ``cfgs/config_liv.yaml`` and ``cfgs/training/*.yaml``): lr 1e-5,
weight decay 1e-3, gamma 0.98, batch 64 and 10k steps as LIV fine-tunes, with LIV's
*pretraining* loss weights (image-goal VIP, language-goal VIP and InfoNCE all 1, three shuffled
VIP negatives) because there are no pretrained weights to fine-tune from: flipjax has no
OpenAI CLIP / LIV weight converter yet, so these configs train from random initialisation
(from scratch, expect to need far more steps or a higher learning rate than LIV's fine-tuning).
LIV uses Adam with L2 weight decay; the shared optimizer here is AdamW (decoupled), and LIV
keeps no EMA while this recipe evaluates an EMA (0.999) of the parameters.

``:runlocal`` is the tiny value model at the shared toy settings (32x32 frames, hash text of
width 32, 8 tokens), 32 px input with 8 px patches so clips are used at their own size, 50
steps of batch 4 at lr 1e-3 (a tiny model from scratch; 1e-5 would not move in 50 steps).
"""

from __future__ import annotations

import ml_collections

from experiments.configs.common import apply_runlocal, base_config, parse_variant
from flipjax.models.value import ValueConfig

# variant -> (flipjax.models.value.VARIANTS entry, frames per state)
VARIANTS = {"clip": ("clip-b16", 4), "liv": ("liv-b16", 1)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the locked config; ``arg`` is a variant of :data:`VARIANTS`, then ``,runlocal``."""
    variant, runlocal = parse_variant(arg, "value", tuple(VARIANTS))
    name, clip_len = VARIANTS[variant or "clip"]
    return value_config(name, runlocal, clip_len=clip_len)


def value_config(name: str, runlocal: bool = False, *, clip_len: int
                 ) -> ml_collections.ConfigDict:
    """A locked value-model training config.

    Args:
      name: ``flipjax.models.value.VARIANTS`` entry ("clip-b16", "liv-b16"); runlocal
        always uses "tiny".
      runlocal: the tiny CPU smoke run.
      clip_len: frames per state (FLIP: 4; LIV: 1).

    Returns:
      The locked config.
    """
    c = base_config()
    c.trainer = "value"
    v = ValueConfig.variant(name)

    # Model: ValueConfig.variant(name, **the other fields except language_dim).
    c.model = ml_collections.ConfigDict(dict(
        name=name, image_size=v.image_size, patch=v.patch, clip_len=clip_len,
        temporal_fusion=v.temporal_fusion, text_pool=v.text_pool, gamma=v.gamma,
        vision_width=v.vision_width, text_width=v.text_width, embed_dim=v.embed_dim,
        # "none": the official separate towers; "token" (a departure): the instruction's text
        # features are an extra token of the image tower (flipjax.models.value).
        text_conditioning=v.text_conditioning,
        # Must equal the clips' text_dim: 384 = MiniLM (build_clips --text=minilm).
        language_dim=384,
    ))
    # Weights of flipjax.models.value_loss.liv_loss (gamma comes from the model).
    # success_ranking (not LIV; 0 = the official objective): weight of the two-way InfoNCE of
    # each instruction over its toy scene's faithful and failed ending, temperature
    # ranking_temperature (flipjax.models.value_loss.success_ranking_loss; toy clips only).
    c.loss = ml_collections.ConfigDict(dict(
        vip_image=1.0, vip_text=1.0, infonce=1.0, temperature=1.0, num_negatives=3,
        success_ranking=0.0, ranking_temperature=0.1))
    # With success_ranking: toy "train" scenes (seed config.seed) rendered as faithful/failed
    # ending pairs, and pairs per step (0: batch_size).
    c.toy_ranking_scenes = 2048
    c.ranking_batch = 0
    # Each ranking ending translated by up to this many pixels (0: none; no colour jitter, as
    # colour names the block). Rendered pairs are kept in toy_pairs_cache_dir ("": the
    # workdir's toy_data), one .npz per setting.
    c.ranking_shift = 0
    c.toy_pairs_cache_dir = ""

    c.learning_rate = 1e-5
    c.weight_decay = 1e-3
    c.batch_size = 64
    c.total_steps = 10_000
    c.log_every = 50
    c.checkpoint_every = 1_000
    c.eval_every = 1_000
    c.ema_decay = 0.999

    c.min_episode_length = 2  # shorter episodes have no consecutive pair
    c.eval_episodes = 16  # held-out episodes whose value curves are scored; 0 disables eval
    c.eval_stride = 1  # frames between the states of an evaluated value curve
    # Toy planning problems ("plan" split of config.seed, held out) whose faithful and failed
    # endings the eval ranks (value_prefers_success; also as many training scenes); 0 = off.
    c.eval_preference_problems = 0
    # Toy clips built when build_toy_data_if_missing: frame side and track horizon.
    c.toy_image_size = 128
    c.toy_horizon = 16

    if runlocal:
        apply_runlocal(c)
        tiny = ValueConfig.variant("tiny")
        c.model.name = "tiny"
        c.model.image_size = 32
        c.model.patch = 8
        c.model.temporal_fusion = tiny.temporal_fusion
        c.model.text_pool = tiny.text_pool
        c.model.vision_width = tiny.vision_width
        c.model.text_width = tiny.text_width
        c.model.embed_dim = tiny.embed_dim
        c.model.language_dim = 32
        c.learning_rate = 1e-3
        # Tracks the weights within ~10 steps, so the 50-step eval shows what was learnt.
        c.ema_decay = 0.9
        # Every held-out episode up to 16 (capped by what the split holds): a toy model's
        # language Spearman over 2 episodes was 0.45 off its own 16-episode figure.
        c.eval_episodes = 16
        c.toy_image_size = 32
        c.toy_horizon = 4
        c.eval_preference_problems = 100
    c.lock()
    return c
