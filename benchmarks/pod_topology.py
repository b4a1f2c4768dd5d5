"""TPU slices this machine does not have: names, chip figures, meshes over their devices, and
what a compiled program says about itself (HBM, FLOPs, collectives).

Used by ``benchmarks.pod``; needs ``jax[tpu]`` (``pip install -e ".[pod]"``) for the topology
itself, the rest is plain Python. Chip figures are the vendor's published per-chip numbers
(HBM capacity, peak bf16 dense FLOP/s): the compiler does not report them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip figures of a TPU generation.

    Attributes:
      name: the generation as ``get_topology_desc`` spells it ("v5e", "v5p", ...).
      hbm_bytes: HBM capacity per chip.
      peak_flops: peak dense bf16 FLOP/s per chip.
      cores_per_chip: TensorCores per chip: v5p slice names count cores (v5p-128 is 64
        chips), the "e" generations' names count chips.
      torus_dims: 3 for the 3D-torus generations, 2 for the 2D ones.
    """

    name: str
    hbm_bytes: int
    peak_flops: float
    cores_per_chip: int
    torus_dims: int


# v4 is left out: its topology descriptions list one device per core, not per chip.
CHIPS = {
    "v5e": Chip("v5e", 16 * GIB, 197e12, 1, 2),
    "v5p": Chip("v5p", 95 * GIB, 459e12, 2, 3),
    "v6e": Chip("v6e", 32 * GIB, 918e12, 1, 2),
}


@dataclasses.dataclass(frozen=True)
class Slice:
    """A TPU slice: its chip, its topology name for the compiler ("v5p:4x4x4") and chips."""

    chip: Chip
    topology: str
    chips: int
    name: str


def _torus(chips: int, dims: int) -> tuple[int, ...]:
    """The most balanced power-of-two torus of ``chips`` chips, smallest side first."""
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"--topology: a slice of {chips} chips; expected a power of two")
    shape = [1] * dims
    for _ in range(int(math.log2(chips))):
        shape[shape.index(min(shape))] *= 2
    if dims == 3 and chips >= 4 and shape.count(1):  # 4 chips: 2x2x1, the published shape
        shape = sorted(shape, reverse=True)
        return tuple(shape)
    return tuple(sorted(shape))


def parse_slice(name: str) -> Slice:
    """A slice from its published name ("v5p-128", "v5e-16") or a topology ("v5e:4x4").

    Raises:
      ValueError: an unknown generation or a malformed name.
    """
    name = str(name).strip()
    m = re.fullmatch(r"(v[0-9][a-z]?)[-:](.+)", name)
    if not m or m.group(1) not in CHIPS:
        raise ValueError(f"--topology {name!r}: expected <generation>-<size> (e.g. v5p-128, "
                         f"v5e-16) or <generation>:<torus> (e.g. v5e:4x4), generations "
                         f"{sorted(CHIPS)}")
    chip, rest = CHIPS[m.group(1)], m.group(2)
    if ":" in name:
        try:
            sides = tuple(int(s) for s in rest.split("x"))
        except ValueError:
            sides = ()
        if len(sides) != chip.torus_dims or min(sides) < 1:
            raise ValueError(f"--topology {name!r}: a {chip.name} torus has "
                             f"{chip.torus_dims} sides, e.g. "
                             f"{'x'.join(['2'] * chip.torus_dims)}")
        return Slice(chip, name, math.prod(sides), name)
    if not rest.isdigit() or int(rest) % chip.cores_per_chip:
        raise ValueError(f"--topology {name!r}: the size after '-' counts "
                         f"{'cores' if chip.cores_per_chip > 1 else 'chips'} "
                         f"({chip.cores_per_chip} per chip)")
    chips = int(rest) // chip.cores_per_chip
    sides = _torus(chips, chip.torus_dims)
    return Slice(chip, f"{chip.name}:{'x'.join(map(str, sides))}", chips, name)


