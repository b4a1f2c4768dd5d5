"""The latent video DiT (dynamics module) at the official S, B or L sizes on ``config.data_dir``.

    python -m experiments.train --config=experiments/configs/dit.py:L --workdir=DIR \
        --config.data_dir=CLIPS --config.codec.diffusers_dir=SD_VAE_DIR

``--config.codec.workdir=AE_RUN`` uses a flipjax autoencoder run instead of the SD-VAE.
``:S,runlocal`` (or ``:runlocal``) trains a tiny model for 50 steps on toy data generated in
the workdir. ``dit_large.py`` is the same as ``dit.py:L``.

Defaults are the official DynamicsModel recipe: 4 history + 15 future frames at 128x128,
SD-VAE latents (16x16x4, scale 0.18215), patch 2, learned sigma, 1000-step linear schedule,
IDDPM loss (MSE + VB) with the history frames clean and excluded, AdamW at a constant 1e-4
without weight decay or gradient clipping, EMA 0.9999.
"""

from __future__ import annotations

import ml_collections

from experiments.configs.common import apply_runlocal, base_config, parse_variant

VARIANTS = ("S", "B", "L")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the locked config; ``arg`` is a size of :data:`VARIANTS`, then ``,runlocal``."""
    size, runlocal = parse_variant(arg, "dit", VARIANTS)
    return dit_config(size or "S", runlocal)


def dit_config(size: str, runlocal: bool = False) -> ml_collections.ConfigDict:
    """A locked VideoDiT training config.

    Args:
      size: official model size "S", "B" or "L" (``:runlocal`` always uses "tiny").
      runlocal: the tiny CPU smoke run.

    Returns:
      The locked config.
    """
    c = base_config()
    c.trainer = "dit"

    # Model: VideoDiT.variant(size, ...); latent_size and in_channels come from the codec.
    c.model = ml_collections.ConfigDict(dict(
        size=size, patch=2,
        history=4,  # clean observation frames (the last one is the current frame)
        flow_horizon=16,  # track length L; the clip has history + L - 1 frames
        learn_sigma=True,
        # Must equal the clips' text_dim: 384 = MiniLM per-token features
        # (build_clips --text=minilm). The official model reads Llama-3.1 features (4096).
        text_dim=384, text_layers=3, text_heads=8,
        flow_attention="shared",  # "concat": the official (costlier, same result) computation
        # "cross" + flow_gate: own-softmax flow attention behind a zero-init gate (departures)
        flow_gate=False,
        # "positional": flow tokens carry the patches' position embedding along their path
        # (a departure; needs flow_normalization="unit")
        flow_embedding="mlp",
        # True: future tokens also get the current tokens carried along the tracks (a
        # departure; needs flow_normalization="unit")
        flow_splat=False,
        # True: future tokens also get the current latents warped along the tracks at latent
        # resolution (a departure; needs flow_normalization="unit")
        flow_warp=False,
        # True: with prediction="x0", the future frames' prediction is that warp plus the
        # network's output (a departure; needs flow_normalization="unit")
        flow_residual=False,
        # True: with flow_residual, the network corrects only cells near a moving track and
        # the rest is the current frame (a departure)
        residual_gate=False,
    ))
    c.image_size = (128, 128)  # frames (H, W) of the clips; clips from build_clips --grid 23
    c.remat = False  # rematerialise every DiT block in the backward pass

    # Frame codec (flipjax/codec.py). kind "autoencoder" reads exactly one of workdir (a
    # flipjax autoencoder run with autoencoder_config.json) or diffusers_dir (a local copy of
    # stabilityai/sd-vae-ft-ema, the official codec); "pixels" is a space-to-depth stand-in by
    # `factor` for smoke runs; "auto" picks "autoencoder" when a source is given, else "pixels".
    c.codec = ml_collections.ConfigDict(dict(
        # ema: the autoencoder run's EMA parameters (autoencoder runs keep none by default).
        kind="autoencoder", workdir="", diffusers_dir="", ema=False, factor=8,
        scale=0.18215,  # SD-VAE latent scale; <= 0 takes the autoencoder config's own
    ))

    c.diffusion_steps = 1000
    c.noise_schedule = "linear"  # or "cosine"
    c.flow_normalization = "pixels"  # the official flow units; or "unit" (see flipjax/codec.py)
    # What the output predicts: "eps" (official), "x0" (a departure: on the DiT ladder it takes
    # the samples from 2.2 dB below copying to copying, docs/LEARNING.md) or "v".
    c.prediction = "eps"
    # Classifier-free guidance: probability of training a sample with the null condition.
    # The official recipe has none (0); sampling.guided needs it > 0 (e.g. 0.1).
    c.cond_dropout = 0.0
    c.num_points = 0  # tracked points per clip (random subset); 0 keeps all
    c.track_noise = 0.0  # std (pixels) of the track noise (the official flow_aug uses 1)

    # Official recipe: AdamW, constant 1e-4, no weight decay, no clipping, EMA 0.9999. The
    # official global batch size is not in the released configs; 64 is a placeholder.
    c.learning_rate = 1e-4
    c.schedule = "constant"
    c.warmup_steps = 0
    c.weight_decay = 0.0
    c.grad_clip_norm = 0.0
    c.ema_decay = 0.9999
    c.batch_size = 64

    c.eval_batches = 4  # held-out batches per evaluation; 0 disables evaluation
    c.eval_sample_steps = 50  # DDIM steps (respaced from diffusion_steps)
    c.eval_ddim_eta = 0.0
    # v > 0 clips the sampler's predicted latents to [-v, v]. 0: clip pixel-codec latents to
    # their bound, leave autoencoder latents unclipped (as DiT and the official FLIP sampler).
    c.eval_clip_x0 = 0.0

    if size.upper() == "L":
        # FSDP over every device (benchmarks.pod, v5p-128, 8 samples per chip, bf16): 22.5
        # GiB of HBM per chip against 26.5 data-parallel, the cost model's step 0.126 s
        # against 0.131 (README, Pod scale without a pod). S and B stay data-parallel.
        c.mesh.data, c.mesh.fsdp = 1, -1
    if runlocal:
        apply_runlocal(c)
        c.model.size = "tiny"
        # Patch 1: a 2x2 patch of 48-channel pixel latents (192 values) would not fit
        # through the tiny model's 64-wide tokens, so it could not even pass the noise on.
        c.model.patch = 1
        c.model.history = 2
        c.model.flow_horizon = 4
        c.model.text_dim = 32
        c.image_size = (32, 32)
        c.codec.kind = "auto"  # pixels unless --config.codec.workdir / diffusers_dir is given
        c.codec.factor = 4  # 32x32x3 frames -> 8x8x48 "latents"
        c.ema_decay = 0.9  # so that a 50-step run's EMA (used in eval) has moved
        c.learning_rate = 1e-3  # the tiny model learns visibly within a few hundred steps
        c.eval_batches = 1
        c.eval_sample_steps = 4
    c.lock()
    return c
