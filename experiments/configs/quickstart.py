"""The README's main job: every FLIP module, tiny, on the embedded toy world, in minutes on a CPU.

    python -m experiments.train --config=experiments/configs/quickstart.py --workdir=/tmp/flip

Renders toy-world episodes and builds their clips once (``<workdir>/toy_data``), then trains in
turn the frame autoencoder, the action module (flow CVAE), the dynamics module (latent video
DiT on the autoencoder's latents) and the value module, each from its own config's
``:runlocal`` variant, in ``<workdir>/<module>``. Each writes checkpoints, ``metrics.jsonl``,
TensorBoard events and samples under ``samples/``; ``<workdir>/quickstart.json`` summarises
the final evaluation of every module. Rerunning the command resumes where it stopped.

The shared fields apply to every module: ``total_steps`` (per module), ``batch_size``,
``seed``, ``log_every``, ``checkpoint_every`` and ``data_dir`` (empty: the toy build in the
workdir). ``modules`` picks a subset, e.g. ``--config.modules=cvae,dit``; the DiT needs the
autoencoder's run (``<workdir>/autoencoder``) unless ``dit_codec`` is ``pixels``.
"""

from __future__ import annotations

import ml_collections

from experiments.configs.common import apply_runlocal, base_config, parse_arg

MODULES = ("autoencoder", "cvae", "dit", "value")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the locked quickstart config (``arg``: None or "runlocal", which is the same
    tiny run with fewer steps)."""
    runlocal = parse_arg(arg)
    c = base_config()
    apply_runlocal(c)
    c.trainer = "quickstart"
    c.modules = ",".join(MODULES)
    c.total_steps = 40 if runlocal else 200
    c.batch_size = 8
    c.log_every = 10 if runlocal else 25
    c.checkpoint_every = 100
    c.eval_every = 0  # the last step is always evaluated
    # More toy episodes than a module's own :runlocal, so the models see some variety.
    c.toy_episodes = 8 if runlocal else 24
    c.toy_val_episodes = 2 if runlocal else 4
    # "autoencoder": the DiT trains on the latents of the autoencoder trained first;
    # "pixels": a space-to-depth stand-in (no autoencoder needed).
    c.dit_codec = "autoencoder"
    c.lock()
    return c