def topology_devices(s: Slice) -> list[Any]:
    """The slice's devices, described by libtpu without the hardware.

    Raises:
      ValueError: libtpu is missing (``pip install -e ".[pod]"``) or refuses the topology.
    """
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(topology_name=s.topology, platform="tpu")
    except Exception as e:  # the plugin's own error types vary by version
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot describe TPU topology {s.topology} ({s.name}): {first}; "
                         "is jax[tpu] installed (pip install -e '.[pod]')?") from None
    devices = list(desc.devices)
    if len(devices) != s.chips:
        raise ValueError(f"topology {s.topology} has {len(devices)} devices, expected "
                         f"{s.chips} chips")
    return devices


def slice_mesh(devices: list[Any], data: int, fsdp: int, tensor: int) -> Any:
    """A ``data x fsdp x tensor`` Mesh over the slice's devices, laid out on the torus.

    One of ``data`` / ``fsdp`` may be -1: it takes the devices the others leave.

    Raises:
      ValueError: sizes that do not multiply to the device count.
    """
    import numpy as np
    from jax.experimental import mesh_utils
    from jax.sharding import Mesh

    from flipjax.sharding import AXES, mesh_shape

    shape = mesh_shape(len(devices), data, fsdp, tensor)
    try:
        grid = mesh_utils.create_device_mesh(shape, devices=devices,
                                             allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, AXES)


_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
                "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
                "f64": 8, "c64": 8, "c128": 16}
_INSTR = re.compile(r"=\s*(.*?)\s(" + "|".join(_COLLECTIVES) + r")(-start)?\(")
_SHAPE = re.compile(r"([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """Collective ops in an optimised HLO module and the bytes of their results.

    Each op is counted once where it appears in the program text: an op inside a loop body
    (a scan over layers) runs once per iteration but is counted once. Async pairs count
    their ``-start`` op only.

    Returns:
      ``{op: {"count": n, "bytes": b}}`` for every collective kind (zeros included).
    """
    out = {k: {"count": 0, "bytes": 0} for k in _COLLECTIVES}
    for line in hlo_text.splitlines():
        m = _INSTR.search(line)
        if not m:
            continue
        nbytes = 0
        for dtype, dims in _SHAPE.findall(m.group(1)):
            if dtype in _DTYPE_BYTES:
                size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
                nbytes += size * _DTYPE_BYTES[dtype]
        out[m.group(2)]["count"] += 1
        out[m.group(2)]["bytes"] += nbytes
    return out


def compiled_figures(compiled: Any, chip: Chip) -> dict[str, Any]:
    """Per-chip HBM, FLOPs, the cost model's step time and the MFU it implies.

    HBM per chip = arguments + outputs - aliased (donated) + temporaries + code, as the
    runtime would allocate it. ``estimated_step_s`` is the cost model's ``optimal_seconds``
    (a roofline of compute and HBM traffic on one chip, not a measurement; collectives'
    latency is not in it), and ``estimated_mfu`` = FLOPs / (that time x peak): an upper
    bound. The FLOPs are the compiled program's, so remat's recomputation counts in them.
    """
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    parts = {k: int(getattr(mem, f"{k}_size_in_bytes", 0) or 0)
             for k in ("argument", "output", "alias", "temp", "generated_code")}
    hbm = (parts["argument"] + parts["output"] - parts["alias"] + parts["temp"]
           + parts["generated_code"])
    flops = float(cost.get("flops", 0.0))
    seconds = float(cost.get("optimal_seconds", 0.0) or 0.0)
    return {
        "hbm_per_chip_bytes": hbm,
        "hbm_capacity_bytes": chip.hbm_bytes,
        "hbm_fraction": hbm / chip.hbm_bytes,
        "hbm_breakdown_bytes": parts,
        "fits": hbm <= chip.hbm_bytes,
        "flops_per_chip": flops,
        "bytes_accessed_per_chip": float(cost.get("bytes accessed", 0.0)),
        "estimated_step_s": seconds if seconds > 0 else None,
        "estimated_mfu": flops / (seconds * chip.peak_flops) if seconds > 0 else None,
        "peak_flops_per_chip": chip.peak_flops,
    }


def out_of_memory(error: BaseException) -> bool:
    """Whether a compile error is the compiler's HBM overflow (RESOURCE_EXHAUSTED)."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text


__all__ = ["CHIPS", "GIB", "Chip", "Slice", "collectives", "compiled_figures",
           "out_of_memory", "parse_slice", "slice_mesh", "topology_devices"]
