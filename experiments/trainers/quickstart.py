"""Trains every FLIP module in turn on one toy build (see ``experiments/configs/quickstart.py``).

Each module runs its own trainer from its config's ``:runlocal`` variant with the
quickstart's shared fields copied over, in ``<workdir>/<module>``; the toy clips are built
once, with the action module's clip layout, and read by every module (frames are stored once
per episode, so each module picks its own history/future split). ``quickstart.json`` in the
workdir lists, per module, the final evaluation, the checkpoint step and the sample files.

A config may carry one dict of overrides per module (``config.cvae``, ``config.dit``, ...;
see ``experiments/configs/toy_world_model.py``), applied last onto that module's config, nested
dicts onto nested fields: ``config.cvae.model.point_features = 32`` sets the CVAE's
``model.point_features``. An unknown field, a value of the wrong type or a toy-data field
(the clips are built once for every module, from the shared ``toy_*`` fields) is refused with
one line naming the key.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import ml_collections
from absl import logging

from experiments.training import clips, loop

# module -> (config file:variant, trainer module, what it is)
MODULES = {
    "autoencoder": ("autoencoder:sd", "autoencoder", "frame codec (SD-VAE architecture)"),
    "cvae": ("cvae:S", "cvae", "action module (flow CVAE)"),
    "dit": ("dit:S", "dit", "dynamics module (latent video DiT)"),
    "value": ("value:clip", "value", "value module (LIV-style)"),
}
SUMMARY_FILE = "quickstart.json"
# Fields of the quickstart config that every module's config takes over.
SHARED = ("seed", "total_steps", "batch_size", "log_every", "checkpoint_every", "eval_every",
          "keep_checkpoints", "async_checkpointing", "toy_episodes", "toy_val_episodes",
          "toy_grid", "toy_text_max_tokens", "toy_speed", "toy_failure_fraction",
          "data_workers", "data_threads", "compute_dtype")
# Fields that shape the one toy build every module reads: a per-module override of one of them
# would not change that module's data, so it is refused.
DATA_FIELDS = ("toy_episodes", "toy_val_episodes", "toy_grid", "toy_text_max_tokens",
               "toy_speed", "toy_failure_fraction", "data_dir", "eval_data_dir")


def selected_modules(config: ml_collections.ConfigDict) -> list[str]:
    """``config.modules`` as a list in training order.

    Raises:
      ValueError: for an unknown module name or an empty list.
    """
    names = [m.strip() for m in str(config.modules).split(",") if m.strip()]
    unknown = [m for m in names if m not in MODULES]
    if unknown or not names:
        raise ValueError(f"config.modules={config.modules!r}: unknown {unknown}; choose from "
                         f"{', '.join(MODULES)}")
    return [m for m in MODULES if m in names]


def module_config(config: ml_collections.ConfigDict, module: str, workdir: Path,
                  train_dir: Path, eval_dir: Path) -> ml_collections.ConfigDict:
    """The ``:runlocal`` config of ``module`` with the quickstart's shared fields."""
    import importlib

    family, variant = MODULES[module][0].split(":")
    sub = importlib.import_module(f"experiments.configs.{family}").get_config(
        f"{variant},runlocal")
    for name in SHARED:
        sub[name] = config[name]
    sub.mesh = config.mesh.to_dict()
    sub.data_dir, sub.eval_data_dir = str(train_dir), str(eval_dir)
    if module == "dit":
        sub.codec.kind = config.dit_codec
        if config.dit_codec == "autoencoder":
            sub.codec.workdir = str(workdir / "autoencoder")
            # SD's 0.18215 was measured on SD's autoencoder; a freshly trained one needs its
            # own unit-variance scale (the LDM recipe), which its evaluation reports.
            sub.codec.scale = _unit_std_scale(workdir / "autoencoder")
            # A few hundred steps leave the DiT's noise predictions rough; at the first DDIM
            # steps x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab) amplifies their error ~100x, so
            # the eval sampler clips x0 to +-4 (4 standard deviations of unit-std latents).
            sub.eval_clip_x0 = 4.0
    apply_overrides(sub, module_overrides(config, module), f"config.{module}",
                    source=f"experiments/configs/{family}.py:{variant},runlocal")
    return sub


def module_overrides(config: ml_collections.ConfigDict, module: str) -> dict[str, Any]:
    """``config.<module>`` as a plain dict (empty when the config has none)."""
    overrides = config.get(module)
    if overrides is None:
        return {}
    if not isinstance(overrides, ml_collections.ConfigDict | dict):
        raise ValueError(f"config.{module} must be a dict of {module} config fields, got "
                         f"{overrides!r}")
    return overrides.to_dict() if isinstance(overrides, ml_collections.ConfigDict) \
        else dict(overrides)


