"""Plans with trained FLIP modules: hill-climbing beam search over toy-world or clip problems.

    python -m experiments.plan --config=experiments/configs/plan.py --workdir=DIR \
        --config.runs=QUICKSTART_WORKDIR [--config.num_problems=50 \
        --config.compare_no_value=True --config.beams=4 ...]
    python -m experiments.plan --config=experiments/configs/plan.py:runlocal --workdir=DIR \
        --config.runs=QUICKSTART_WORKDIR

Loads the world model (``WorldModel.from_checkpoints``), builds the problems (toy problems
rendered with the image size, history and text settings of the loaded runs, or clips of a
``build_clips`` directory), plans them in batches of ``problem_batch`` with one jitted
``hill_climb`` call each (sharded over the mesh's data axis when several devices take part)
and writes, per problem ``i``:

* ``problems/<i>/plan.json``: the instruction, per-beam values and returns, the chosen beam,
  and for toy problems the block motion fitted from the chosen plan's tracks
  (``plan_to_actions``, world frame) and whether it meets the task's success predicate; also
  the same readout of the script's own tracks of the same queries over the same chunks
  (``scripted_plan``: what a perfect world model would reach with this horizon, query layout
  and motion readout, the ceiling of the planners' rates);
* for the first ``write_media`` problems ``plan.gif`` (history, then the chosen beam's frames
  with the tracks of their planning step) and ``values.png`` (every beam's values);
  ``*_no_value`` versions for the FLIP-NV ablation;

and ``plan_summary.json``: the settings, the number of problems, plans per second and, for toy
problems, the success rates of value-guided planning (``success_rate``), of FLIP-NV on the
same problems with the same keys (``success_rate_no_value``, with ``compare_no_value``) and of
the scripted tracks (``success_rate_scripted_plan``), with counts and per-task successes.
The summary also measures the three preconditions of value guidance
(``flipjax.planning.diagnostics``): ``candidate_spread_px``, how far apart the action module's
candidates are; for toy problems, ``dynamics_*``, whether the dynamics module's clip follows
the script's own flow (PSNR against the script's next frames with the true flow, with every
track held still, and of copying the current frame; ``dynamics_change`` is 0 when the flow is
ignored); and ``value_prefers_success``, how often the value scores a problem's faithful
ending above a failed script's ending (0.5 is chance).

Toy problems query the ``query_grid`` grid plus, with ``object_window`` r > 0, every pixel of
a (2r+1)^2 window around the task block: the block's motion is read from the queries on it
(``plan_to_actions`` needs 3 per planning step), and at the toy's 32 x 32 frames a block is
3-4 px wide, under at most one query of the 8 x 8 grid the models were trained with.
With ``follow_queries`` each planning step after the first queries where the kept tracks of
the step before ended (the window moves with the block), and the readout and the scripted
oracle chain their chunks the same way.

Every problem's key is derived from ``seed`` and its index only, so a problem plans the same in
any batch. Reruns skip problems whose ``plan.json`` exists and recompute the summary from all
of them; a rerun with other search settings is refused (``plan_settings.json``).
"""

from experiments.plan.problems import Problems, build_problems, object_window
from experiments.plan.runner import (
    SUMMARY_FILE,
    load_world_model,
    plan_config,
    run,
    run_dirs,
    summarize,
)

__all__ = ["SUMMARY_FILE", "Problems", "build_problems", "load_world_model", "object_window",
           "plan_config", "run", "run_dirs", "summarize"]
