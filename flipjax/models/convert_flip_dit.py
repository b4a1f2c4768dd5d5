"""Load the official FLIP ``DynamicsModel`` (PyTorch) into :class:`VideoDiT`, and run it in the
official layout.

``flip_dit_from_torch(state_dict, config)`` takes the checkpoint as numpy arrays keyed by torch
names and the official constructor arguments; it splits timm's fused qkv ``[3D D]`` and torch
``MultiheadAttention.in_proj`` into separate q/k/v projections, transposes Linear weights and
turns conv OIHW kernels into HWIO. The fixed ``pos_embed``/``temp_embed`` buffers are not
parameters here (the module rebuilds them), so they are only checked against the tables.

``flip_dit_apply`` and ``flip_dit_loss`` take and return tensors in the official layout
(``[B T C H W]`` latents, all-zero language rows as padding) so checkpoints and golden files can
be compared directly; the loss is :func:`flipjax.models.diffusion.model_losses` (IDDPM learned
range, 1000 linear betas, history frames clean and excluded) around one
:meth:`VideoDiT.encode_conditions` and :meth:`VideoDiT.denoise`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from flipjax.models import diffusion
from flipjax.models.layers import sincos_1d, sincos_2d
from flipjax.models.video_dit import VideoDiT

Array = jax.Array

_CONFIG_KEYS = {
    "input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads",
    "learn_sigma", "flow_horizon", "obs_history", "mlp_ratio", "language_dim",
    "language_layers", "language_heads", "language_ff",
}
_REQUIRED = ("input_size", "hidden_size", "depth", "num_heads")


def module_from_config(config: dict[str, Any], **overrides: Any) -> VideoDiT:
    """A :class:`VideoDiT` from the official ``DynamicsModel`` constructor arguments.

    Args:
      config: ``input_size`` (int or (h, w), latent size), ``patch_size`` (2), ``in_channels``
        (4), ``hidden_size``, ``depth``, ``num_heads``, ``learn_sigma`` (True),
        ``flow_horizon`` (16), ``obs_history`` (4), ``mlp_ratio`` (4.0) and the sentence
        encoder's ``language_dim`` (4096), ``language_layers`` (3), ``language_heads`` (8),
        ``language_ff`` (hidden_size).
      overrides: VideoDiT fields such as ``dtype`` or ``remat``.

    Returns:
      The (unbound) module.
    """
    unknown = set(config) - _CONFIG_KEYS
    missing = [k for k in _REQUIRED if k not in config]
    if unknown or missing:
        raise ValueError(f"bad DynamicsModel config: unknown keys {sorted(unknown)}, "
                         f"missing keys {missing}")
    size = config["input_size"]
    size = (int(size), int(size)) if np.isscalar(size) else tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f"input_size must be an int or (h, w), got {config['input_size']}")
    return VideoDiT(
        hidden=int(config["hidden_size"]), depth=int(config["depth"]),
        num_heads=int(config["num_heads"]), mlp_ratio=float(config.get("mlp_ratio", 4.0)),
        patch=int(config.get("patch_size", 2)), in_channels=int(config.get("in_channels", 4)),
        latent_size=size, flow_horizon=int(config.get("flow_horizon", 16)),
        history=int(config.get("obs_history", 4)),
        learn_sigma=bool(config.get("learn_sigma", True)),
        text_dim=int(config.get("language_dim", 4096)),
        text_layers=int(config.get("language_layers", 3)),
        text_heads=int(config.get("language_heads", 8)),
        text_ff=config.get("language_ff"), **overrides)


def abstract_variables(module: VideoDiT, batch: int = 1, points: int = 1,
                       text_len: int = 1) -> dict:
    """Shapes (``jax.ShapeDtypeStruct``, logically boxed) of ``module.init``'s variables."""
    h, w = module.latent_size
    args = (jnp.zeros((batch, module.num_frames, h, w, module.in_channels)),
            jnp.zeros((batch,), jnp.int32),
            jnp.zeros((batch, points, module.flow_horizon, 2)),
            jnp.zeros((batch, text_len, module.text_dim)),
            jnp.ones((batch, text_len), bool))
    return jax.eval_shape(module.init, jax.random.PRNGKey(0), *args)


