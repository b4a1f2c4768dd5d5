"""Pod scale without a pod: the configured train step (or the planner) compiled ahead of time
for a TPU slice this machine does not have, and what the compiler says about it.

    pip install -e ".[pod]"     # jax[tpu]: libtpu describes and compiles for TPU topologies
    python -m benchmarks.pod --config=experiments/configs/dit_large.py --topology=v5p-128 \
        [--per_chip_batch=8] [--mesh=-1,1,1] [--remat=true] [--out=FILE.json]
    python -m benchmarks.pod --config=experiments/configs/dit.py:B --topology=v5p-128 \
        --planner --problems=1024 [--beams=2 --candidates=2 --horizon=30]

The train state is built abstractly (``jax.eval_shape``: no parameter is materialised), laid
out by the trainer's own logical sharding rules over a ``data x fsdp x tensor`` mesh of the
slice's devices, and the trainer's own jitted step (``experiments.training.common``: loss,
AdamW, EMA, the config's compute dtype) is lowered and compiled for the topology. Written
(``--out``): ``topology``, ``chips``, ``per_chip_batch``, ``global_batch``, ``mesh``, ``fits``,
``hbm_per_chip_bytes`` (arguments + outputs - donated + temporaries + code) beside
``hbm_capacity_bytes``, ``flops_per_chip`` (per step), ``estimated_step_s`` (the cost model's
roofline time: no collective latency, so a lower bound), ``estimated_mfu`` (the upper bound it
implies against the chip's peak), ``collectives`` (count and result bytes per kind, each op
counted once in the program text), ``compile_s``. A step that does not fit fails the compile
with RESOURCE_EXHAUSTED as on a real chip: ``fits`` is then false and ``error`` says so.

``--planner`` compiles ``flipjax.planning.hill_climb``'s sharded search instead: problems x
beams over the mesh's batch axes, the world model (the config's DiT with the config-sized
CVAE and value modules, all abstract) replicated. Its HBM is the program's; its FLOPs count
each loop body once (the horizon's scan, the sampler's steps), so no time or MFU is given.

Needs ``jax[tpu]``; the process keeps JAX's own platform on the CPU (``JAX_PLATFORMS=cpu``),
libtpu only describes and compiles. One libtpu per machine at a time unless
``ALLOW_MULTIPLE_LIBTPU_LOAD=1`` (set here).
"""

from __future__ import annotations

import os
from typing import Any

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file with its argument (e.g. experiments/configs/dit.py:L).",
    lock_config=False)
_TOPOLOGY = flags.DEFINE_string("topology", "v5p-128",
                                "TPU slice: v5p-128, v5e-16, v5e-256 or a torus (v5e:2x2).")
_PER_CHIP = flags.DEFINE_integer("per_chip_batch", 8,
                                 "Samples per batch shard (training; --planner: --problems).")
_MESH = flags.DEFINE_string("mesh", "", "data,fsdp,tensor sizes (data -1 fills); default: "
                            "the config's mesh.")
_REMAT = flags.DEFINE_string("remat", "", "true/false overrides config.remat (DiT, "
                             "autoencoder); empty keeps the config's.")
_OUT = flags.DEFINE_string("out", "", "JSON file to write (default: print only).")
_PLANNER = flags.DEFINE_bool("planner", False, "Compile the planner's search instead.")
_PROBLEMS = flags.DEFINE_integer("problems", 1024, "Planning problems (--planner).")
_BEAMS = flags.DEFINE_integer("beams", 2, "Beams per problem (--planner).")
_CANDIDATES = flags.DEFINE_integer("candidates", 2, "Candidates per beam (--planner).")
_HORIZON = flags.DEFINE_integer("horizon", 30, "Planning steps (--planner).")
_SAMPLE_STEPS = flags.DEFINE_integer("sample_steps", 10, "DDIM steps (--planner).")
_TEXT_TOKENS = flags.DEFINE_integer("text_tokens", 16, "Instruction tokens per sample.")
_POINTS = flags.DEFINE_integer("points", 0, "Tracked points per clip; 0: the config's "
                               "num_points, or the 23x23 grid of build_clips when that is 0.")

def _mesh_sizes(text: str, config: Any) -> tuple[int, int, int]:
    if not text:
        m = config.mesh
        return int(m.data), int(m.fsdp), int(m.tensor)
    try:
        data, fsdp, tensor = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--mesh {text!r}: expected three integers data,fsdp,tensor "
                         "(e.g. -1,1,1 or 1,64,1)") from None
    return data, fsdp, tensor


def main(argv: list[str]) -> None:
    """Runs the benchmark from the flags and writes its figures to ``--out``."""
    from absl import app

    from benchmarks.report import write_result

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required (e.g. experiments/configs/dit_large.py)")
    config = _CONFIG.value
    if _REMAT.value:
        if _REMAT.value.lower() not in ("true", "false"):
            raise app.UsageError(f"--remat {_REMAT.value!r}: true or false")
        config.remat = _REMAT.value.lower() == "true"
    if _PLANNER.value:
        from benchmarks.pod_planner import compile_planner

        result = compile_planner(config, _TOPOLOGY.value, _mesh_sizes(_MESH.value, config),
                                 problems=_PROBLEMS.value,
                                 beams=_BEAMS.value, candidates=_CANDIDATES.value,
                                 horizon=_HORIZON.value, sample_steps=_SAMPLE_STEPS.value,
                                 text_tokens=_TEXT_TOKENS.value)
    else:
        from benchmarks.pod_train import compile_train_step

        result = compile_train_step(config, _TOPOLOGY.value, _PER_CHIP.value,
                                    _mesh_sizes(_MESH.value, config),
                                    text_tokens=_TEXT_TOKENS.value, points=_POINTS.value)
    gib = result.get("hbm_per_chip_bytes")
    print(f"pod: {result['mode']} on {result['topology']} ({result['chips']} chips): "
          + (f"fits={result['fits']} HBM/chip {gib / 2**30:.2f} of "
             f"{result['hbm_capacity_bytes'] / 2**30:.0f} GiB, "
             f"{result['flops_per_chip']:.3g} FLOPs/chip, est. step "
             f"{result['estimated_step_s'] or float('nan'):.4g} s, MFU "
             f"{result['estimated_mfu'] or float('nan'):.2f}" if gib is not None
             else f"does not fit: {result.get('error')}")
          + f", compiled in {result['compile_s']} s", flush=True)
    if _OUT.value:
        result.setdefault("targets_met", {})
        write_result(_OUT.value, result)


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from experiments import cli

    cli.run(main, "benchmarks.pod")
