"""``benchmarks.pod``'s train-step compile: the trainer's own step, state and batch, abstract,
for a TPU slice (see ``benchmarks/pod.py``)."""

from __future__ import annotations

import time
from typing import Any

from benchmarks.pod_topology import (
    collectives,
    compiled_figures,
    out_of_memory,
    parse_slice,
    slice_mesh,
    topology_devices,
)

TRAINERS = ("cvae", "dit")
DEFAULT_POINTS = 23 * 23


def shape_codec(config: Any) -> Any:
    """The config's frame codec with abstract parameters (only its shapes are needed: the
    training batch holds latents, and no weights are read)."""
    import jax

    from flipjax import builders
    from flipjax import codec as codec_lib
    from flipjax.models.autoencoder import AutoencoderConfig, AutoencoderKL

    if builders.codec_kind(config) == "pixels":
        return codec_lib.pixel_codec(int(config.codec.factor))
    ae = AutoencoderConfig.variant("sd-vae-ft-ema")  # the official DiT's codec
    params = jax.eval_shape(
        lambda k: AutoencoderKL(ae).init(k, jax.numpy.zeros((1, 64, 64, 3)))["params"],
        jax.random.key(0))
    return codec_lib.LatentCodec("autoencoder", ae.downsample_factor, ae.latent_channels,
                                 codec_lib.SD_VAE_SCALE, 0.0, ae, params)


def step_parts(config: Any, batch: int, text_tokens: int, points: int) -> dict[str, Any]:
    """The trainer's init_fn, loss_fn and an abstract global batch of ``batch`` samples.

    Raises:
      ValueError: a trainer other than those in ``TRAINERS``.
    """
    import jax
    import jax.numpy as jnp

    from flipjax import builders

    f32 = jnp.float32
    trainer = str(config.get("trainer", ""))
    if trainer == "dit":
        from experiments.trainers import dit as t

        model = builders.build_dit(config, shape_codec(config))
        spec = {"latents": ((batch, model.num_frames, *model.latent_size, model.in_channels),
                            f32),
                "tracks": ((batch, points, model.flow_horizon, 2), f32),
                "text_tokens": ((batch, text_tokens, model.text_dim), f32),
                "text_mask": ((batch, text_tokens), jnp.bool_)}
        parts = {"init_fn": t.make_init_fn(model, text_tokens),
                 "loss_fn": t.make_loss_fn(model, builders.build_schedule(config), config)}
    elif trainer == "cvae":
        from experiments.trainers import cvae as t

        model = builders.build_cvae(config)
        c = model.config
        spec = {"history": ((batch, c.history, *c.img_size, 3), jnp.uint8),
                "tracks": ((batch, points, c.flow_horizon, 2), f32),
                "text_tokens": ((batch, text_tokens, c.language_dim), f32),
                "text_mask": ((batch, text_tokens), jnp.bool_)}
        parts = {"init_fn": t.make_init_fn(model, text_tokens),
                 "loss_fn": t.make_loss_fn(model, t.loss_config(config))}
    else:
        raise ValueError(f"config.trainer {trainer!r}: benchmarks.pod compiles the train "
                         f"steps of {TRAINERS}")
    parts["batch"] = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in spec.items()}
    parts["model"] = model
    return parts


def with_figures(out: dict[str, Any], compiled: Any, error: str | None, chip: Any
                 ) -> dict[str, Any]:
    """``out`` with the compiled program's figures, or ``fits=False`` and the compiler's
    out-of-memory line when it did not compile."""
    if compiled is None:
        out.update(fits=False, error=error)
        return out
    out.update(compiled_figures(compiled, chip))
    out["collectives"] = collectives(compiled.as_text())
    return out


def compile_or_oom(lowered_fn: Any) -> tuple[Any, float, str | None]:
    t0 = time.perf_counter()
    try:
        compiled = lowered_fn()
    except Exception as e:  # the compiler's own error types
        if not out_of_memory(e):
            raise
        first = next((ln for ln in str(e).splitlines() if "RESOURCE_EXHAUSTED" in ln
                      or "Ran out of memory" in ln), str(e).splitlines()[0])
        return None, time.perf_counter() - t0, first.strip()[:400]
    return compiled, time.perf_counter() - t0, None


def compile_train_step(config: Any, slice_name: str, per_chip_batch: int,
                       mesh_sizes: tuple[int, int, int], text_tokens: int = 16,
                       points: int = 0) -> dict[str, Any]:
    """Compiles the config's train step for a slice; returns the figures (module docstring).

    Raises:
      ValueError: a bad slice, mesh, batch or trainer; libtpu missing.
    """
    import jax

    from experiments.training import common
    from flipjax import builders
    from flipjax.sharding import BATCH_AXES, batch_sharding

    s = parse_slice(slice_name)
    if per_chip_batch < 1:
        raise ValueError(f"--per_chip_batch must be >= 1, got {per_chip_batch}")
    mesh = slice_mesh(topology_devices(s), *mesh_sizes)
    shards = 1
    for a in BATCH_AXES:
        shards *= mesh.shape[a]
    batch = per_chip_batch * shards
    config.batch_size = batch
    points = points or int(config.get("num_points", 0) or 0) or DEFAULT_POINTS
    parts = step_parts(config, batch, text_tokens, points)
    tx = common.make_optimizer(config)
    ema = config.get("ema_decay")
    t0 = time.perf_counter()
    state, shardings = common.abstract_train_state(
        parts["init_fn"], tx, jax.random.key(0), mesh=mesh, ema_decay=ema)
    abstract_s = time.perf_counter() - t0
    step = common.make_train_step(
        parts["loss_fn"], tx, shardings, mesh,
        learning_rate_fn=common.make_learning_rate_fn(config), ema_decay=ema,
        compute_dtype=builders.compute_dtype(config))
    data = batch_sharding(mesh)
    batch_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=data)
                  for k, v in parts["batch"].items()}
    compiled, compile_s, error = compile_or_oom(lambda: step.lower(state, batch_spec).compile())
    params = sum(x.size for x in jax.tree.leaves(state.params))
    out: dict[str, Any] = {
        "mode": "train_step", "trainer": str(config.trainer),
        "model_size": str(config.model.get("size", "")), "topology": s.name,
        "torus": s.topology, "chip": s.chip.name, "chips": s.chips,
        "per_chip_batch": per_chip_batch, "global_batch": batch,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "remat": bool(config.get("remat", False)),
        "compute_dtype": str(config.get("compute_dtype", "float32")),
        "parameters": int(params), "points": points, "text_tokens": text_tokens,
        "abstract_state_s": round(abstract_s, 2), "compile_s": round(compile_s, 1),
        "hbm_capacity_bytes": s.chip.hbm_bytes,
    }
    return with_figures(out, compiled, error, s.chip)



__all__ = ["DEFAULT_POINTS", "TRAINERS", "compile_or_oom", "compile_train_step", "shape_codec",
           "step_parts", "with_figures"]
