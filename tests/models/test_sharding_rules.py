"""Every model's parameters shard on a data x fsdp x tensor mesh through the logical rules."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flipjax.models.autoencoder import AutoencoderConfig, AutoencoderKL
from flipjax.models.flow_cvae import CVAEConfig, FlowCVAE
from flipjax.models.value import ValueConfig, ValueModel
from flipjax.models.video_dit import VideoDiT
from flipjax.sharding import LOGICAL_RULES, create_mesh, mesh_shape


def _abstract(name, key):
    if name == "dit-S":
        m = VideoDiT.variant("S")
        return jax.eval_shape(m.init, key, jnp.zeros((1, 19, 16, 16, 4)), jnp.zeros((1,)),
                              jnp.zeros((1, 4, 16, 2)), jnp.zeros((1, 3, 4096)),
                              jnp.ones((1, 3), bool))
    if name == "cvae-S":
        cfg = CVAEConfig.variant("S")
        m = FlowCVAE(cfg)
        return jax.eval_shape(lambda k: m.init(
            {"params": k, "latent": k}, jnp.zeros((1, 4, 16, 2)),
            jnp.zeros((1, cfg.history, 128, 128, 3)), jnp.zeros((1, 3, 4096)),
            jnp.ones((1, 3), bool)), key)
    if name == "vae-tiny":
        return jax.eval_shape(AutoencoderKL(AutoencoderConfig.variant("tiny")).init, key,
                              jnp.zeros((1, 32, 32, 3)))
    cfg = ValueConfig.variant("tiny")
    return jax.eval_shape(lambda k: ValueModel(cfg).init(
        k, jnp.zeros((1, cfg.clip_len, cfg.image_size, cfg.image_size, 3)),
        method=ValueModel.embed_clip), key)


@pytest.mark.parametrize("name", ["dit-S", "cvae-S", "vae-tiny", "value-tiny"])
def test_parameters_shard_over_fsdp_and_tensor(name, key):
    mesh = create_mesh(data=2, fsdp=2, tensor=2)
    abstract = _abstract(name, key)
    specs = nn.get_partition_spec(abstract)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), nn.meta.unbox(abstract))
    placed = jax.device_put(params, shardings)  # fails on a dimension the mesh cannot split
    leaves = jax.tree.leaves(placed)
    sharded = [x for x in leaves if len(x.sharding.device_set) == 8
               and not x.sharding.is_fully_replicated]
    # Big matrices are split (FSDP and/or tensor parallel), so no device holds all of them.
    assert sum(x.size for x in sharded) > 0.8 * sum(x.size for x in leaves)


@pytest.mark.parametrize("args, shape", [
    ((64, 1, -1, 1), (1, 64, 1)), ((64, -1, 4, 2), (8, 4, 2)), ((8,), (8, 1, 1)),
    ((8, 2, 4, 1), (2, 4, 1)),
])
def test_mesh_shape_fills_one_axis(args, shape):
    assert mesh_shape(*args) == shape


@pytest.mark.parametrize("args", [(8, -1, -1, 1), (8, 1, 1, -1), (8, 0, 1, 1), (8, 3, -1, 1),
                                  (8, 2, 2, 1)])
def test_mesh_shape_refuses_what_does_not_fit(args):
    with pytest.raises(ValueError, match=r"mesh|devices"):
        mesh_shape(*args)


def test_fsdp_over_every_device():
    mesh = create_mesh(data=1, fsdp=-1)
    assert dict(mesh.shape) == {"data": 1, "fsdp": jax.device_count(), "tensor": 1}
