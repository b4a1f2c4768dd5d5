"""The embedded procedural toy world: a top-down tabletop (``world``), scripted tasks with
instructions and success predicates (``tasks``), its RLDS dataset (``rlds``, ``python -m
data_pipelines.toy``) and planning problems (``problems``)."""

from data_pipelines.toy.rlds import NAME, VERSION, build, episodes, features, to_rlds
from data_pipelines.toy.tasks import episode_rng

__all__ = ["NAME", "VERSION", "build", "episode_rng", "episodes", "features", "to_rlds"]
