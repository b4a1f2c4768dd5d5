"""``benchmarks.pod --planner``: the planner's sharded search compiled for a TPU slice.

The world model is abstract: the config's DiT (``trainer = "dit"``) with the action and value
modules of matching sizes (``experiments/configs/cvae.py`` and ``value.py`` defaults, frame
size, flow horizon and text width taken from the DiT's config), every parameter a
``jax.ShapeDtypeStruct`` replicated over the mesh, as ``hill_climb`` places them. Problems are
split over the mesh's batch axes; each problem's beams x candidates rows stay on its chip.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.pod_topology import (
    parse_slice,
    slice_mesh,
    topology_devices,
)
from benchmarks.pod_train import compile_or_oom, shape_codec, with_figures


def abstract_world_model(config: Any, mesh: Any, text_tokens: int) -> Any:
    """The planner's WorldModel for the DiT config ``config``, parameters abstract and
    replicated over ``mesh``.

    Raises:
      ValueError: a config that is not a DiT's.
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from experiments.configs import cvae as cvae_configs
    from experiments.configs import value as value_configs
    from experiments.trainers import cvae as cvae_trainer
    from experiments.trainers import dit as dit_trainer
    from experiments.trainers import value as value_trainer
    from flipjax import builders
    from flipjax.planning.world_model import world_model_from_modules

    if str(config.get("trainer", "")) != "dit":
        raise ValueError(f"--planner needs a DiT config (trainer 'dit'), got trainer "
                         f"{config.get('trainer')!r}")
    codec = shape_codec(config)
    dit = builders.build_dit(config, codec)
    image_size = tuple(int(s) for s in config.image_size)
    size = str(config.model.size)
    # The tiny (runlocal) DiT plans with the tiny modules; S/B/L with the same-sized CVAE.
    tiny = size not in ("S", "B", "L")
    cc = cvae_configs.get_config("S,runlocal" if tiny else size)
    cc.unlock()
    cc.model.img_size = image_size
    cc.model.flow_horizon = int(dit.flow_horizon)
    cc.model.language_dim = int(dit.text_dim)
    cvae = builders.build_cvae(cc)
    vc = value_configs.get_config("clip,runlocal" if tiny else "clip")
    vc.unlock()
    vc.model.language_dim = int(dit.text_dim)
    value = builders.build_value(vc)
    rep = NamedSharding(mesh, PartitionSpec())

    def params(init_fn: Any) -> Any:
        import flax.linen as nn

        tree = jax.eval_shape(lambda k: nn.unbox(init_fn(k)), jax.random.key(0))
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                            tree)

    codec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), codec)
    return world_model_from_modules(
        cvae=cvae, cvae_params=params(cvae_trainer.make_init_fn(cvae, text_tokens)),
        dit=dit, dit_params=params(dit_trainer.make_init_fn(dit, text_tokens)),
        codec=codec, value=value,
        value_params=params(value_trainer.make_init_fn(value, text_tokens, int(dit.text_dim))),
        image_size=image_size, flow_normalization=str(config.flow_normalization),
        prediction=dit_trainer.prediction_of(config))


def compile_planner(config: Any, slice_name: str, mesh_sizes: tuple[int, int, int], *,
                    problems: int, beams: int,
                    candidates: int, horizon: int, sample_steps: int,
                    text_tokens: int = 16, query_grid: int = 8) -> dict[str, Any]:
    """Compiles ``hill_climb``'s search of ``problems`` problems for a slice (per chip:
    problems / the mesh's batch shards).

    Raises:
      ValueError: problems that do not split over the batch shards, a bad slice or mesh.
    """
    import jax

    from flipjax import builders
    from flipjax.planning.beam_search import PlanConfig, sharded_search
    from flipjax.sharding import BATCH_AXES, batch_sharding

    s = parse_slice(slice_name)
    mesh = slice_mesh(topology_devices(s), *mesh_sizes)
    shards = 1
    for a in BATCH_AXES:
        shards *= mesh.shape[a]
    if problems < 1 or problems % shards:
        raise ValueError(f"--problems {problems} must be a positive multiple of the mesh's "
                         f"{shards} batch shards")
    wm = abstract_world_model(config, mesh, text_tokens)
    pc = PlanConfig(beams=beams, candidates=candidates, horizon=horizon,
                    sample_steps=sample_steps, query_grid=query_grid,
                    schedule=builders.build_schedule(config))
    h, w = (int(x) for x in config.image_size)
    data = batch_sharding(mesh)
    f32 = jax.numpy.float32

    def spec(shape: tuple[int, ...], dtype: Any) -> Any:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=data)

    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), problems))
    args = (spec((problems, wm.history_frames, h, w, 3), f32),
            spec((problems, text_tokens, int(config.model.text_dim)), f32),
            spec((problems, text_tokens), jax.numpy.bool_),
            spec((problems, query_grid * query_grid, 2), f32),
            spec(keys.shape, keys.dtype))
    compiled, compile_s, error = compile_or_oom(
        lambda: sharded_search(mesh).lower(wm, *args, pc).compile())
    out: dict[str, Any] = {
        "mode": "planner", "model_size": str(config.model.get("size", "")),
        "topology": s.name, "torus": s.topology, "chip": s.chip.name, "chips": s.chips,
        "problems": problems, "per_chip_problems": problems // shards,
        "per_chip_batch": problems // shards,
        "beams": beams, "candidates": candidates, "horizon": horizon,
        "sample_steps": sample_steps, "queries": query_grid * query_grid,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "compile_s": round(compile_s, 1), "hbm_capacity_bytes": s.chip.hbm_bytes,
        "compiled_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    out = with_figures(out, compiled, error, s.chip)
    if "flops_per_chip" in out:
        # XLA's cost analysis counts a loop body once, not once per trip: the horizon's
        # scan and the sampler's loop make its FLOPs and time no measure of a whole plan.
        out.update(estimated_step_s=None, estimated_mfu=None,
                   flops_note="loop bodies counted once (horizon scan, sampler steps): not "
                              "per plan")
    return out


__all__ = ["abstract_world_model", "compile_planner"]
