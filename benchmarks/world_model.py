"""Issue 18's world model benchmark: train the FLIP modules on the toy world from scratch with
``experiments/configs/toy_world_model.py``, evaluate them, plan held-out toy problems with and
without the value, and write every figure beside its baseline.

  python -m benchmarks.world_model --out world_model.json [--seed S] [--workdir DIR]
      [--quick] [--plot curves.png]

Training is the quickstart trainer with that config (the toy clips built once, then the CVAE,
the DiT on the pixel codec and the value); a ``--workdir`` that holds a run resumes it (the
seed and quick setting it was made with are recorded there and a rerun must keep them).
``--seed`` changes the toy training and held-out episodes, the value's ending pairs and the
planning problems. Planning is ``experiments.plan`` on the config's ``plan`` settings (100
held-out toy problems, value-guided and FLIP-NV with the same keys).

Figures (the final held-out evaluation of each trainer; ADE in pixels, PSNR in dB):

* ``cvae_prior_ade_moving`` / ``cvae_posterior_ade_moving`` / ``cvae_best_of_8_ade_moving``
  beside ``cvae_still_ade_moving`` (no motion), ``cvae_prior_ade_all`` beside
  ``cvae_still_ade_all`` (every point), ``cvae_prior_spread``;
* ``dit_psnr`` beside ``dit_copy_psnr`` (the current frame repeated) and
  ``dit_still_flow_psnr``; ``dit_moving_psnr_true_flow`` beside ``dit_moving_psnr_still_flow``
  and ``dit_moving_copy_psnr`` (over the pixels that change); ``dit_warp_psnr`` and
  ``dit_moving_warp_psnr``: the current frame warped along the true tracks, no network (the
  hand-written predictor; unit flows only); ``dit_x0_mse_t5`` (one network call's x0
  error at t = 5 of 1000) beside ``dit_warp_x0_mse`` and ``dit_copy_x0_mse``;
* ``value_prefers_success`` (the value trainer's eval on held-out planning problems; the plan
  summary's figure when the trainer has none) beside ``value_prefers_success_chance`` (0.5);
* ``plan_success_value`` beside ``plan_success_no_value`` (FLIP-NV) and
  ``plan_success_scripted`` (the script's own tracks read out the same way), over
  ``plan_problems``;
* ``train_wall_s`` (clip build, training and evaluations; summed over resumed invocations).

Also ``targets`` / ``targets_met`` (issue 18's "must show"), ``learning_curves`` (per module,
every eval metric and the training loss by step), ``plan_summary`` (the planner's diagnostics)
and ``settings`` (the config and each module's resolved config). The learning curves are
plotted to ``--plot`` (default: the JSON's name with ``.png``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.report import write_result

TIMING_FILE = "world_model_timing.json"
SETTINGS_FILE = "world_model_settings.json"
PLAN_DIR = "plan"
# benchmark key -> (module, metric of that module's final eval record)
EVAL_KEYS = {
    "cvae_prior_ade_moving": ("cvae", "prior_ade_moving"),
    "cvae_posterior_ade_moving": ("cvae", "posterior_ade_moving"),
    "cvae_best_of_8_ade_moving": ("cvae", "best_of_8_ade_moving"),
    "cvae_still_ade_moving": ("cvae", "still_ade_moving"),
    "cvae_prior_ade_all": ("cvae", "prior_ade"),
    "cvae_still_ade_all": ("cvae", "still_ade"),
    "cvae_prior_spread": ("cvae", "prior_spread"),
    "dit_psnr": ("dit", "psnr"),
    "dit_copy_psnr": ("dit", "copy_psnr"),
    "dit_still_flow_psnr": ("dit", "still_flow_psnr"),
    "dit_moving_psnr_true_flow": ("dit", "moving_psnr"),
    "dit_moving_psnr_still_flow": ("dit", "moving_still_flow_psnr"),
    "dit_moving_copy_psnr": ("dit", "moving_copy_psnr"),
    "dit_warp_psnr": ("dit", "warp_psnr"),
    "dit_moving_warp_psnr": ("dit", "moving_warp_psnr"),
    # One network call's x0 error at t = 5 of 1000 beside its warp's and copying's: below
    # them once the network has learned anything beyond its anchor.
    "dit_x0_mse_t5": ("dit", "x0_mse_t5"),
    "dit_warp_x0_mse": ("dit", "warp_x0_mse"),
    "dit_copy_x0_mse": ("dit", "copy_x0_mse"),
    "value_prefers_success": ("value", "value_prefers_success"),
    "value_prefers_success_train": ("value", "value_prefers_success_train"),
}
# benchmark key -> key of experiments.plan's plan_summary.json
PLAN_KEYS = {"plan_success_value": "success_rate", "plan_success_no_value":
             "success_rate_no_value", "plan_success_scripted": "success_rate_scripted_plan",
             "plan_problems": "evaluated"}
# The keys: every one is written (None when its source did not report it).
REQUIRED = ("cvae_prior_ade_moving", "cvae_still_ade_moving", "cvae_best_of_8_ade_moving",
            "cvae_posterior_ade_moving", "cvae_prior_ade_all", "cvae_still_ade_all", "dit_psnr",
            "dit_copy_psnr", "dit_moving_psnr_true_flow", "dit_moving_psnr_still_flow",
            "value_prefers_success", "plan_success_value", "plan_success_no_value",
            "plan_success_scripted", "plan_problems", "train_wall_s")
# Issue 18, "Must show".
TARGETS = {
    "cvae_best_of_8_over_still_max": 0.35, "cvae_posterior_over_still_max": 0.5,
    "dit_psnr_over_copy_min_db": 1.0, "dit_moving_true_over_still_flow_min_db": 3.0,
    "value_prefers_success_min": 0.9, "plan_success_value_min": 0.7,
    "plan_value_over_no_value_min": 0.25, "train_wall_s_max": 3600.0,
}
# Learning-curve panels: module -> metrics drawn (the baselines dashed).
PANELS = {
    "cvae": ("ADE, moving points (px)", ("prior_ade_moving", "posterior_ade_moving",
                                          "best_of_8_ade_moving"), ("still_ade_moving",)),
    "dit": ("PSNR (dB)", ("psnr", "moving_psnr"),
            ("copy_psnr", "warp_psnr", "moving_still_flow_psnr", "moving_copy_psnr",
             "moving_warp_psnr")),
    "value": ("prefers the faithful ending", ("value_prefers_success",
                                             "value_prefers_success_train"), ()),
}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        and math.isfinite(float(value)) else None


def learning_curves(workdir: str | Path, modules: tuple[str, ...] = ("cvae", "dit", "value")
                    ) -> dict[str, dict[str, Any]]:
    """Per module, every numeric eval metric and the training loss as ``[[step, value], ...]``.

    Args:
      workdir: the training workdir (``<workdir>/<module>/metrics.jsonl``).
      modules: the modules to read.

    Returns:
      ``{module: {"eval": {metric: [[step, value], ...]}, "train_loss": [[step, loss], ...]}}``;
      a step logged twice (a resumed run) keeps its last record.
    """
    from experiments.training import loop

    curves: dict[str, dict[str, Any]] = {}
    for module in modules:
        evals: dict[str, dict[int, float]] = {}
        loss: dict[int, float] = {}
        for r in loop.read_metrics(Path(workdir) / module):
            step = int(r["step"])
            if r.get("split") == "eval":
                for k, v in r.items():
                    if k not in ("step", "split") and _number(v) is not None:
                        evals.setdefault(k, {})[step] = float(v)
            elif r.get("split") == "train" and _number(r.get("loss")) is not None:
                loss[step] = float(r["loss"])
        curves[module] = {"eval": {k: sorted(map(list, v.items())) for k, v in evals.items()},
                          "train_loss": sorted(map(list, loss.items()))}
    return curves


def collect(curves: dict[str, dict[str, Any]], plan_summary: dict[str, Any],
            train_wall_s: float | None) -> dict[str, Any]:
    """The benchmark's figures from the learning curves' last evaluations and the plan summary.

    Args:
      curves: :func:`learning_curves`.
      plan_summary: ``experiments.plan``'s ``plan_summary.json`` (may be empty).
      train_wall_s: training wall time in seconds.

    Returns:
      Every key of ``REQUIRED`` (None where its source did not report it) plus the extra
      baselines of ``EVAL_KEYS``, ``value_prefers_success_chance``,
      ``value_prefers_success_source`` and ``plan_value_prefers_success``.
    """
    out: dict[str, Any] = {}
    for key, (module, metric) in EVAL_KEYS.items():
        series = curves.get(module, {}).get("eval", {}).get(metric)
        out[key] = series[-1][1] if series else None
    out["value_prefers_success_chance"] = 0.5
    out["plan_value_prefers_success"] = _number(plan_summary.get("value_prefers_success"))
    out["value_prefers_success_source"] = "value trainer eval"
    if out["value_prefers_success"] is None and out["plan_value_prefers_success"] is not None:
        out["value_prefers_success"] = out["plan_value_prefers_success"]
        out["value_prefers_success_source"] = "plan summary"
    for key, source in PLAN_KEYS.items():
        out[key] = plan_summary.get(source)
    out["train_wall_s"] = None if train_wall_s is None else round(float(train_wall_s), 1)
    return {**{k: out[k] for k in REQUIRED}, **out}


def targets_met(f: dict[str, Any]) -> dict[str, bool | None]:
    """Issue 18's criteria on the figures (None where a figure is missing)."""
    def ok(*keys: str) -> bool:
        return all(f.get(k) is not None for k in keys)

    t = TARGETS
    still = f.get("cvae_still_ade_moving")
    return {
        "cvae_best_of_8": f["cvae_best_of_8_ade_moving"] <= t["cvae_best_of_8_over_still_max"]
        * still if ok("cvae_best_of_8_ade_moving", "cvae_still_ade_moving") else None,
        "cvae_posterior": (f["cvae_posterior_ade_moving"] <= t["cvae_posterior_over_still_max"]
                           * still and f["cvae_posterior_ade_moving"]
                           < f["cvae_prior_ade_moving"])
        if ok("cvae_posterior_ade_moving", "cvae_still_ade_moving", "cvae_prior_ade_moving")
        else None,
        "cvae_no_spurious_motion": f["cvae_prior_ade_all"] <= f["cvae_still_ade_all"]
        if ok("cvae_prior_ade_all", "cvae_still_ade_all") else None,
        "dit_beats_copy": f["dit_psnr"] >= f["dit_copy_psnr"] + t["dit_psnr_over_copy_min_db"]
        if ok("dit_psnr", "dit_copy_psnr") else None,
        "dit_follows_flow": f["dit_moving_psnr_true_flow"] >= f["dit_moving_psnr_still_flow"]
        + t["dit_moving_true_over_still_flow_min_db"]
        if ok("dit_moving_psnr_true_flow", "dit_moving_psnr_still_flow") else None,
        "value_ranks_outcomes": f["value_prefers_success"] >= t["value_prefers_success_min"]
        if ok("value_prefers_success") else None,
        "planning": (f["plan_success_value"] >= t["plan_success_value_min"]
                     and f["plan_success_value"] - f["plan_success_no_value"]
                     >= t["plan_value_over_no_value_min"])
        if ok("plan_success_value", "plan_success_no_value") else None,
        "train_wall_time": f["train_wall_s"] <= t["train_wall_s_max"]
        if ok("train_wall_s") else None,
    }


