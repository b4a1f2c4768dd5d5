"""Loads diffusers ``AutoencoderKL`` weights (e.g. ``stabilityai/sd-vae-ft-ema``) into
:class:`flipjax.models.autoencoder.AutoencoderKL`, and NCHW adapters for parity checks.

Our parameter tree mirrors diffusers' module tree, so the mapping is by name: list indices
join their parent (``down_blocks.0`` -> ``down_blocks_0``, ``to_out.0`` -> ``to_out_0``),
``weight`` becomes ``kernel`` (convs OIHW -> HWIO, linears [out in] -> [in out]) or ``scale``
(GroupNorm), ``bias`` stays ``bias``. The expected tree comes from ``jax.eval_shape`` of the
module's init, so any consistent config converts and every missing, unexpected or misshapen
entry is reported at once.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from flipjax.models.autoencoder import AutoencoderConfig, AutoencoderKL

Array = jax.Array

# Attention parameter names of diffusers < 0.15 checkpoints (AttentionBlock).
_LEGACY_ATTENTION = {"query": ("to_q",), "key": ("to_k",), "value": ("to_v",),
                     "proj_attn": ("to_out", "0")}

_MAX_LISTED = 25


def _our_path(name: str) -> tuple[tuple[str, ...], str]:
    """diffusers parameter name -> (our module path, diffusers leaf name)."""
    *mods, leaf = name.split(".")
    parts: list[str] = []
    for p in mods:
        in_attention = bool(parts) and parts[-1].startswith("attentions_")
        for q in (_LEGACY_ATTENTION.get(p, (p,)) if in_attention else (p,)):
            if q.isdigit() and parts:
                parts[-1] = f"{parts[-1]}_{q}"
            else:
                parts.append(q)
    return tuple(parts), leaf


def _diffusers_name(path: tuple[str, ...]) -> str:
    """Our parameter path -> the current diffusers name (for error messages)."""
    *mods, leaf = path
    out = []
    for p in mods:
        m = re.fullmatch(r"(.+)_(\d+)", p)
        out.extend(m.groups() if m else (p,))
    return ".".join([*out, "weight" if leaf in ("kernel", "scale") else leaf])


def _to_kernel(w: np.ndarray, target_ndim: int) -> np.ndarray:
    """torch weight -> our kernel layout (conv OIHW -> HWIO, linear [out in] -> [in out])."""
    if target_ndim == 4 and w.ndim == 4:
        return w.transpose(2, 3, 1, 0)
    if target_ndim == 2 and w.ndim == 4 and w.shape[2:] == (1, 1):
        w = w[:, :, 0, 0]  # the original LDM checkpoints store attention as 1x1 convs
    if target_ndim == 2 and w.ndim == 2:
        return w.T
    return w  # left for the shape check to report


def expected_parameters(module: AutoencoderKL) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat {path: shape} of the module's parameters (abstract: nothing is allocated)."""
    cfg = module.config
    f = cfg.downsample_factor
    x = jax.ShapeDtypeStruct((1, f, f, cfg.in_channels), jnp.float32)
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)
    flat = traverse_util.flatten_dict(nn.meta.unbox(shapes)["params"])
    return {k: tuple(v.shape) for k, v in flat.items()}


def _listing(title: str, items: list[str]) -> str:
    shown = "\n    ".join(items[:_MAX_LISTED])
    more = f"\n    ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"  {title} ({len(items)}):\n    {shown}{more}"


