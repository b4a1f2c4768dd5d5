"""flipjax: FLIP flow-centric generative planning and AVDC action-from-video geometry in JAX.

Subpackages:
  flipjax.geometry  point tracks + depth + intrinsics -> SE(3) motion, subgoals, actions.
  flipjax.models    Linen modules (action CVAE, video DiT, frame codec, value, policy).
  flipjax.planning  jitted hill-climbing beam search over flows, videos and values.
"""

__version__ = "0.1.0"
