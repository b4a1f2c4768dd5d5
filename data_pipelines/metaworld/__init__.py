"""Meta-World scenes (``sim``: upright cameras, exact intrinsics and extrinsics, depth,
segmentation), scripted expert demos (``demos``) and their RLDS dataset (``dataset``, ``python -m
data_pipelines.metaworld``: parallel, resumable, exact ground-truth tracks)."""

from data_pipelines.metaworld.dataset import (
    CACHE_DIR,
    build,
    cache_path,
    cache_settings,
    features,
    load_demo,
    render_demo,
    to_rlds,
)

__all__ = ["CACHE_DIR", "build", "cache_path", "cache_settings", "features", "load_demo",
           "render_demo", "to_rlds"]