def plot_curves(curves: dict[str, dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Draws the learning curves: one panel per module's eval metrics (baselines dashed) and
    one of the training losses; written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, (module, (ylabel, lines, baselines)) in zip(axes, PANELS.items(), strict=False):
        evals = curves.get(module, {}).get("eval", {})
        for names, style in ((lines, "-o"), (baselines, "--")):
            for name in names:
                if evals.get(name):
                    steps, values = zip(*evals[name], strict=True)
                    ax.plot(steps, values, style, label=name, markersize=3)
        if module == "value":
            ax.axhline(0.5, ls="--", color="grey", label="chance")
        ax.set(title=module, xlabel="step", ylabel=ylabel)
        ax.legend(fontsize=7)
    ax = axes[-1]
    for module, c in curves.items():
        if c.get("train_loss"):
            steps, values = zip(*c["train_loss"], strict=True)
            ax.plot(steps, values, label=module)
    ax.set(title="training loss", xlabel="step", yscale="symlog")
    ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _timing(workdir: Path) -> dict[str, Any]:
    path = workdir / TIMING_FILE
    return json.loads(path.read_text()) if path.exists() else {"train_wall_s": 0.0,
                                                               "invocations": 0}


def _finished(config: Any, workdir: Path, modules: list[str]) -> bool:
    """Whether the quickstart summary in ``workdir`` has every module at its total steps."""
    from experiments.trainers import quickstart

    path = workdir / quickstart.SUMMARY_FILE
    done = json.loads(path.read_text()).get("modules", {}) if path.exists() else {}
    return all(m in done and done[m]["step"] >= quickstart.module_config(
        config, m, workdir, workdir, workdir).total_steps for m in modules)


def train(config: Any, workdir: Path) -> tuple[float, bool]:
    """Trains (or resumes) every module; returns (training wall seconds summed over the
    invocations that finished, whether this one resumed an earlier run)."""
    from experiments.trainers import quickstart

    before = _timing(workdir)
    modules = quickstart.selected_modules(config)
    resumed = before["invocations"] > 0 or any((workdir / m).exists() for m in modules)
    if before["invocations"] > 0 and _finished(config, workdir, modules):
        print("world model: every module already trained in this workdir", flush=True)
        return before["train_wall_s"], True
    t0 = time.perf_counter()
    quickstart.train_and_evaluate(config, str(workdir))
    total = before["train_wall_s"] + time.perf_counter() - t0
    (workdir / TIMING_FILE).write_text(json.dumps(
        {"train_wall_s": total, "invocations": before["invocations"] + 1}))
    return total, resumed


def plan(config: Any, workdir: Path, seed: int) -> dict[str, Any]:
    """Plans the config's held-out toy problems with the trained runs; the plan summary."""
    from experiments import plan as planning
    from experiments.configs import plan as plan_configs
    from experiments.trainers.quickstart import apply_overrides

    pc = plan_configs.get_config()
    apply_overrides(pc, config.plan.to_dict(), "config.plan",
                    source="experiments/configs/plan.py")
    pc.runs, pc.seed = str(workdir), int(seed)
    return planning.run(pc, workdir / PLAN_DIR)


def settings(config: Any, workdir: Path) -> dict[str, Any]:
    """The config and each module's resolved config (what the trainers ran with)."""
    from experiments.trainers import quickstart

    train_dir, eval_dir = workdir / "toy_data" / "train", workdir / "toy_data" / "val"
    return {"config": config.to_dict(), "modules": {
        m: quickstart.module_config(config, m, workdir, train_dir, eval_dir).to_dict()
        for m in quickstart.selected_modules(config)}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark (see the module docstring); returns the result written to --out."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write.")
    p.add_argument("--seed", type=int, default=0,
                   help="Toy episodes (train and held out), value pairs and planning problems.")
    p.add_argument("--workdir", default=None,
                   help="Keep the runs here and resume them (default: a temporary folder).")
    p.add_argument("--quick", action="store_true", help="A tiny smoke run (a few minutes).")
    p.add_argument("--plot", default=None, help="Learning-curve PNG (default: next to --out).")
    a = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from experiments.configs import toy_world_model
    from flipjax import console
    from flipjax.settings_record import record_or_check

    console.setup_logging(("experiments", "data_pipelines", "benchmarks"))
    config = toy_world_model.get_config("quick" if a.quick else None)
    config.seed = a.seed
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="flipjax_world_model_"))
    workdir.mkdir(parents=True, exist_ok=True)
    record_or_check(workdir / SETTINGS_FILE, {"seed": a.seed, "quick": a.quick},
                    refusal=f"--workdir {workdir} holds a run with other settings",
                    remedy="use a new --workdir")
    print(f"world model: training {config.modules} in {workdir} (seed {a.seed}"
          f"{', quick' if a.quick else ''})", flush=True)
    train_wall_s, resumed = train(config, workdir)
    print(f"world model: trained in {train_wall_s:.0f}s; planning "
          f"{config.plan.num_problems} held-out toy problems", flush=True)
    t0 = time.perf_counter()
    summary = plan(config, workdir, a.seed)
    plan_wall_s = time.perf_counter() - t0
    curves = learning_curves(workdir)
    figures = collect(curves, summary, train_wall_s)
    result: dict[str, Any] = {
        **figures, "train_resumed": resumed, "plan_wall_s": round(plan_wall_s, 1),
        "seed": a.seed, "quick": a.quick, "targets": TARGETS,
        "targets_met": targets_met(figures), "learning_curves": curves,
        "plan_summary": {k: v for k, v in summary.items() if k != "settings"},
        "settings": {**settings(config, workdir), "plan": summary.get("settings")},
    }
    plot = a.plot or str(Path(a.out).with_suffix(".png"))
    plot_curves(curves, plot, f"toy world model (seed {a.seed}{', quick' if a.quick else ''})")
    result["plot"] = plot
    for key in REQUIRED:
        print(f"  {key}: {figures[key]}", flush=True)
    if a.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    write_result(a.out, result)
    return result


if __name__ == "__main__":
    from flipjax import console

    with console.user_errors("benchmarks.world_model"):
        main()
