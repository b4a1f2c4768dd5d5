"""The autoencoder's architecture as JSON: ``<workdir>/autoencoder_config.json``.

The autoencoder trainer writes it at the start of a run; the frame codec
(:func:`flipjax.codec.from_workdir`) and the trainer's ``--config.init_from`` read it back, so a
run's parameters always load into the architecture that wrote them. This is the one reader and
writer of that file. Importing it does not import flax (the planner's codec is flax-free).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from flipjax.settings_record import read_json_object

if TYPE_CHECKING:
    from flipjax.models.autoencoder import AutoencoderConfig

CONFIG_FILE = "autoencoder_config.json"


def to_json(cfg: AutoencoderConfig) -> dict[str, Any]:
    """``dataclasses.asdict(cfg)`` with JSON types: dtype by name, tuples as lists.

    Args:
      cfg: the architecture.

    Returns:
      A JSON-serialisable dict that :func:`from_json` turns back into ``cfg``.
    """
    d = dataclasses.asdict(cfg)
    d["dtype"] = jnp.dtype(cfg.dtype).name
    d["block_out_channels"] = list(cfg.block_out_channels)
    return d


def _dtype(value: Any) -> Any:
    """A dtype given as a name (or a stringified type, e.g. "<class 'jax.numpy.float32'>")."""
    if not isinstance(value, str):
        return value
    m = re.search(r"(bfloat16|float16|float32|float64)", value)
    if m is None:
        raise ValueError(f"unknown dtype {value!r} in the autoencoder config")
    return jnp.dtype(m.group(1)).type


def from_json(raw: Mapping[str, Any], source: str = "autoencoder config",
              **overrides: Any) -> AutoencoderConfig:
    """Inverse of :func:`to_json`; missing fields keep their defaults.

    Args:
      raw: AutoencoderConfig fields (``dtype`` as a name such as "float32").
      source: named in errors (e.g. the file).
      **overrides: fields to set afterwards (e.g. ``dtype=jnp.bfloat16``).

    Raises:
      ValueError: for fields AutoencoderConfig does not have (named) or an unknown dtype.
    """
    from flipjax.models.autoencoder import AutoencoderConfig

    known = {f.name for f in dataclasses.fields(AutoencoderConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{source} has unknown fields {unknown} (AutoencoderConfig has "
                         f"{sorted(known)})")
    values = dict(raw)
    if "dtype" in values:
        values["dtype"] = _dtype(values["dtype"])
    if "block_out_channels" in values:
        values["block_out_channels"] = tuple(values["block_out_channels"])
    values.update(overrides)
    return AutoencoderConfig(**values)


def read(path: str | Path, **overrides: Any) -> AutoencoderConfig:
    """The AutoencoderConfig of a run: ``path`` is its workdir or the JSON file itself.

    Args:
      path: a run directory holding :data:`CONFIG_FILE`, or the file.
      **overrides: fields to set afterwards.

    Raises:
      ValueError: when the file is missing, not a JSON object or has unknown fields (named).
    """
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{path} does not exist: not a flipjax autoencoder workdir (no "
                         f"{CONFIG_FILE})")
    return from_json(read_json_object(path), str(path), **overrides)


def write(cfg: AutoencoderConfig, workdir: str | Path) -> Path:
    """Writes ``<workdir>/autoencoder_config.json`` (process 0 only); returns its path."""
    path = Path(workdir) / CONFIG_FILE
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(to_json(cfg), indent=2) + "\n")
    return path
