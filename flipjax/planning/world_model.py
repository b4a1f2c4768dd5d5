"""The planner's world model: action, dynamics, codec and value as pure functions with params.

A :class:`WorldModel` is a frozen dataclass registered as a JAX pytree: the four parameter
trees are its leaves, the apply functions and the static facts about the dynamics model are
aux data. Pass it as an argument of a jitted function so that parameters are jit arguments
(never baked-in constants) while the functions stay static. It imports no flax: trained Linen
modules are wrapped by the caller, e.g. ``propose=lambda p, *a: cvae.apply(...)``, and tests
plug in tiny analytic functions.

The functions (``P``: that function's params; every batch axis B is independent rows):

* ``propose(P, frames f32[B Th H W 3] in [-1, 1], queries f32[B N 2], text_tokens f32[B Lt D],
  text_mask bool[B Lt], key) -> flows f32[B N L 2]``: the action module (a CVAE prior sample).
  Flows are pixel (u, v) tracks of the query points, step 0 being the current frame.
* ``encode_conditions(P, flows f32[B N L 2], text_tokens, text_mask) -> cond`` (any pytree with
  batch B on every leaf) and ``denoise(P, x f32[B F h w C], t int[B], cond,
  history f32[B Th h w C]) -> f32[B F h w C or 2C]``: the dynamics module. ``t`` are the
  ORIGINAL training timesteps (the samplers map respaced steps back); ``denoise`` sees only the
  ``F = L - 1`` future frames, the history is clean. Convert pixel flows to the model's units
  (``flipjax.codec.flow_to_model``) inside ``encode_conditions``.
* ``null_conditions(P, flows, text_tokens, text_mask) -> cond`` (optional): the null condition
  of classifier-free guidance for a batch shaped like the arguments (FLIP: zero model flow, no
  text tokens, see ``flipjax.codec.drop_conditions``); needed only for guidance scales != 1.
* ``encode(P, frames f32[B H W 3]) -> f32[B h w C]`` and ``decode(P, latents) -> frames``: the
  frame codec (``flipjax.codec.LatentCodec`` methods).
* ``value(P, frames f32[B Tv H W 3], text_tokens, text_mask) -> f32[B]``: value of a clip of
  ``Tv = value_frames`` frames for the instruction, per row (never normalised over the batch).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from flipjax.typing import PyTree

_FUNCTIONS = ("propose", "encode_conditions", "denoise", "encode", "decode", "value")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["action_params", "dynamics_params", "codec_params", "value_params"],
    meta_fields=["propose", "encode_conditions", "denoise", "encode", "decode", "value",
                 "null_conditions", "learned_range", "prediction", "value_frames",
                 "history_frames", "latent_history_frames"])
@dataclasses.dataclass(frozen=True)
class WorldModel:
    """The four modules the planner calls, as pure functions, with their parameters.

    Attributes:
      propose, encode_conditions, denoise, encode, decode, value, null_conditions: see the
        module docstring; each takes its module's params first.
      action_params: params of ``propose``.
      dynamics_params: params of ``encode_conditions``, ``denoise`` and ``null_conditions``.
      codec_params: params of ``encode`` / ``decode``.
      value_params: params of ``value``.
      learned_range: whether ``denoise`` returns 2C channels (eps and variance values).
      prediction: what ``denoise`` predicts: "eps", "v" or "x0".
      value_frames: Tv, frames per clip that ``value`` scores (1: single frames).
      history_frames: the fewest observation frames the functions work with (the planner
        refuses a shorter history; each function takes the last frames it needs).
      latent_history_frames: how many of the newest history frames ``denoise`` reads; only
        those are encoded and kept in latent space (None: all of them). The full-size FLIP
        CVAE reads 16 frames, the DiT 4: encoding the other 12 would be wasted.
    """

    propose: Callable[..., Any]
    encode_conditions: Callable[..., Any]
    denoise: Callable[..., Any]
    encode: Callable[..., Any]
    decode: Callable[..., Any]
    value: Callable[..., Any]
    action_params: PyTree = None
    dynamics_params: PyTree = None
    codec_params: PyTree = None
    value_params: PyTree = None
    null_conditions: Callable[..., Any] | None = None
    learned_range: bool = True
    prediction: str = "eps"
    value_frames: int = 1
    history_frames: int = 1
    latent_history_frames: int | None = None

    def __post_init__(self) -> None:
        # Only static fields are checked: JAX rebuilds the dataclass with placeholder leaves.
        for name in _FUNCTIONS:
            if not callable(getattr(self, name)):
                raise ValueError(f"WorldModel.{name} must be callable, got "
                                 f"{type(getattr(self, name)).__name__}")
        if self.null_conditions is not None and not callable(self.null_conditions):
            raise ValueError("WorldModel.null_conditions must be callable or None")
        if self.prediction not in ("eps", "v", "x0"):
            raise ValueError(f"WorldModel.prediction must be 'eps', 'v' or 'x0', got "
                             f"{self.prediction!r}")
        if int(self.history_frames) < 1:
            raise ValueError(f"WorldModel.history_frames must be >= 1, got "
                             f"{self.history_frames}")
        if self.latent_history_frames is not None and not \
                1 <= int(self.latent_history_frames) <= int(self.history_frames):
            raise ValueError(f"WorldModel.latent_history_frames must be in [1, history_frames="
                             f"{self.history_frames}] or None, got {self.latent_history_frames}")
        if int(self.value_frames) < 1:
            raise ValueError(f"WorldModel.value_frames must be >= 1, got {self.value_frames}")

    @classmethod
    def from_checkpoints(cls, action: str | Path, dynamics: str | Path, value: str | Path, *,
                         codec: Any = None, ema: bool | None = None, dtype: str = "float32"
                         ) -> tuple[WorldModel, Any]:
        """The world model of trained runs: see
        :func:`flipjax.planning.loading.world_model_from_checkpoints` (imports flax).

        Returns:
          (world model, the DiT's training ``diffusion.Schedule`` for ``PlanConfig.schedule``).
        """
        from flipjax.planning.loading import world_model_from_checkpoints

        return world_model_from_checkpoints(action, dynamics, value, codec=codec, ema=ema,
                                            dtype=dtype)
