"""Planning with trained FLIP modules (``python -m experiments.plan``).

    python -m experiments.plan --config=experiments/configs/plan.py --workdir=DIR \
        --config.runs=QUICKSTART_WORKDIR [--config.num_problems=50 --config.compare_no_value=True]

The world model comes from ``runs`` (a quickstart workdir holding ``cvae/``, ``dit/`` and
``value/``) or from the three explicit run directories ``action_dir``, ``dynamics_dir`` and
``value_dir`` (each overrides its part of ``runs``); ``codec_dir`` replaces the DiT's own codec
(an autoencoder run). ``problems`` is "toy" (toy-world problems rendered on the fly, judged by
the task's success predicate) or a ``build_clips`` directory (plans only, no success).

The search fields are :class:`flipjax.planning.PlanConfig`'s (``sample_steps`` is an int or a
respacing spec such as "ddim25"; ``clip_x0`` 0 means no clipping); toy problems add a window of
``object_window`` queries around the task block to the ``query_grid`` grid. ``:runlocal`` plans
two toy problems with a tiny search (about a minute on a CPU, mostly compilation).
"""

from __future__ import annotations

import ml_collections

from experiments.configs.common import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the locked planning config; ``arg`` may be "runlocal"."""
    runlocal = parse_arg(arg)
    c = ml_collections.ConfigDict()
    c.runlocal = runlocal

    # The world model.
    c.runs = ""  # a quickstart workdir with cvae/, dit/, value/
    c.action_dir = ""  # a cvae run (overrides <runs>/cvae)
    c.dynamics_dir = ""  # a dit run (overrides <runs>/dit)
    c.value_dir = ""  # a value run (overrides <runs>/value)
    c.codec_dir = ""  # an autoencoder run replacing the DiT's codec; empty: the DiT's own
    c.ema = "auto"  # "auto" (EMA once it has moved from the init), "ema" or "params"
    c.dtype = "float32"  # compute dtype of the models: "float32" or "bfloat16"

    # The problems.
    c.problems = "toy"  # "toy" or a build_clips directory
    c.num_problems = 50
    c.problem_batch = 10  # problems per jitted search call (padded to the mesh's data axis)
    # Toy problems: "contact" (just before the task's block starts moving in the script),
    # "begin" (step 0) or a step index given as digits.
    c.start = "contact"
    c.seed = 0  # the toy episodes' seed and the search's base key (one key per problem index)

    # The search (PlanConfig). The defaults keep 50 toy problems, with the no-value ablation,
    # within about 15 minutes on a 2-core CPU with the quickstart's tiny models.
    c.beams = 2
    c.candidates = 4
    c.horizon = 4
    c.replace_every = 2
    c.discount = 0.99
    c.value_on = "last"  # or "clip"
    c.sampler = "ddim"  # or "ddpm"
    c.sample_steps = "4"  # an int or a respacing spec ("ddim25")
    c.eta = 0.0
    c.guidance_scale = 1.0  # != 1 needs a DiT trained with cond_dropout > 0
    c.use_value = True  # False plans FLIP-NV only
    c.query_grid = 8  # the G x G query grid (the toy clips are tracked on an 8 x 8 grid)
    # Toy problems: also query every pixel of a (2r+1)^2 window around the task block (0:
    # none). The block's motion is read from the tracks of the queries on it
    # (plan_to_actions needs 3 per planning step), but a toy block at 32 x 32 is 3-4 px wide
    # and lies under at most one grid query; r = 6 keeps queries under it while it moves
    # within reach of a few planning steps.
    c.object_window = 6
    # Each planning step queries where the previous step's kept tracks ended (the queries on
    # the block stay on it) instead of the same points again (official FLIP).
    c.follow_queries = False
    # The readout's motion prior (geometry.FitConfig.prior_translation / prior_rotation,
    # sigma in metres / radians; 0: none, AVDC's unregularised fit): noisy flows on a small
    # object otherwise read out as large spurious motion along the viewing ray.
    c.fit_prior_translation = 0.0
    c.fit_prior_rotation = 0.0
    c.clip_x0 = 4.0  # 0: no clipping; 4 as the quickstart DiT's evaluation (unit-std latents)
    c.compare_no_value = False  # also plan FLIP-NV on the same problems and keys

    # Outputs and devices.
    c.write_media = 4  # problems (the first ones) that get plan.gif and values.png
    c.fps = 4.0
    c.mesh = ml_collections.ConfigDict(dict(data=-1))  # devices sharing the problems; -1: all

    if runlocal:
        c.num_problems = 2
        c.problem_batch = 2
        c.candidates = 2
        c.horizon = 2
        c.sample_steps = "2"
        c.object_window = 2
        c.write_media = 2
    c.lock()
    return c
