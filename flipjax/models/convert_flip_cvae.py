"""Load an official FLIP ``ScaleDirectionCVAE`` state dict into :class:`FlowCVAE`.

Layout changes (torch -> flax):
  * ``nn.Linear`` weights are [out in]; Dense kernels are [in out] (transpose).
  * ``nn.MultiheadAttention.in_proj_weight`` [3D D] stacks q, k, v row blocks; each becomes a
    DenseGeneral kernel [D H K] (torch splits a projection's outputs head-major, h*K + k).
    ``out_proj.weight`` [D D] becomes [H K D].
  * The patch-embedding conv is OIHW over channels stacked ``(t c)``; the flax conv is HWIO
    over NHWC frames stacked in the same ``(t c)`` order, so only the axes move.
  * ``img_pos_embedding`` is a frozen sin-cos table in the official model; here it is a
    constant, so it is checked against ``sincos_2d`` instead of being loaded.
  * The language padding rule (a token whose features are all zero is padding) becomes the
    explicit ``text_mask`` of flipjax; :func:`official_text_mask` applies it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flipjax import shapes
from flipjax.models.flow_cvae import CVAEConfig, FlowCVAE
from flipjax.models.layers import sincos_2d
from flipjax.typing import Array

_LAYER_KEYS = ("self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight",
               "self_attn.out_proj.bias", "linear1.weight", "linear1.bias", "linear2.weight",
               "linear2.bias", "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")

# torch prefix of a plain Linear -> flax module name.
_LINEARS = {
    "language_encoder": "language_encoder",
    "vision_decoder": "vision_decoder",
    "query_point_encoder": "query_point_encoder",
    "flow_encoder": "flow_encoder",
    "flow_decoder": "flow_decoder",
    "z_mu": "z_mu",
    "z_logvar": "z_logvar",
    "scale_head.0": "scale_head",
    "direction_head": "direction_head",
}


def config_from_official(config: Mapping[str, Any]) -> CVAEConfig:
    """CVAEConfig from the official constructor arguments.

    Args:
      config: ``hidden_size``, ``vae_encoder_layers``, ``vae_decoder_layers``, ``num_heads``,
        ``flow_horizon``, ``obs_history``, ``img_size`` (int or [H, W]), ``img_patch_size`` and
        optionally ``language_original_dim`` (default 4096).

    Returns:
      The equivalent :class:`CVAEConfig`.
    """
    required = ("hidden_size", "vae_encoder_layers", "vae_decoder_layers", "num_heads",
                "flow_horizon", "obs_history", "img_size", "img_patch_size")
    missing = [k for k in required if k not in config]
    if missing:
        raise ValueError(f"official CVAE config lacks {missing}")
    size = config["img_size"]
    img_size = (int(size), int(size)) if np.ndim(size) == 0 else tuple(int(s) for s in size)
    if len(img_size) != 2:
        raise ValueError(f"img_size must be an int or [H, W], got {size!r}")
    cfg = CVAEConfig(
        hidden=int(config["hidden_size"]), encoder_layers=int(config["vae_encoder_layers"]),
        decoder_layers=int(config["vae_decoder_layers"]), num_heads=int(config["num_heads"]),
        flow_horizon=int(config["flow_horizon"]), history=int(config["obs_history"]),
        img_size=img_size, patch=int(config["img_patch_size"]),
        language_dim=int(config.get("language_original_dim", 4096)))
    cfg.validate()
    return cfg


def official_shapes(cfg: CVAEConfig) -> dict[str, tuple[int, ...]]:
    """Every key of the official state dict with its shape, for a given config."""
    d, lh, t, p = cfg.hidden, cfg.flow_horizon, cfg.history, cfg.patch
    out: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, d),
        "img_pos_embedding": (1, cfg.num_patches, d),
        "vision_encoder.proj.weight": (d, 3 * t, p, p),
        "vision_encoder.proj.bias": (d,),
    }
    linears = {"language_encoder": (d, cfg.language_dim),
               "vision_decoder": (3 * t * p * p, d), "query_point_encoder": (d, 2),
               "flow_encoder": (d, 2 * lh), "flow_decoder": (2 * lh, d), "z_mu": (d, d),
               "z_logvar": (d, d), "scale_head.0": (lh, d), "direction_head": (2 * lh, d)}
    for name, shape in linears.items():
        out[f"{name}.weight"] = shape
        out[f"{name}.bias"] = shape[:1]
    layer = dict(zip(_LAYER_KEYS, [(3 * d, d), (3 * d,), (d, d), (d,), (d, d), (d,), (d, d),
                                   (d,), (d,), (d,), (d,), (d,)], strict=True))
    for stack, n in (("cvae_encoder", cfg.encoder_layers), ("cvae_decoder", cfg.decoder_layers)):
        for i in range(n):
            out.update({f"{stack}.layers.{i}.{k}": s for k, s in layer.items()})
    return out


def _check_state_dict(sd: dict[str, np.ndarray], cfg: CVAEConfig) -> None:
    want = official_shapes(cfg)
    problems = []
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    bad = [f"{k}: {list(sd[k].shape)} != expected {list(s)}" for k, s in want.items()
           if k in sd and tuple(sd[k].shape) != s]
    if bad:
        problems.append("mis-shaped " + "; ".join(bad))
    if problems:
        raise ValueError("state dict does not match the official ScaleDirectionCVAE for "
                         f"{cfg}: " + " | ".join(problems))
    table = sincos_2d(cfg.hidden, *cfg.grid)
    err = float(np.max(np.abs(sd["img_pos_embedding"][0] - table)))
    if err > 1e-4:
        raise ValueError(f"img_pos_embedding differs from the 2-D sin-cos table by {err:.3g}; "
                         "this model uses a fixed table and cannot load a learned one")


def _linear(sd: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {"kernel": sd[f"{prefix}.weight"].T, "bias": sd[f"{prefix}.bias"]}


def _layer(sd: dict[str, np.ndarray], prefix: str, heads: int) -> dict[str, Any]:
    w = sd[f"{prefix}.self_attn.in_proj_weight"]
    b = sd[f"{prefix}.self_attn.in_proj_bias"]
    d = w.shape[1]
    k = d // heads
    attn = {}
    for j, name in enumerate(("query", "key", "value")):
        attn[name] = {"kernel": w[j * d:(j + 1) * d].T.reshape(d, heads, k),
                      "bias": b[j * d:(j + 1) * d].reshape(heads, k)}
    attn["out"] = {"kernel": sd[f"{prefix}.self_attn.out_proj.weight"].T.reshape(heads, k, d),
                   "bias": sd[f"{prefix}.self_attn.out_proj.bias"]}
    return {
        "attn": attn,
        "norm1": {"scale": sd[f"{prefix}.norm1.weight"], "bias": sd[f"{prefix}.norm1.bias"]},
        "mlp": {"fc1": _linear(sd, f"{prefix}.linear1"), "fc2": _linear(sd, f"{prefix}.linear2")},
        "norm2": {"scale": sd[f"{prefix}.norm2.weight"], "bias": sd[f"{prefix}.norm2.bias"]},
    }


def flip_cvae_from_torch(state_dict: Mapping[str, Any],
                         config: Mapping[str, Any]) -> tuple[FlowCVAE, dict[str, Any]]:
    """Builds a :class:`FlowCVAE` and its variables from an official checkpoint.

    Args:
      state_dict: torch parameter name -> array (numpy, or anything ``np.asarray`` accepts);
        a DDP ``module.`` prefix on every key is stripped.
      config: official constructor arguments (see :func:`config_from_official`).

    Returns:
      (module, variables) with float32 ``{"params": ...}`` (plain arrays, no partitioning
      metadata).

    Raises:
      ValueError: on missing, unexpected or mis-shaped keys, or a non sin-cos position table.
    """
    cfg = config_from_official(config)
    sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    _check_state_dict(sd, cfg)

    params: dict[str, Any] = {name: _linear(sd, prefix) for prefix, name in _LINEARS.items()}
    params["cls_token"] = sd["cls_token"].reshape(cfg.hidden)
    params["vision_encoder"] = {"proj": {
        "kernel": sd["vision_encoder.proj.weight"].transpose(2, 3, 1, 0),
        "bias": sd["vision_encoder.proj.bias"]}}
    for i in range(cfg.encoder_layers):
        params[f"encoder_{i}"] = _layer(sd, f"cvae_encoder.layers.{i}", cfg.num_heads)
    for i in range(cfg.decoder_layers):
        params[f"decoder_{i}"] = _layer(sd, f"cvae_decoder.layers.{i}", cfg.num_heads)

    module = FlowCVAE(cfg)
    _check_against_module(module, params)
    return module, {"params": jax.tree_util.tree_map(jnp.asarray, params)}


def _check_against_module(module: FlowCVAE, params: dict[str, Any]) -> None:
    """Guards the mapping itself: the converted tree must equal the module's own tree."""
    c = module.config
    b, n = 1, 1
    args = (jnp.zeros((b, n, c.flow_horizon, 2)),
            jnp.zeros((b, c.history, *c.img_size, 3)), jnp.zeros((b, 1, c.language_dim)))
    ref = jax.eval_shape(lambda: nn.meta.unbox(module.init(
        {"params": jax.random.PRNGKey(0), "latent": jax.random.PRNGKey(0)}, *args)))["params"]
    got = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params)
    want = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), ref)
    if jax.tree_util.tree_structure(got) != jax.tree_util.tree_structure(want) or any(
            a.shape != w.shape for a, w in zip(jax.tree_util.tree_leaves(got),
                                               jax.tree_util.tree_leaves(want), strict=True)):
        raise ValueError("internal: converted parameter tree does not match FlowCVAE's")


