"""Array aliases and the axis-letter glossary used in shape comments across flipjax.

Shapes are written in einops notation, e.g. ``tracks: float[B T N 2]``.

Axis letters:
  B  batch (independent problems, sharded over the ``data`` mesh axis)
  T  frames / time steps of a clip or plan
  N  tracked points (query points of a flow)
  H  image height in pixels      W  image width in pixels      C  channels
  S  samples drawn from a mask   M  hypotheses of a robust initialiser
  L  plan horizon (flow steps)   K  (only as ``K``) the 3x3 camera intrinsics

Coordinates: pixels (u, v) = (column, row), pixel centres at integers; camera frame x right,
y down, z forward, metres; rigid transforms are 4x4 matrices acting on column vectors.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

Array = jax.Array
ArrayLike = jax.Array | np.ndarray
PRNGKey = jax.Array
PyTree = Any