# ------------------------------------------------------------------------------------------
# Name and layout mapping
# ------------------------------------------------------------------------------------------

# One rule: torch key -> (torch shape from the flax leaf shapes, flax leaves from the tensor).
_Rule = tuple[str, tuple[str, ...], Callable[[list[tuple]], tuple],
              Callable[[np.ndarray, list[tuple]], list[np.ndarray]]]


def _linear(tk: str, path: str) -> Iterator[_Rule]:
    yield (tk + ".weight", (path + "/kernel",), lambda s: s[0][::-1], lambda a, s: [a.T])
    yield (tk + ".bias", (path + "/bias",), lambda s: s[0], lambda a, s: [a])


def _norm(tk: str, path: str) -> Iterator[_Rule]:
    yield (tk + ".weight", (path + "/scale",), lambda s: s[0], lambda a, s: [a])
    yield (tk + ".bias", (path + "/bias",), lambda s: s[0], lambda a, s: [a])


def _fused_qkv(weight: str, bias: str, path: str) -> Iterator[_Rule]:
    """timm ``qkv`` / torch ``in_proj``: rows are [q; k; v], each [H*K, D]."""
    names = [f"{path}/{p}" for p in ("query", "key", "value")]

    def w_shape(s: list[tuple]) -> tuple:
        d, h, k = s[0]
        return (3 * h * k, d)

    def w_conv(a: np.ndarray, s: list[tuple]) -> list[np.ndarray]:
        return [part.T.reshape(s[0]) for part in np.split(a, 3, axis=0)]

    yield (weight, tuple(n + "/kernel" for n in names), w_shape, w_conv)
    yield (bias, tuple(n + "/bias" for n in names), lambda s: (3 * math.prod(s[0]),),
           lambda a, s: [part.reshape(s[0]) for part in np.split(a, 3)])


def _out_proj(tk: str, path: str) -> Iterator[_Rule]:
    yield (tk + ".weight", (path + "/kernel",), lambda s: (s[0][2], s[0][0] * s[0][1]),
           lambda a, s: [a.T.reshape(s[0])])
    yield (tk + ".bias", (path + "/bias",), lambda s: s[0], lambda a, s: [a])


def _rules(module: VideoDiT) -> Iterator[_Rule]:
    le = "language_encoder"
    yield (f"{le}.cls_token", (f"{le}/cls_token",), lambda s: s[0], lambda a, s: [a])
    yield from _linear(f"{le}.compress_fn", f"{le}/compress_fn")
    for i in range(module.text_layers):
        tk, fk = f"{le}.transformer.layers.{i}", f"{le}/layers_{i}"
        yield from _fused_qkv(f"{tk}.self_attn.in_proj_weight", f"{tk}.self_attn.in_proj_bias",
                              f"{fk}/attn")
        yield from _out_proj(f"{tk}.self_attn.out_proj", f"{fk}/attn/out")
        yield from _linear(f"{tk}.linear1", f"{fk}/mlp/fc1")
        yield from _linear(f"{tk}.linear2", f"{fk}/mlp/fc2")
        yield from _norm(f"{tk}.norm1", f"{fk}/norm1")
        yield from _norm(f"{tk}.norm2", f"{fk}/norm2")
    yield from _linear(f"{le}.output_head", f"{le}/output_head")
    yield ("x_embedder.proj.weight", ("x_embedder/proj/kernel",),
           lambda s: (s[0][3], s[0][2], s[0][0], s[0][1]),
           lambda a, s: [a.transpose(2, 3, 1, 0)])
    yield ("x_embedder.proj.bias", ("x_embedder/proj/bias",), lambda s: s[0], lambda a, s: [a])
    yield from _linear("t_embedder.mlp.0", "t_embedder/fc1")
    yield from _linear("t_embedder.mlp.2", "t_embedder/fc2")
    for j, name in enumerate(("fc1", "fc2", "fc3")):
        yield from _linear(f"flow_embedder.{2 * j}", f"flow_embedder/{name}")
    for i in range(module.depth):
        tk, fk = f"blocks.{i}", f"blocks_{i}"
        for att in ("self_attn", "cross_attn"):
            yield from _fused_qkv(f"{tk}.{att}.qkv.weight", f"{tk}.{att}.qkv.bias",
                                  f"{fk}/{att}")
            yield from _out_proj(f"{tk}.{att}.proj", f"{fk}/{att}/out")
        yield from _linear(f"{tk}.mlp.fc1", f"{fk}/mlp/fc1")
        yield from _linear(f"{tk}.mlp.fc2", f"{fk}/mlp/fc2")
        yield from _linear(f"{tk}.adaLN_modulation.1", f"{fk}/adaLN_modulation")
    yield from _linear("final_layer.linear", "final_layer/linear")
    yield from _linear("final_layer.adaLN_modulation.1", "final_layer/adaLN_modulation")