def official_text_mask(sentence: Array) -> Array:
    """bool[B Lt] valid tokens under the official rule: a token of all-zero features is
    padding (``torch.all(sentence == 0, dim=-1)`` is the official key padding mask)."""
    return ~jnp.all(jnp.asarray(sentence) == 0, axis=-1)


def _nhwc(obs_history_nchw: Array) -> Array:
    shapes.check(obs_history_nchw, "obs_history_nchw", "B T 3 H W")
    return jnp.transpose(jnp.asarray(obs_history_nchw, jnp.float32), (0, 1, 3, 4, 2))


def flip_cvae_encode(module: FlowCVAE, variables: dict[str, Any], gt_flow: Array,
                     obs_history_nchw: Array, sentence: Array) -> dict[str, Array]:
    """The official ``forward``'s encoder half, with official input layouts.

    Args:
      module, variables: from :func:`flip_cvae_from_torch`.
      gt_flow: float[B N L 2] trajectories.
      obs_history_nchw: float[B T 3 H W] frames (official layout).
      sentence: float[B Lt Dl] sentence features; all-zero tokens are padding.

    Returns:
      dict z_mu float[B D], z_logvar float[B D], img_output float[B P (p q T 3)],
      flow_output float[B N L 2].
    """
    return _encode(module, variables, jnp.asarray(gt_flow, jnp.float32),
                   _nhwc(obs_history_nchw), jnp.asarray(sentence, jnp.float32))