def apply_overrides(sub: ml_collections.ConfigDict, overrides: dict[str, Any], where: str, *,
                    source: str = "the module config") -> None:
    """Sets ``overrides`` onto the locked ``sub`` in place, nested dicts onto nested fields.

    Args:
      sub: a module's config (locked: no new fields).
      overrides: field -> value, or field -> dict for a nested ConfigDict field.
      where: the overrides' own name for errors, e.g. "config.cvae".
      source: the config ``sub`` came from, for errors.

    Raises:
      ValueError: one line naming the key, for a field ``sub`` does not have, a value of the
        wrong type, a dict for a plain field, or a toy-data field at the top level.
    """
    for key, value in overrides.items():
        name = f"{where}.{key}"
        if key not in sub:
            raise ValueError(f"{name}: unknown field (not in {source})")
        if where.count(".") == 1 and key in DATA_FIELDS:
            raise ValueError(f"{name}: every module reads the same toy clips; set "
                             f"config.{key} instead")
        if isinstance(sub[key], ml_collections.ConfigDict):
            if not isinstance(value, dict):
                raise ValueError(f"{name}: is a group of fields; give a dict, got {value!r}")
            apply_overrides(sub[key], value, name, source=source)
            continue
        if isinstance(value, dict):
            raise ValueError(f"{name}: is a single field ({sub[key]!r}), not a group")
        try:
            sub[key] = value
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name}={value!r}: {str(e).splitlines()[0]}") from None


def _unit_std_scale(run: Path) -> float:
    """``scale_for_unit_std`` of an autoencoder run's last evaluation (0: the config's)."""
    evals = [r for r in loop.read_metrics(run) if r["split"] == "eval"
             and r.get("scale_for_unit_std")]
    return float(evals[-1]["scale_for_unit_std"]) if evals else 0.0


def _prepare_data(config: ml_collections.ConfigDict, workdir: Path) -> tuple[Path, Path]:
    """Builds the toy clips once, with the action module's layout, when data_dir is empty."""
    from experiments.configs import cvae as cvae_configs
    from experiments.trainers import cvae

    train_dir, eval_dir = clips.data_dirs(config, workdir)
    spec_config = cvae_configs.get_config("S,runlocal")
    for name in SHARED:
        spec_config[name] = config[name]
    # The CVAE's own overrides may change its clip layout (history, horizon, frame size).
    apply_overrides(spec_config, module_overrides(config, "cvae"), "config.cvae",
                    source="experiments/configs/cvae.py:S,runlocal")
    spec = cvae.clip_spec(spec_config)
    for split, directory in (("train", train_dir), ("val", eval_dir)):
        if not (directory / "manifest.json").exists():
            if config.data_dir:
                raise ValueError(f"data directory {directory} has no clips (manifest.json)")
            logging.info("quickstart: building the toy %s split in %s", split, directory)
            clips.build_toy_clips(spec_config, split, directory, spec)
    return train_dir, eval_dir


def _samples(run: Path) -> list[str]:
    folder = run / loop.SAMPLES_DIR
    return sorted(str(p) for p in folder.iterdir()) if folder.exists() else []


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains the selected modules in order, resuming finished or interrupted ones.

    Args:
      config: ``experiments/configs/quickstart.py``.
      workdir: root directory; each module gets ``<workdir>/<module>``.

    Returns:
      The summary written to ``<workdir>/quickstart.json``.
    """
    import importlib

    root = Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    modules = selected_modules(config)
    if "dit" in modules and config.dit_codec == "autoencoder" and "autoencoder" not in modules \
            and not (root / "autoencoder").exists():
        raise ValueError("the DiT trains on the autoencoder's latents: include 'autoencoder' "
                         "in config.modules, train it first, or set --config.dit_codec=pixels")
    if "value" in modules and config.toy_failure_fraction > 0:
        raise ValueError(f"config.toy_failure_fraction={config.toy_failure_fraction} with the "
                         "value module: the value trains on successful episodes only; train it "
                         "in a separate workdir with toy_failure_fraction=0")
    train_dir, eval_dir = _prepare_data(config, root)
    summary: dict[str, Any] = {"data": {"train": str(train_dir), "eval": str(eval_dir)},
                               "modules": {}}
    for i, module in enumerate(modules, 1):
        _, trainer, what = MODULES[module]
        logging.info("quickstart [%d/%d] %s: %s", i, len(modules), module, what)
        run = root / module
        sub = module_config(config, module, root, train_dir, eval_dir)
        t0 = time.perf_counter()
        # Not experiments.train.get_trainer: that module is __main__ under the CLI, and
        # importing it again would define its flags twice.
        state = importlib.import_module(f"experiments.trainers.{trainer}").train_and_evaluate(
            sub, str(run))
        evals = [r for r in loop.read_metrics(run) if r["split"] == "eval"]
        summary["modules"][module] = {
            "what": what, "workdir": str(run), "step": int(state.step),
            "seconds": round(time.perf_counter() - t0, 1),
            "eval": evals[-1] if evals else None, "samples": _samples(run)}
        path = root / SUMMARY_FILE
        path.write_text(json.dumps(summary, indent=2))
    logging.info("%s", summary_text(summary, root / SUMMARY_FILE))
    return summary


def summary_text(summary: dict[str, Any], path: Path) -> str:
    """The closing console lines: one per module (step, training time, run directory)."""
    modules = summary["modules"]
    seconds = sum(m["seconds"] for m in modules.values())
    lines = [f"quickstart done: trained in {seconds:.0f}s; final evaluations in {path}"]
    width = max(map(len, modules), default=0)
    lines += [f"  {name:<{width}}  step {m['step']}  {m['seconds']:>6.1f}s  {m['workdir']}"
              for name, m in modules.items()]
    return "\n".join(lines)
