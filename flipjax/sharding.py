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


def create_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
                devices: list | None = None) -> Mesh:
    """Builds a ``data x fsdp x tensor`` mesh over the given (default: all) devices.

    Args:
      data: size of the data axis; -1 takes all devices left after fsdp and tensor.
      fsdp: size of the fsdp axis.
      tensor: size of the tensor axis.
      devices: devices to use; default ``jax.devices()``.

    Returns:
      A ``jax.sharding.Mesh`` with axis names :data:`AXES`.
    """
    devices = list(jax.devices() if devices is None else devices)
    if fsdp < 1 or tensor < 1:
        raise ValueError(f"fsdp and tensor must be >= 1, got fsdp={fsdp} tensor={tensor}")
    if data == -1:
        if len(devices) % (fsdp * tensor):
            raise ValueError(f"{len(devices)} devices do not split into fsdp={fsdp} x "
                             f"tensor={tensor}")
        data = len(devices) // (fsdp * tensor)
    if data * fsdp * tensor != len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} needs "
                         f"{data * fsdp * tensor} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(data, fsdp, tensor), AXES)


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