def flip_cvae_decode(module: FlowCVAE, variables: dict[str, Any], query_points: Array,
                     obs_history_nchw: Array, sentence: Array, z: Array) -> dict[str, Array]:
    """The official ``inference`` plus ``reconstruct_flow``, with official input layouts.

    Args:
      module, variables: from :func:`flip_cvae_from_torch`.
      query_points: float[B N 2] start points.
      obs_history_nchw: float[B T 3 H W] frames (official layout).
      sentence: float[B Lt Dl] sentence features; all-zero tokens are padding.
      z: float[B D] latent.

    Returns:
      dict scale float[B N L-1 1], direction float[B N L-1 2], flow float[B N L 2].
    """
    return _decode(module, variables, jnp.asarray(query_points, jnp.float32),
                   _nhwc(obs_history_nchw), jnp.asarray(sentence, jnp.float32),
                   jnp.asarray(z, jnp.float32))


# Modules are hashable dataclasses, so they can be static jit arguments (one trace per config).
@functools.partial(jax.jit, static_argnums=0)
def _encode(module: FlowCVAE, variables: dict[str, Any], flow: Array, history: Array,
            sentence: Array) -> dict[str, Array]:
    return module.apply(variables, flow, history, sentence, official_text_mask(sentence),
                        method=FlowCVAE.encode)


@functools.partial(jax.jit, static_argnums=0)
def _decode(module: FlowCVAE, variables: dict[str, Any], query_points: Array, history: Array,
            sentence: Array, z: Array) -> dict[str, Array]:
    return module.apply(variables, query_points, history, sentence,
                        official_text_mask(sentence), z, method=FlowCVAE.decode)
