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
  (``flipjax.flow_conditioning.flow_to_model``) inside ``encode_conditions``.
* ``null_conditions(P, flows, text_tokens, text_mask) -> cond`` (optional): the null condition
  of classifier-free guidance for a batch shaped like the arguments (FLIP: zero model flow, no
  text tokens, see ``flipjax.flow_conditioning.drop_conditions``); needed only for guidance
  scales != 1.
* ``encode(P, frames f32[B H W 3]) -> f32[B h w C]`` and ``decode(P, latents) -> frames``: the
  frame codec (``flipjax.codec.LatentCodec`` methods).
* ``value(P, frames f32[B Tv H W 3], text_tokens, text_mask) -> f32[B]``: value of a clip of
  ``Tv = value_frames`` frames for the instruction, per row (never normalised over the batch).

From trained modules: :func:`world_model_from_modules` wraps a FlowCVAE (action), a VideoDiT
(dynamics), a :class:`~flipjax.codec.LatentCodec` and a ValueModel with their params;
:func:`world_model_from_checkpoints` (also ``WorldModel.from_checkpoints``) rebuilds the three
models from the configs their trainers saved with every checkpoint (:mod:`flipjax.builders`,
the one place where a config becomes a model, so a checkpoint always loads into the
architecture that wrote it) and loads the params. Those two import flax when they run;
importing this module does not.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from flipjax import codec as codec_lib
from flipjax import flow_conditioning
from flipjax.codec import LatentCodec
from flipjax.typing import Array, PRNGKey, PyTree

if TYPE_CHECKING:
    from flipjax.models import diffusion
    from flipjax.models.flow_cvae import FlowCVAE
    from flipjax.models.value import ValueModel
    from flipjax.models.video_dit import VideoDiT

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
        """The world model of trained runs: see :func:`world_model_from_checkpoints`.

        Returns:
          (world model, the DiT's training ``diffusion.Schedule`` for ``PlanConfig.schedule``).
        """
        return world_model_from_checkpoints(action, dynamics, value, codec=codec, ema=ema,
                                            dtype=dtype)


def _last(frames: Array, n: int, name: str) -> Array:
    if frames.shape[1] < n:
        raise ValueError(f"{name}: the model needs {n} history frames, got shape "
                         f"{list(frames.shape)}; plan with at least {n} history frames")
    return frames[:, frames.shape[1] - n:]