def sd_vae_from_diffusers(state_dict: Mapping[str, Any], config: Mapping[str, Any] | str,
                          **overrides: Any) -> tuple[AutoencoderKL, dict[str, Any]]:
    """Builds our autoencoder and its variables from a diffusers ``AutoencoderKL``.

    Args:
      state_dict: diffusers parameter name -> array (``vae.state_dict()`` converted to numpy;
        the legacy attention names ``query/key/value/proj_attn`` are accepted too).
      config: the diffusers config dict (``vae.config``) or its JSON text.
      **overrides: :class:`AutoencoderConfig` fields to change, e.g. ``dtype=jnp.bfloat16``
        or ``remat=True`` (the weights stay float32).

    Returns:
      (module, variables) with ``variables = {"params": ...}`` of float32 arrays, ready for
      ``module.apply(variables, x_nhwc, method=AutoencoderKL.encode)``.

    Raises:
      ValueError: listing every missing, unexpected, duplicated or misshapen parameter.
    """
    module = AutoencoderKL(AutoencoderConfig.from_diffusers(config, **overrides))
    expected = expected_parameters(module)
    params: dict[tuple[str, ...], np.ndarray] = {}
    unexpected, mismatched, duplicated = [], [], []
    for name, value in state_dict.items():
        w = np.asarray(value, dtype=np.float32)
        path, leaf = _our_path(name)
        if leaf == "bias":
            target = (*path, "bias")
        elif leaf == "weight":
            target = (*path, "scale") if (*path, "scale") in expected else (*path, "kernel")
        else:
            target = None
        if target not in expected:
            unexpected.append(f"{name} {list(w.shape)}")
            continue
        if target[-1] == "kernel":
            w = _to_kernel(w, len(expected[target]))
        if w.shape != expected[target]:
            want = expected[target]
            if target[-1] == "kernel" and len(want) == 4:
                want = (want[3], want[2], want[0], want[1])  # report in torch's OIHW
            elif target[-1] == "kernel":
                want = want[::-1]
            mismatched.append(f"{name}: got {list(np.shape(value))}, expected {list(want)}")
            continue
        if target in params:
            duplicated.append(f"{name} (same parameter as an earlier key)")
            continue
        params[target] = w
    missing = [f"{_diffusers_name(k)} {list(v)}" for k, v in expected.items() if k not in params]
    if missing or unexpected or mismatched or duplicated:
        parts = [_listing(t, sorted(v)) for t, v in (
            ("missing", missing), ("unexpected", unexpected),
            ("shape mismatch", mismatched), ("duplicated", duplicated)) if v]
        raise ValueError("diffusers AutoencoderKL state dict does not fit the config "
                         f"{module.config.block_out_channels}:\n" + "\n".join(parts))
    tree = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in params.items()})
    return module, {"params": tree}


def sd_vae_to_diffusers(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Inverse of :func:`sd_vae_from_diffusers`: our variables -> a diffusers state dict.

    Args:
      variables: ``{"params": ...}`` of an :class:`AutoencoderKL` (boxed or plain arrays).

    Returns:
      diffusers parameter name -> float32 numpy array in torch layout (current names).
    """
    flat = traverse_util.flatten_dict(nn.meta.unbox(variables["params"]))
    out = {}
    for path, value in flat.items():
        w = np.asarray(value, dtype=np.float32)
        if path[-1] == "kernel":
            w = w.transpose(3, 2, 0, 1) if w.ndim == 4 else w.T
        # Contiguous copies: safetensors writes an array's raw buffer, so a transposed view
        # would be saved untransposed.
        out[_diffusers_name(path)] = np.ascontiguousarray(w)
    return out


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply(config: AutoencoderConfig, method: str, variables: Any, x: Array) -> Any:
    return AutoencoderKL(config).apply(variables, x, method=method)


def _nhwc(x: Any, what: str) -> Array:
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"{what} must be [B C H W] (NCHW), got shape {list(x.shape)}")
    return x.transpose(0, 2, 3, 1)


def sd_vae_encode(module: AutoencoderKL, variables: Any, x_nchw: Any) -> tuple[Array, Array]:
    """diffusers-layout encode: ``vae.encode(x).latent_dist.{mean, logvar}``.

    Args:
      module, variables: from :func:`sd_vae_from_diffusers`.
      x_nchw: float[B in_channels H W] in [-1, 1].

    Returns:
      (mean, logvar), each float32[B latent_channels h w].
    """
    mean, logvar = _apply(module.config, "encode", variables, _nhwc(x_nchw, "images"))
    return mean.transpose(0, 3, 1, 2), logvar.transpose(0, 3, 1, 2)


def sd_vae_decode(module: AutoencoderKL, variables: Any, z_nchw: Any) -> Array:
    """diffusers-layout decode: ``vae.decode(z).sample`` for unscaled latents.

    Args:
      module, variables: from :func:`sd_vae_from_diffusers`.
      z_nchw: float[B latent_channels h w].

    Returns:
      float32[B out_channels H W].
    """
    return _apply(module.config, "decode", variables,
                  _nhwc(z_nchw, "latents")).transpose(0, 3, 1, 2)
