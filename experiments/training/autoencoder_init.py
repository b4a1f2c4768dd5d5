"""The autoencoder trainer's ``config.init_from``: a diffusers ``AutoencoderKL`` directory, a
diffusers-named ``.safetensors`` file or a flipjax autoencoder workdir, checked against
``config.model`` before anything is read and loaded as host parameters."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from flipjax import builders
from flipjax.checkpoints import checkpoint_dir, load_params
from flipjax.models import autoencoder_json
from flipjax.models.autoencoder import AutoencoderConfig

PyTree = Any
# Compared between config.model and init_from (the rest is runtime or metadata).
_NOT_ARCHITECTURE = ("dtype", "remat", "sample_size")
_DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def _architecture(cfg: AutoencoderConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_ARCHITECTURE}


def _check_same_architecture(ours: AutoencoderConfig, theirs: AutoencoderConfig,
                             source: Path) -> None:
    a, b = _architecture(ours), _architecture(theirs)
    diff = [f"{k}: config.model {a[k]!r} vs {b[k]!r}" for k in a if a[k] != b[k]]
    if diff:
        raise ValueError(f"config.init_from {source} has another architecture than "
                         "config.model (set the model fields to match): " + "; ".join(diff))


def resolve_init_from(config: ml_collections.ConfigDict) -> tuple[str, Path] | None:
    """What ``config.init_from`` names: ("diffusers", dir), ("safetensors", file),
    ("workdir", dir), or None when it is empty (allowed in decoder mode only under
    ``:runlocal``).

    Raises:
      ValueError: for an empty ``init_from`` in decoder mode, a missing path, or a path of
        none of the accepted kinds (all named).
    """
    if not config.init_from:
        if config.mode == "decoder" and not config.runlocal:
            raise ValueError(
                "config.init_from is empty: decoder fine-tuning starts from pretrained "
                "weights; set --config.init_from to a local diffusers AutoencoderKL directory "
                "(e.g. a download of stabilityai/sd-vae-ft-ema) or a flipjax autoencoder "
                "workdir")
        return None
    path = Path(config.init_from).expanduser()
    if not path.exists():
        raise ValueError(f"config.init_from {path} does not exist")
    if path.is_file():
        if path.suffix == ".safetensors":
            return "safetensors", path
        raise ValueError(f"config.init_from {path}: only .safetensors weight files are read "
                         "(torch .bin/.ckpt need torch; convert them to safetensors)")
    if checkpoint_dir(path).is_dir() or (path / autoencoder_json.CONFIG_FILE).is_file():
        return "workdir", path
    for d in (path, path / "vae"):
        if (d / "config.json").is_file():
            return "diffusers", d
    raise ValueError(f"config.init_from {path} is neither a diffusers AutoencoderKL directory "
                     f"(config.json + {_DIFFUSERS_WEIGHTS}, or a pipeline with vae/) nor a "
                     "flipjax autoencoder workdir (checkpoints/)")


def _diffusers_weights(directory: Path) -> Path:
    exact = directory / _DIFFUSERS_WEIGHTS
    if exact.is_file():
        return exact
    found = sorted(directory.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    others = sorted(p.name for p in directory.iterdir())
    raise ValueError(f"diffusers directory {directory}: expected {_DIFFUSERS_WEIGHTS} (or one "
                     f"*.safetensors file), found {others}")


def _diffusers_config(cfg: AutoencoderConfig) -> dict[str, Any]:
    """Our config as a diffusers ``AutoencoderKL`` config dict (for bare weight files)."""
    n = len(cfg.block_out_channels)
    d = {k: v for k, v in autoencoder_json.to_json(cfg).items()
         if k not in ("dtype", "remat", "eps")}
    return {**d, "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n, "act_fn": "silu"}


def check_init_from(config: ml_collections.ConfigDict) -> tuple[str, Path] | None:
    """Resolves ``init_from`` and checks its architecture against ``config.model`` without
    reading weights (so a bad path or model fails before data and devices are touched)."""
    source = resolve_init_from(config)
    if source is None:
        return None
    kind, path = source
    ours = builders.autoencoder_config(config)
    if kind == "diffusers":
        _diffusers_weights(path)
        theirs = AutoencoderConfig.from_diffusers((path / "config.json").read_text())
        _check_same_architecture(ours, theirs, path)
    elif kind == "workdir":
        if (path / autoencoder_json.CONFIG_FILE).is_file():
            _check_same_architecture(ours, autoencoder_json.read(path), path)
        if not checkpoint_dir(path).is_dir():
            raise ValueError(f"config.init_from {path} has no checkpoints/ to load")
    return source


def load_pretrained(config: ml_collections.ConfigDict) -> PyTree | None:
    """The host parameters ``config.init_from`` names (None when it is empty).

    Returns:
      The AutoencoderKL parameter tree (numpy float32), as ``make_init_fn`` builds it.
    """
    from safetensors.numpy import load_file

    from flipjax.models.convert_sd_vae import sd_vae_from_diffusers

    source = check_init_from(config)
    if source is None:
        return None
    kind, path = source
    cfg = builders.autoencoder_config(config)
    if kind == "workdir":
        ema = bool(config.init_from_ema)
        try:
            params = load_params(path, ema=ema)
        except ValueError:
            if not ema:
                raise
            # Runs without an EMA (LDM's recipe has none) still initialise, from their params.
            logging.warning("%s has no EMA parameters; initialising from its params", path)
            params = load_params(path)
        logging.info("initialising from the flipjax autoencoder run %s (ema=%s)", path, ema)
    else:
        weights = _diffusers_weights(path) if kind == "diffusers" else path
        diffusers_cfg = ((path / "config.json").read_text() if kind == "diffusers"
                         else _diffusers_config(cfg))
        _, variables = sd_vae_from_diffusers(load_file(str(weights)), diffusers_cfg)
        params = variables["params"]
        logging.info("initialising from diffusers weights %s", weights)
    return jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(params))
