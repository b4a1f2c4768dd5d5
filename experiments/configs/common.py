"""Fields shared by every training config (``base_config``), ``:runlocal`` and the
``--config=<family>.py:<variant>[,runlocal]`` argument (``parse_variant``).

One config file per module family (``cvae.py``, ``dit.py``, ``value.py``, ``autoencoder.py``)
defines ``get_config(arg)``; ``arg`` is the text after the colon in ``--config=path.py:arg``:
the variant (a model size or a recipe) and optionally ``runlocal``, which turns the config
into a seconds-long CPU smoke run. ``dit_large.py`` is the documented entry point of DiT-L.
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


def parse_variant(arg: str | None, family: str, variants: tuple[str, ...]
                  ) -> tuple[str | None, bool]:
    """The variant and ``runlocal`` flag of ``--config=<family>.py:<variant>[,runlocal]``.

    Args:
      arg: the config-file argument, e.g. "L", "S,runlocal" or "runlocal" (a tiny CPU run,
        whatever the variant).
      family: the config file's name, for the error.
      variants: the variants the file knows.

    Returns:
      (variant or None when only ``runlocal`` was given, runlocal).

    Raises:
      ValueError: for a missing or unknown variant or an unknown option, naming the valid ones.
    """
    parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
    runlocal = RUNLOCAL in parts
    rest = [p for p in parts if p != RUNLOCAL]
    usage = (f"use --config=experiments/configs/{family}.py:VARIANT with VARIANT one of "
             f"{list(variants)} (add ',{RUNLOCAL}' for a tiny CPU run)")
    if len(rest) > 1 or (rest and rest[0] not in variants):
        raise ValueError(f"unknown config argument {arg!r} for {family}.py; {usage}")
    if not rest and not runlocal:
        raise ValueError(f"{family}.py needs a variant; {usage}")
    return (rest[0] if rest else None), runlocal


def base_config() -> ml_collections.ConfigDict:
    """Fields every trainer reads (see ``experiments/training/loop.py``).

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
    # Toy data (experiments/training/clips.py): rendered and built into data_dir when it has
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

    # Read by experiments.training.common.make_optimizer / make_schedule.
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
