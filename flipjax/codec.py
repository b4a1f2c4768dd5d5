"""The dynamics module's frame codec: frames <-> diffusion latents (:class:`LatentCodec`).

Used by the DiT trainer (``experiments/trainers/dit.py``) and by the planner, which must feed
the trained DiT exactly what it saw in training: the same latents for the history frames and
the same flow units. Importing this module does not import flax (the planner is flax-free);
autoencoder codecs import the Linen model when they run.

Frames <-> latents (:class:`LatentCodec`). A codec is a frozen dataclass registered as a JAX
pytree: its parameters are the only pytree leaves and everything else (kind, factor, channels,
scale, autoencoder architecture) is static. Pass the codec itself as an argument of a jitted
function, so that its parameters are jit *arguments*, never closed-over constants (the
sd-vae-ft-ema has 84M parameters, which would otherwise be baked into every compiled program):

    codec = from_diffusers_dir("/data/sd-vae-ft-ema")
    latents = jax.jit(lambda c, x: c.encode(x))(codec, frames)   # float[B H W 3] in [-1, 1]

Constructors:

* :func:`autoencoder_codec`: an :class:`AutoencoderKL` config and its parameters;
* :func:`from_workdir`: the parameters of a flipjax autoencoder training run
  (``flipjax.checkpoints.load_params``) and its architecture from
  ``<workdir>/autoencoder_config.json`` (:data:`AUTOENCODER_CONFIG_FILE`, the JSON of
  ``dataclasses.asdict(AutoencoderConfig)``, written by the autoencoder trainer when training
  starts) or from an explicit :class:`AutoencoderConfig`;
* :func:`from_diffusers_dir`: a local diffusers ``AutoencoderKL`` directory (``config.json`` and
  ``diffusion_pytorch_model.safetensors``), e.g. ``stabilityai/sd-vae-ft-ema``, the codec FLIP
  uses: 128x128 frames -> 16x16x4 latents;
* :func:`pixel_codec`: space-to-depth by a factor f with scale 1, the exact inverse as decoder.
  It is a stand-in **for smoke runs and tests only**, where no trained autoencoder exists: the
  "latents" are just rearranged pixels, so nothing is compressed or made Gaussian-friendly.

Latents follow the SD-VAE convention: ``(mean of the posterior - shift) * scale`` with scale
0.18215 for the SD VAEs. The posterior *mean* is used, not a posterior sample (the official
FLIP trainer samples): the SD-VAE's posterior standard deviation is tiny compared with the
latents, so sampling only adds a little noise, while a deterministic encoding gives one latent
per frame, so the history latents the planner conditions on are the ones the model saw in
training, the evaluation targets are fixed and a resumed run sees bit-identical inputs.

Flow conditioning (the DiT's flow units, the null condition) is in :mod:`flipjax.flow_conditioning`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from flipjax import shapes
from flipjax.models import autoencoder_json
from flipjax.typing import Array, PyTree

if TYPE_CHECKING:
    from flipjax.models.autoencoder import AutoencoderConfig

KINDS = ("autoencoder", "pixels")
SD_VAE_SCALE = 0.18215
# Written by the autoencoder trainer into its workdir (flipjax.models.autoencoder_json).
AUTOENCODER_CONFIG_FILE = autoencoder_json.CONFIG_FILE
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors",
                      "diffusion_pytorch_model.fp16.safetensors")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["params"],
                   meta_fields=["kind", "factor", "channels", "scale", "shift", "autoencoder"])
@dataclasses.dataclass(frozen=True)
class LatentCodec:
    """Frames float[B H W 3] in [-1, 1] <-> latents float[B h w C], h = H / factor.

    Attributes:
      kind: "autoencoder" (an :class:`AutoencoderKL`) or "pixels" (space-to-depth).
      factor: pixels per latent cell along each side.
      channels: latent channels C.
      scale: latents = (z - shift) * scale.
      shift: see ``scale`` (0 for the SD-1/2 VAEs and the pixel codec).
      autoencoder: the architecture, for kind "autoencoder"; None otherwise.
      params: the autoencoder's parameters (the only pytree leaves); None for "pixels".
    """

    kind: str
    factor: int
    channels: int
    scale: float = 1.0
    shift: float = 0.0
    autoencoder: AutoencoderConfig | None = None
    params: PyTree = None

    def __post_init__(self) -> None:
        # Only static fields are checked: JAX rebuilds codecs with placeholder leaves.
        if self.kind not in KINDS:
            raise ValueError(f"codec kind must be one of {KINDS}, got {self.kind!r}")
        if self.factor < 1 or self.channels < 1:
            raise ValueError(f"codec factor and channels must be >= 1, got {self.factor}, "
                             f"{self.channels}")
        if not self.scale > 0:
            raise ValueError(f"codec scale must be > 0, got {self.scale}")
        if (self.kind == "autoencoder") != (self.autoencoder is not None):
            raise ValueError("an autoencoder codec needs its AutoencoderConfig (and only it)")

    @property
    def image_channels(self) -> int:
        """Channels of the frames (3)."""
        if self.autoencoder is not None:
            return self.autoencoder.in_channels
        return self.channels // (self.factor * self.factor)

    def latent_shape(self, image_size: tuple[int, int]) -> tuple[int, int, int]:
        """(h, w, C) of the latents of ``image_size`` = (H, W) frames.

        Raises:
          ValueError: when H or W is not a multiple of the factor.
        """
        h, w = (int(s) for s in image_size)
        if h < 1 or w < 1 or h % self.factor or w % self.factor:
            raise ValueError(f"frames {h}x{w} do not fit the {self.kind} codec: height and "
                             f"width must be positive multiples of its factor {self.factor}")
        return h // self.factor, w // self.factor, self.channels

    def encode(self, frames: Array) -> Array:
        """Latents of frames.

        Args:
          frames: float[B H W 3] in [-1, 1]; H and W multiples of ``factor``.

        Returns:
          float32[B h w C].
        """
        shapes.check_images(frames, "frames", self.image_channels, self.factor)
        frames = frames.astype(jnp.float32)
        if self.kind == "pixels":
            b, hh, ww, c = frames.shape
            f = self.factor
            z = frames.reshape(b, hh // f, f, ww // f, f, c).transpose(0, 1, 3, 2, 4, 5)
            z = z.reshape(b, hh // f, ww // f, f * f * c)
        else:
            z, _ = _autoencoder_apply(self.autoencoder, self.params, frames, "encode")
        return ((z - self.shift) * self.scale).astype(jnp.float32)

    def decode(self, latents: Array) -> Array:
        """Frames of latents (the inverse of :meth:`encode`; exact for the pixel codec).

        Args:
          latents: float[B h w C].

        Returns:
          float32[B H W 3], nominally in [-1, 1] (not clipped).
        """
        shapes.check_images(latents, "latents", self.channels)
        z = latents.astype(jnp.float32) / self.scale + self.shift
        if self.kind == "pixels":
            b, h, w, _ = z.shape
            f, c = self.factor, self.image_channels
            x = z.reshape(b, h, w, f, f, c).transpose(0, 1, 3, 2, 4, 5)
            return x.reshape(b, h * f, w * f, c)
        return _autoencoder_apply(self.autoencoder, self.params, z, "decode")

    def encode_video(self, frames: Array) -> Array:
        """float[B T H W 3] in [-1, 1] -> float32[B T h w C], frame by frame."""
        if frames.ndim != 5:
            raise ValueError(f"frames must be [B T H W C], got shape {list(frames.shape)}")
        b, t = frames.shape[:2]
        z = self.encode(frames.reshape(b * t, *frames.shape[2:]))
        return z.reshape(b, t, *z.shape[1:])

    def decode_video(self, latents: Array) -> Array:
        """float[B T h w C] -> float32[B T H W 3], frame by frame."""
        if latents.ndim != 5:
            raise ValueError(f"latents must be [B T h w C], got shape {list(latents.shape)}")
        b, t = latents.shape[:2]
        x = self.decode(latents.reshape(b * t, *latents.shape[2:]))
        return x.reshape(b, t, *x.shape[1:])


def _autoencoder_apply(config: AutoencoderConfig, params: PyTree, x: Array, method: str) -> Any:
    # Imported here so that flax-free callers (the planner) can import this module.
    from flipjax.models.autoencoder import AutoencoderKL

    return AutoencoderKL(config).apply({"params": params}, x, method=method)


# ------------------------------------------------------------------------------------------
# Constructors
# ------------------------------------------------------------------------------------------


def pixel_codec(factor: int = 4, image_channels: int = 3, scale: float = 1.0) -> LatentCodec:
    """Space-to-depth "latents" for smoke runs and tests (no trained autoencoder needed).

    Args:
      factor: f; frames [B H W c] become [B H/f W/f f*f*c] (32x32x3 frames, f = 4: 8x8x48).
      image_channels: c.
      scale: multiplies the rearranged pixels (1 keeps them in [-1, 1]).

    Returns:
      The codec; its decoder is the exact inverse.
    """
    return LatentCodec("pixels", int(factor), int(factor) ** 2 * int(image_channels),
                       float(scale))


def _unwrap(params: PyTree) -> PyTree:
    import flax.linen as nn

    params = nn.meta.unbox(params)
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]
    return params


def _check_params(config: AutoencoderConfig, params: PyTree, source: str) -> None:
    """Raises ValueError naming every missing, unexpected or misshapen parameter."""
    from flax import traverse_util

    from flipjax.models.autoencoder import AutoencoderKL
    from flipjax.models.convert_sd_vae import expected_parameters

    expected = expected_parameters(AutoencoderKL(config))
    if not isinstance(params, Mapping):
        raise ValueError(f"autoencoder parameters from {source} must be a nested mapping, got "
                         f"{type(params).__name__}")
    got = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(dict(params)).items()}
    missing = sorted("/".join(k) for k in expected if k not in got)
    unexpected = sorted("/".join(k) for k in got if k not in expected)
    wrong = sorted(f"{'/'.join(k)} {list(got[k])} (expected {list(v)})"
                   for k, v in expected.items() if k in got and got[k] != v)
    if missing or unexpected or wrong:
        parts = [f"{title}: {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}"
                 for title, items in (("missing", missing), ("unexpected", unexpected),
                                      ("shape mismatch", wrong)) if items]
        raise ValueError(f"autoencoder parameters from {source} do not fit the config "
                         f"(block_out_channels {config.block_out_channels}, latent_channels "
                         f"{config.latent_channels}): " + "; ".join(parts))


def autoencoder_codec(config: AutoencoderConfig, params: PyTree,
                      scale: float | None = None) -> LatentCodec:
    """The codec of a KL autoencoder.

    Args:
      config: its architecture.
      params: its parameters (``{"params": tree}`` or the tree itself; boxed or plain).
      scale: latent scale; None takes ``config.scaling_factor`` (0.18215 for the SD VAEs).

    Returns:
      The codec (latents = (posterior mean - config.shift_factor) * scale).

    Raises:
      ValueError: when the parameters do not fit the config (every mismatch named).
    """
    params = _unwrap(params)
    _check_params(config, params, "the caller")
    return LatentCodec("autoencoder", config.downsample_factor, config.latent_channels,
                       float(config.scaling_factor if scale is None else scale),
                       float(config.shift_factor), config, jax.tree.map(jnp.asarray, params))


def from_workdir(workdir: str | Path, config: AutoencoderConfig | None = None, *,
                 ema: bool = False, step: int | None = None,
                 scale: float | None = None) -> LatentCodec:
    """The codec of a flipjax autoencoder training run.

    Args:
      workdir: the run directory (``workdir/checkpoints/<step>``).
      config: its architecture; None reads ``<workdir>/autoencoder_config.json``.
      ema: load the EMA parameters instead of the raw ones.
      step: checkpoint step; None: the latest.
      scale: latent scale; None: the config's ``scaling_factor``.

    Returns:
      The codec.

    Raises:
      FileNotFoundError: when the run has no checkpoint.
      ValueError: without a config and without the JSON file, or when the parameters do not
        fit the config.
    """
    from flipjax.checkpoints import load_params

    workdir = Path(workdir)
    if config is None:
        path = workdir / AUTOENCODER_CONFIG_FILE
        if not path.exists():
            raise ValueError(f"autoencoder run {workdir} has no {AUTOENCODER_CONFIG_FILE}; pass "
                             "its AutoencoderConfig explicitly")
        config = autoencoder_json.read(path)
    params = _unwrap(load_params(workdir, step=step, ema=ema))
    _check_params(config, params, f"run {workdir}")
    return autoencoder_codec(config, params, scale)


def from_diffusers_dir(directory: str | Path, *, scale: float | None = None,
                       **overrides: Any) -> LatentCodec:
    """The codec of a local diffusers ``AutoencoderKL`` (e.g. a copy of sd-vae-ft-ema).

    Args:
      directory: holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or a
        pipeline directory with them under ``vae/``). Nothing is downloaded.
      scale: latent scale; None: the config's ``scaling_factor`` (0.18215).
      **overrides: :class:`AutoencoderConfig` fields, e.g. ``dtype=jnp.bfloat16``.

    Returns:
      The codec.

    Raises:
      ValueError: a missing config or weights file, or weights that do not fit the config.
      ImportError: without the ``safetensors`` package.
    """
    from flipjax.models.convert_sd_vae import sd_vae_from_diffusers

    d = Path(directory)
    if not (d / "config.json").exists() and (d / "vae" / "config.json").exists():
        d = d / "vae"
    if not (d / "config.json").exists():
        raise ValueError(f"{directory} is not a diffusers AutoencoderKL directory: no config.json")
    weights = next((d / n for n in _DIFFUSERS_WEIGHTS if (d / n).exists()), None)
    if weights is None:
        raise ValueError(f"{d} has none of {list(_DIFFUSERS_WEIGHTS)}; torch .bin weights are "
                         "not read here: convert them to safetensors once")
    try:
        from safetensors.numpy import load_file
    except ImportError as e:
        raise ImportError("reading diffusers weights needs `pip install safetensors`") from e
    module, variables = sd_vae_from_diffusers(load_file(str(weights)),
                                              (d / "config.json").read_text(), **overrides)
    return autoencoder_codec(module.config, variables["params"], scale)


__all__ = [
    "AUTOENCODER_CONFIG_FILE",
    "KINDS",
    "SD_VAE_SCALE",
    "LatentCodec",
    "autoencoder_codec",
    "from_diffusers_dir",
    "from_workdir",
    "pixel_codec",
]