def _check_buffers(state_dict: dict[str, np.ndarray], module: VideoDiT) -> None:
    """The official sin-cos buffers must be the tables the module rebuilds."""
    hp, wp = (s // module.patch for s in module.latent_size)
    tables = {"pos_embed": sincos_2d(module.hidden, hp, wp)[None],
              "temp_embed": sincos_1d(module.hidden, np.arange(module.num_frames))[None]}
    for name, table in tables.items():
        if name not in state_dict:
            continue  # non-persistent in some exports; nothing to check
        got = np.asarray(state_dict[name])
        if got.shape != table.shape:
            raise ValueError(f"{name} has shape {got.shape}, the config implies {table.shape} "
                             "(check input_size, patch_size, obs_history and flow_horizon)")
        if not np.allclose(got, table, atol=1e-4):
            raise ValueError(f"{name} differs from the fixed sin-cos table this module uses")


def flip_dit_from_torch(state_dict: dict[str, np.ndarray], config: dict[str, Any],
                        **overrides: Any) -> tuple[VideoDiT, dict]:
    """Converts an official ``DynamicsModel`` state dict.

    Args:
      state_dict: torch parameter name -> array (``{k: v.numpy() for k, v in sd.items()}``).
      config: the official constructor arguments (see :func:`module_from_config`).
      overrides: VideoDiT fields such as ``dtype`` or ``remat``.

    Returns:
      (module, variables) with ``variables = {"params": ...}`` logically boxed like
      ``module.init``'s.

    Raises:
      ValueError: missing, unexpected or mis-shaped keys, or buffers that disagree.
    """
    module = module_from_config(config, **overrides)
    abstract = abstract_variables(module)["params"]
    flat = traverse_util.flatten_dict(abstract, sep="/",
                                      is_leaf=lambda _, x: isinstance(x, nn.meta.AxisMetadata))

    def leaf_shape(path: str) -> tuple:
        leaf = flat[path]
        return tuple((leaf.unbox() if isinstance(leaf, nn.meta.AxisMetadata) else leaf).shape)

    rules = list(_rules(module))
    expected = {r[0] for r in rules}
    buffers = {"pos_embed", "temp_embed"}
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected - buffers)
    if missing or unexpected:
        raise ValueError(f"state dict does not match the config: missing {missing[:20]}"
                         f"{' ...' if len(missing) > 20 else ''}, unexpected "
                         f"{unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
    _check_buffers(state_dict, module)

    values: dict[str, np.ndarray] = {}
    bad = []
    for tk, paths, torch_shape, convert in rules:
        shapes = [leaf_shape(p) for p in paths]
        arr = np.asarray(state_dict[tk], np.float32)
        want = tuple(torch_shape(shapes))
        if arr.shape != want:
            bad.append(f"{tk}: {arr.shape} != {want}")
            continue
        values.update(zip(paths, convert(arr, shapes), strict=True))
    if bad:
        raise ValueError("mis-shaped parameters for this config: " + "; ".join(bad[:20]))
    if set(values) != set(flat):  # a mapping bug rather than a user error
        raise ValueError(f"unmapped flax parameters: {sorted(set(flat) - set(values))}")

    def fill(path: str, leaf: Any) -> Any:
        arr = jnp.asarray(values[path])
        return leaf.replace_boxed(arr) if isinstance(leaf, nn.meta.AxisMetadata) else arr

    params = traverse_util.unflatten_dict({p: fill(p, leaf) for p, leaf in flat.items()},
                                          sep="/")
    return module, {"params": params}


# ------------------------------------------------------------------------------------------
# Official-layout apply and training loss
# ------------------------------------------------------------------------------------------


def _text_mask(sentence: Array) -> Array:
    """bool[B Lt]: official padding is an all-zero language row."""
    return jnp.any(sentence != 0, axis=-1)


def flip_dit_apply(module: VideoDiT, variables: dict, x_btchw: Array, t: Array, flow: Array,
                   sentence: Array) -> Array:
    """The official forward: float[B T C H W] latents -> float32[B T out_channels H W].

    Args:
      module, variables: from :func:`flip_dit_from_torch` (or ``module.init``).
      x_btchw: latents, history frames first.
      t: int[B] timesteps.
      flow: float[B N Lf 2].
      sentence: float[B Lt Dl] language features; all-zero rows are padding.

    Returns:
      The official output layout.
    """
    if x_btchw.ndim != 5:
        raise ValueError(f"x must be [B T C H W], got {x_btchw.shape}")
    x = jnp.transpose(jnp.asarray(x_btchw), (0, 1, 3, 4, 2))
    sentence = jnp.asarray(sentence)
    y = module.apply(variables, x, jnp.asarray(t), jnp.asarray(flow), sentence,
                     _text_mask(sentence))
    return jnp.transpose(y, (0, 1, 4, 2, 3))


def flip_dit_loss(module: VideoDiT, variables: dict, x_btchw: Array, t: Array, flow: Array,
                  sentence: Array, noise: Array, history_len: int) -> dict[str, Array]:
    """The official training loss per sample: history frames clean and excluded.

    Args:
      module, variables: the model.
      x_btchw: float[B T C H W] clean latents x_0.
      t: int[B] timesteps in [0, 1000).
      flow, sentence: conditions as in :func:`flip_dit_apply`.
      noise: float[B T C H W]; its history frames are ignored.
      history_len: number of clean leading frames.

    Returns:
      ``mse``, ``vb``, ``loss`` float32[B] (``vb`` is zero without ``learn_sigma``), from
      :func:`flipjax.models.diffusion.model_losses` (1000 linear-beta steps, learned range).
    """
    x0 = jnp.transpose(jnp.asarray(x_btchw, jnp.float32), (0, 1, 3, 4, 2))
    eps = jnp.transpose(jnp.asarray(noise, jnp.float32), (0, 1, 3, 4, 2))
    if x0.shape != eps.shape:
        raise ValueError(f"noise {noise.shape} does not match x {x_btchw.shape}")
    sentence = jnp.asarray(sentence)
    cond = module.apply(variables, jnp.asarray(flow), sentence, _text_mask(sentence),
                        method=VideoDiT.encode_conditions)

    def model_fn(x_t: Array, steps: Array) -> Array:
        return module.apply(variables, x_t, steps, cond, method=VideoDiT.denoise)

    return diffusion.model_losses(model_fn, diffusion.linear_schedule(1000), x0, jnp.asarray(t),
                                  eps, history=history_len, learned_range=module.learn_sigma)