def world_model_from_modules(*, cvae: FlowCVAE, cvae_params: PyTree, dit: VideoDiT,
                             dit_params: PyTree, codec: LatentCodec, value: ValueModel,
                             value_params: PyTree, image_size: tuple[int, int],
                             flow_normalization: str = "pixels",
                             prediction: str = "eps") -> WorldModel:
    """The planner's world model of trained Linen modules.

    Args:
      cvae: the action module; ``propose`` draws one prior sample per row from its last
        ``cvae.config.history`` frames.
      cvae_params, dit_params, value_params: their ``params`` collections.
      dit: the dynamics module; it sees its last ``dit.history`` latent frames, flows in the
        units it was trained on (``flow_normalization``).
      codec: the frame codec the DiT was trained on (its params travel inside it).
      value: the value module; it scores clips of ``value.config.clip_len`` frames, resized
        to its input size.
      image_size: (H, W) of the frames the modules were trained on.
      flow_normalization: the DiT trainer's ``flow_normalization``.
      prediction: what the DiT's output predicts, its trainer's ``prediction`` ("eps").

    Returns:
      The :class:`WorldModel` (``history_frames`` = the most history any module needs).

    Raises:
      ValueError: when the modules disagree on the frame size, flow horizon or text width.
    """
    from flipjax.models.value import fit_frames

    image_size = tuple(int(s) for s in image_size)
    c = cvae.config
    problems = []
    if tuple(c.img_size) != image_size:
        problems.append(f"the CVAE takes {tuple(c.img_size)} frames, the DiT {image_size}")
    if c.flow_horizon != dit.flow_horizon:
        problems.append(f"the CVAE proposes {c.flow_horizon}-step flows, the DiT takes "
                        f"{dit.flow_horizon}")
    if c.language_dim != dit.text_dim:
        problems.append(f"the CVAE reads text width {c.language_dim}, the DiT {dit.text_dim}")
    latent = codec.latent_shape(image_size)
    if latent != (*dit.latent_size, dit.in_channels):
        problems.append(f"the codec makes {latent} latents, the DiT takes "
                        f"{(*dit.latent_size, dit.in_channels)}")
    if problems:
        raise ValueError("the modules do not fit together: " + "; ".join(problems))
    n_cvae, n_dit, clip_len = int(c.history), int(dit.history), int(value.config.clip_len)

    def propose(p: PyTree, frames: Array, queries: Array, text: Array, mask: Array,
                key: PRNGKey) -> Array:
        out = cvae.apply({"params": p}, queries, _last(frames, n_cvae, "history"), text, mask,
                         method="sample", rngs={"latent": key})
        return out["flow"]

    def encode_conditions(p: PyTree, flows: Array, text: Array, mask: Array) -> Any:
        flow = flow_conditioning.flow_to_model(flows, image_size, flow_normalization)
        return dit.apply({"params": p}, flow, text, mask, method="encode_conditions")

    def null_conditions(p: PyTree, flows: Array, text: Array, mask: Array) -> Any:
        flow = flow_conditioning.flow_to_model(flows, image_size, flow_normalization)
        drop = jnp.ones(flows.shape[:1], bool)
        return dit.apply({"params": p}, *flow_conditioning.drop_conditions(flow, text, mask, drop),
                         method="encode_conditions")

    def denoise(p: PyTree, x: Array, t: Array, cond: Any, history: Array) -> Array:
        return dit.apply({"params": p}, x, t, cond, _last(history, n_dit, "latent history"),
                         method="denoise")

    def encode(cd: LatentCodec, frames: Array) -> Array:
        return cd.encode(frames)

    def decode(cd: LatentCodec, latents: Array) -> Array:
        return jnp.clip(cd.decode(latents), -1.0, 1.0)

    def value_fn(p: PyTree, frames: Array, text: Array, mask: Array) -> Array:
        frames = fit_frames(frames, value.config.image_size)
        return value.apply({"params": p}, frames, text, mask)

    return WorldModel(
        propose=propose, encode_conditions=encode_conditions, denoise=denoise, encode=encode,
        decode=decode, value=value_fn, null_conditions=null_conditions,
        action_params=cvae_params, dynamics_params=dit_params, codec_params=codec,
        value_params=value_params, learned_range=bool(dit.learn_sigma), prediction=prediction,
        value_frames=clip_len, history_frames=max(n_cvae, n_dit, clip_len - 1),
        latent_history_frames=n_dit)


# ------------------------------------------------------------------------------------------
# From trainer workdirs
# ------------------------------------------------------------------------------------------


def run_config(workdir: str | Path, step: int | None = None) -> Any:
    """The ``ml_collections`` config a trainer saved with a checkpoint of ``workdir``.

    Raises:
      FileNotFoundError: when the run has no checkpoint.
      ValueError: when the checkpoint carries no config (not written by a flipjax trainer).
    """
    import ml_collections

    from flipjax.checkpoints import load_meta

    meta = load_meta(workdir, step)
    raw = meta.get("config")
    if isinstance(raw, str):
        raw = json.loads(raw)
    if not isinstance(raw, Mapping) or "trainer" not in raw:
        raise ValueError(f"checkpoint of {workdir} has no trainer config in its metadata "
                         f"(keys: {sorted(meta)}); was it written by experiments.train?")
    return ml_collections.ConfigDict(dict(raw))


