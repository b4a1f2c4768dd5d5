"""Jitted, batched hill-climbing beam search over flows, videos and values (flax-free).

``WorldModel`` bundles the action, dynamics, codec and value apply functions with their
params; ``hill_climb`` plans P problems with B beams and A candidates per step as one jitted
``lax.scan`` program and returns a ``Plan``. See ``beam_search`` for the departures from the
official FLIP planner. ``plan_to_actions`` turns the chosen plan's tracks into object (or
camera) motion, subgoals and grasp/push or navigation actions with ``flipjax.geometry``;
``WorldModel.from_checkpoints`` loads trained runs (it imports flax when it runs).
"""

from flipjax.planning.actions import MODES, PlanActions, plan_to_actions
from flipjax.planning.beam_search import (
    BeamState,
    Plan,
    PlanConfig,
    grid_queries,
    hill_climb,
    rollout_candidates,
    sharded_search,
)
from flipjax.planning.world_model import WorldModel

__all__ = [
    "MODES",
    "BeamState",
    "Plan",
    "PlanActions",
    "PlanConfig",
    "WorldModel",
    "grid_queries",
    "hill_climb",
    "plan_to_actions",
    "rollout_candidates",
    "sharded_search",
]
