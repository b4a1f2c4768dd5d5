"""Fields shared by every training config (``base_config``), ``:runlocal`` and the FlowCVAE
config used by ``cvae_small/base/large``.

Every config file defines ``get_config(arg=None)``; ``arg`` is the text after the colon in
``--config=path.py:arg``. ``runlocal`` turns a config into a seconds-long CPU smoke run.
"""

from __future__ import annotations

import ml_collections

RUNLOCAL = "runlocal"


def parse_arg(arg: str | None) -> bool:
    """Whether ``arg`` asks for a local smoke run.

    Args:
      arg: the config-file argument (None, "" or "runlocal").

    Returns:
      True for "runlocal".

    Raises:
      ValueError: for any other argument.
    """
    if arg in (None, ""):
        return False
    if arg == RUNLOCAL:
        return True
    raise ValueError(f"unknown config argument {arg!r}; the only one is {RUNLOCAL!r}")


def base_config() -> ml_collections.ConfigDict:
    """Fields every trainer reads (see ``experiments/trainers/loop.py``).

    Returns:
      An unlocked ConfigDict; the config file adds its fields and locks it.
    """
    c = ml_collections.ConfigDict()
    c.trainer = ""  # module name under experiments.trainers
    c.runlocal = False
    c.distributed = False  # call jax.distributed.initialize() (multi-host)
    c.seed = 0

    c.total_steps = 100_000
    c.batch_size = 64  # global, over all hosts
    c.log_every = 100
    c.checkpoint_every = 5_000
    c.keep_checkpoints = 3
    c.eval_every = 5_000  # 0 disables periodic evaluation (the last step is still evaluated)
    c.async_checkpointing = True
    # jax.profiler trace of steps [profile_start_step, profile_start_step + profile_steps)
    # into <workdir>/profile (process 0); 0 disables. Start after compilation (step > 1).
    c.profile_start_step = 0
    c.profile_steps = 5

    c.data_dir = ""
    c.eval_data_dir = ""  # empty: evaluate on the training clips (unshuffled)
    # Toy data (experiments/trainers/clips.py): rendered and built into data_dir when it has
    # no clips yet; on under :runlocal, where empty data dirs mean <workdir>/toy_data/*.
    c.build_toy_data_if_missing = False
    c.toy_episodes = 8
    c.toy_val_episodes = 2
    c.toy_grid = 8
    # Hashed words per toy instruction: the longest template ("pick up the red block and place
    # it in the bottom right corner") has 13, so 16 keeps every instruction whole.
    c.toy_text_max_tokens = 16
    # Metres of gripper motion per toy step (ToyConfig.speed): faster motion means larger
    # flows per clip, which small frames need for the motion to span several pixels.
    c.toy_speed = 0.015
    # Fraction of toy episodes whose script deliberately fails under its instruction (wrong
    # block, opposite target, too short): the action and dynamics modules then see several
    # motions per frame and instruction, as in play data. Value runs need 0 (LIV treats every
    # episode's last frame as its goal).
    c.toy_failure_fraction = 0.0
    c.data_workers = 0  # grain worker processes
    c.data_threads = 2

    # data x fsdp x tensor; -1 fills the remaining devices.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

    # Read by experiments.trainers.common.make_optimizer / make_schedule.
    c.learning_rate = 1e-4
    c.warmup_steps = 0
    c.schedule = "constant"
    c.end_learning_rate = 0.0
    c.weight_decay = 1e-2
    c.b1 = 0.9
    c.b2 = 0.999
    c.eps = 1e-8
    c.grad_clip_norm = 1.0
    c.grad_accum_steps = 1

    c.ema_decay = 0.9999  # None disables the EMA
    c.compute_dtype = "float32"  # or "bfloat16": bf16 compute, float32 master weights
    return c


def apply_runlocal(c: ml_collections.ConfigDict) -> None:
    """Shrinks a config in place to a ~50-step CPU run on generated toy data."""
    c.runlocal = True
    c.total_steps = 50
    c.batch_size = 4
    c.log_every = 10
    c.checkpoint_every = 25
    c.eval_every = 25
    c.warmup_steps = 0
    c.schedule = "constant"
    c.async_checkpointing = False
    c.build_toy_data_if_missing = True


def cvae_config(size: str, arg: str | None) -> ml_collections.ConfigDict:
    """A locked FlowCVAE training config.

    Args:
      size: official model size "S", "B" or "L" (runlocal always uses "tiny").
      arg: the config-file argument: None or "runlocal".

    Returns:
      The locked config.
    """
    runlocal = parse_arg(arg)
    c = base_config()
    c.trainer = "cvae"

    # Model: CVAEConfig.named(size, **fields). Defaults follow the official LIBERO recipe:
    # 16 history frames at 128x128, 16-point flows.
    c.model = ml_collections.ConfigDict(dict(
        size=size, flow_horizon=16, history=16, img_size=(128, 128), patch=8,
        # Must equal the clips' text_dim: 384 = MiniLM (build_clips --text=minilm).
        language_dim=384,
    ))
    # The official recipe: AdamW at 1e-4, constant. The official global batch size was not
    # verified from the released configs; 64 is a placeholder to tune per device count.
    c.learning_rate = 1e-4
    c.batch_size = 64
    c.ema_decay = 0.9999

    # flipjax.models.cvae_loss.CVAELossConfig; the official weights. The KL term is summed
    # over the batch, so with its 1e-4 weight a small batch leaves the latent unconstrained
    # (see the :runlocal value below).
    c.loss = ml_collections.ConfigDict(dict(
        direction=10.0, scale=10.0, kl=1e-4, ade=1.0, aux=1e-5, step_threshold=2.0,
        ade_threshold=1.0, up_weight=100.0, kl_batch_sum=True, robust_kl=True))
    c.num_points = 0  # tracked points per clip (random subset); 0 keeps all
    # With num_points: up to this fraction of the subset drawn from moving points (0: uniform,
    # the official sampling). See data_pipelines.loader.Augment.
    c.moving_fraction = 0.0
    c.track_noise = 0.0  # std (pixels) of the augmentation noise on tracks
    c.eval_batches = 4  # 0 disables evaluation, also at the last step
    c.ltdr_deltas = (2.0, 4.0, 8.0)

    if runlocal:
        apply_runlocal(c)
        c.model.size = "tiny"
        c.model.flow_horizon = 4
        c.model.history = 2
        c.model.img_size = (32, 32)
        c.model.language_dim = 32
        c.eval_batches = 2
    c.lock()
    return c