def _expect(config: Any, trainer: str, workdir: str | Path, role: str) -> None:
    if config.trainer != trainer:
        raise ValueError(f"{role}={workdir} is a {config.trainer!r} run; the {role} module "
                         f"must come from a {trainer!r} run")


def _dynamics_codec(config: Any, workdir: Path, codec: LatentCodec | str | Path | None
                    ) -> LatentCodec:
    from flipjax import builders

    if isinstance(codec, LatentCodec):
        return codec
    if codec is not None:
        scale = float(config.codec.scale) if config.codec.scale else None
        return codec_lib.from_workdir(codec, ema=bool(config.codec.ema), scale=scale)
    source = config.codec.workdir or config.codec.diffusers_dir
    if builders.codec_kind(config) == "autoencoder" and not Path(source).exists():
        raise ValueError(f"the dynamics run {workdir} was trained on the codec at {source!r}, "
                         "which does not exist from here (relative to the working directory "
                         f"{Path.cwd()}); pass codec= (a LatentCodec or an autoencoder run)")
    return builders.build_codec(config)


def world_model_from_checkpoints(action: str | Path, dynamics: str | Path, value: str | Path,
                                 *, codec: LatentCodec | str | Path | None = None,
                                 ema: bool | None = None, dtype: str = "float32"
                                 ) -> tuple[WorldModel, diffusion.Schedule]:
    """Loads the action, dynamics and value modules from their trainers' workdirs.

    Args:
      action: a ``cvae`` run; dynamics: a ``dit`` run; value: a ``value`` run (their latest
        checkpoints are loaded).
      codec: the DiT's frame codec: None rebuilds the one its config names (an autoencoder
        run, a diffusers directory or the pixel codec); an autoencoder run directory; or a
        ready :class:`LatentCodec`.
      ema: load the EMA params (True), the raw ones (False), or (None) the EMA when the run
        kept one that has moved away from the initialisation (less than 10% of it left:
        ``ema_decay ** step < 0.1``; a short run's 0.9999 EMA is still its init).
      dtype: compute dtype of the rebuilt models ("float32" or "bfloat16").

    Returns:
      (world model, the diffusion schedule the DiT was trained with: pass it as
      ``PlanConfig.schedule``).

    Raises:
      FileNotFoundError: a directory without checkpoints.
      ValueError: a run of the wrong kind, or modules that do not fit together.
    """
    from flipjax import builders
    from flipjax.checkpoints import load_meta, load_params

    configs = {}
    for role, run, trainer in (("action", action, "cvae"), ("dynamics", dynamics, "dit"),
                               ("value", value, "value")):
        cfg = run_config(run)
        _expect(cfg, trainer, run, role)
        with cfg.unlocked():
            cfg.compute_dtype = dtype
        configs[role] = cfg

    def params(run: str | Path, cfg: Any) -> PyTree:
        decay = cfg.get("ema_decay")
        if ema is None:
            # A short run's slow EMA is still mostly its initialisation (decay^steps of it).
            use = decay is not None and float(decay) ** int(load_meta(run)["step"]) < 0.1
        else:
            use = bool(ema)
            if use and decay is None:
                raise ValueError(f"ema=True but the run {run} kept no EMA (ema_decay None)")
        return load_params(run, ema=use)

    dyn = configs["dynamics"]
    frame_codec = _dynamics_codec(dyn, Path(dynamics), codec)
    world = world_model_from_modules(
        cvae=builders.build_cvae(configs["action"]),
        cvae_params=params(action, configs["action"]),
        dit=builders.build_dit(dyn, frame_codec), dit_params=params(dynamics, dyn),
        codec=frame_codec, value=builders.build_value(configs["value"]),
        value_params=params(value, configs["value"]),
        image_size=tuple(int(s) for s in dyn.image_size),
        flow_normalization=str(dyn.flow_normalization),
        prediction=str(dyn.get("prediction", "eps")))
    return world, builders.build_schedule(dyn)
