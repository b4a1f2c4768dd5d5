"""Device meshes and NamedShardings: the one place that decides how arrays are laid out.

The mesh has the named axes ``data``, ``fsdp`` and ``tensor`` (docs/DESIGN.md). Batches are split
over ``data`` (and ``fsdp``, which also shards parameters once models exist); small arrays such
as intrinsics or configs are replicated. Everything goes through ``jax.jit`` with these
shardings: no pmap, no experimental pjit.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical parameter/activation axes (flipjax.models.layers) -> mesh axes. Model widths are
# sharded over fsdp (ZeRO-3 style: gathered per layer by XLA), heads and MLP hidden units over
# tensor; everything else is replicated.
LOGICAL_RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("patch", None),
    ("vocab", None),
)


def mesh_shape(devices: int, data: int = -1, fsdp: int = 1, tensor: int = 1
               ) -> tuple[int, int, int]:
    """``(data, fsdp, tensor)`` sizes for ``devices`` devices; one of data / fsdp may be -1
    (it takes the devices the others leave).

    Raises:
      ValueError: sizes below 1 (other than one -1), or that do not multiply to ``devices``.
    """
    sizes = {"data": int(data), "fsdp": int(fsdp), "tensor": int(tensor)}
    fill = [k for k, v in sizes.items() if v == -1]
    if len(fill) > 1 or "tensor" in fill or any(v < 1 for k, v in sizes.items()
                                                 if k not in fill):
        raise ValueError(f"mesh sizes must be >= 1, with at most one of data / fsdp -1 (it "
                         f"fills the devices); got data={data} fsdp={fsdp} tensor={tensor}")
    if fill:
        rest = int(np.prod([v for k, v in sizes.items() if k not in fill]))
        if devices % rest:
            raise ValueError(f"{devices} devices do not split into "
                             + " x ".join(f"{k}={v}" for k, v in sizes.items()
                                          if k not in fill))
        sizes[fill[0]] = devices // rest
    if int(np.prod(list(sizes.values()))) != devices:
        raise ValueError(f"mesh data={sizes['data']} x fsdp={sizes['fsdp']} x tensor="
                         f"{sizes['tensor']} needs {int(np.prod(list(sizes.values())))} "
                         f"devices, have {devices}")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def create_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
                devices: list | None = None) -> Mesh:
    """Builds a ``data x fsdp x tensor`` mesh over the given (default: all) devices.

    Args:
      data: size of the data axis; -1 takes all devices left after fsdp and tensor.
      fsdp: size of the fsdp axis; -1 takes all devices left after data and tensor (FSDP
        over the whole slice with ``data=1``).
      tensor: size of the tensor axis.
      devices: devices to use; default ``jax.devices()``.

    Returns:
      A ``jax.sharding.Mesh`` with axis names :data:`AXES`.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(len(devices), data, fsdp, tensor)
    return Mesh(np.asarray(devices).reshape(shape), AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of arrays (any rank >= 1) split along their leading, batch, axis."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy of an array on every device."""
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(mesh: Mesh, tree):
    """Places every array of a pytree on the mesh, split along its leading (batch) axis.

    Raises:
      ValueError: when a batch size does not divide by the number of batch shards.
    """
    shards = mesh.shape["data"] * mesh.shape["fsdp"]

    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0 or x.shape[0] % shards:
            raise ValueError(f"batch axis of shape {list(x.shape)} must divide by {shards} "
                             "batch shards")
        return jax.device_put(x, batch_sharding(mesh))

    return jax.tree.map(put, tree)
