"""Geometry: point tracks + first-frame depth + intrinsics -> SE(3) motion -> robot actions.

Flax-free pure functions, written for jit and vmap. The batched entry point is
:func:`fit_rigid_sequence`; :func:`fit_rigid` is its single-frame building block.

Modules: ``camera`` (projection), ``se3`` (transforms), ``robust`` (losses), ``subgoals``
(contact point, grasp-vs-push), ``navigation`` (discrete moves, replanning triggers),
``neighbourhood`` (local track consistency, interpolation), ``warp`` (back to frame 0),
``avdc_reference`` (AVDC's fit, the baseline), ``synthetic`` (test scenes).
"""

from flipjax.geometry import camera, navigation, robust, se3, subgoals, synthetic
from flipjax.geometry.rigid_fit import FitConfig, FrameFit, fit_rigid
from flipjax.geometry.sequence import SequenceFit, fit_rigid_sequence

__all__ = [
    "FitConfig",
    "FrameFit",
    "SequenceFit",
    "camera",
    "fit_rigid",
    "fit_rigid_sequence",
    "navigation",
    "robust",
    "se3",
    "subgoals",
    "synthetic",
]
