"""Tests of the shared training core on 8 virtual CPU devices, with a tiny sharded MLP."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from experiments.training import common
from flipjax.models.layers import dense
from flipjax.sharding import create_mesh, shard_batch

WIDTH, HIDDEN = 16, 32


class TinyMLP(nn.Module):
    """x float[B 16] -> float[B 16], kernels named (embed, mlp) / (mlp, embed)."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(dense(HIDDEN, ("embed", "mlp"), name="fc1")(x))
        return dense(WIDTH, ("mlp", "embed"), name="fc2")(h)


def init_fn(rng):
    return TinyMLP().init(rng, jnp.zeros((1, WIDTH)))["params"]


def loss_fn(params, batch, rng):
    del rng
    pred = TinyMLP().apply({"params": params}, batch["x"].astype(
        jax.tree.leaves(params)[0].dtype))
    loss = jnp.mean((pred.astype(jnp.float32) - batch["y"]) ** 2)
    return loss, {"pred_mean": jnp.mean(pred.astype(jnp.float32))}


def make_batch(n, seed=0):
    rs = np.random.RandomState(seed)
    return {"x": rs.randn(n, WIDTH).astype(np.float32),
            "y": rs.randn(n, WIDTH).astype(np.float32)}


CONFIG = dict(learning_rate=1e-2, warmup_steps=2, schedule="cosine", total_steps=20,
              weight_decay=1e-2, b1=0.9, b2=0.99, eps=1e-8, grad_clip_norm=1.0,
              grad_accum_steps=1)


def setup(mesh, config=CONFIG, ema_decay=0.9, **step_kwargs):
    tx = common.make_optimizer(config)
    state, shardings = common.create_train_state(init_fn, tx, jax.random.PRNGKey(0), mesh=mesh,
                                                 ema_decay=ema_decay)
    step = common.make_train_step(loss_fn, tx, shardings, mesh, ema_decay=ema_decay,
                                  learning_rate_fn=common.make_learning_rate_fn(config),
                                  **step_kwargs)
    return state, shardings, step


def host(tree):
    return jax.tree.map(np.asarray, tree)


def assert_tree_close(a, b, **kw):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **kw), host(a), host(b))


@pytest.fixture(scope="module")
def single_device_run():
    mesh = create_mesh(1, 1, 1, devices=jax.devices()[:1])
    state, _, step = setup(mesh)
    losses = []
    for i in range(2):
        state, metrics = step(state, shard_batch(mesh, make_batch(16, i)))
        losses.append(float(metrics["loss"]))
    return host(state), losses


@pytest.mark.parametrize("axes", [(8, 1, 1), (2, 2, 2)])
def test_sharded_steps_match_single_device(single_device_run, axes):
    ref_state, ref_losses = single_device_run
    mesh = create_mesh(*axes)
    state, shardings, step = setup(mesh)
    for i in range(2):  # the second step also checks that the donated state's output is usable
        old_kernel = state.params["fc1"]["kernel"]
        state, metrics = step(state, shard_batch(mesh, make_batch(16, i)))
        assert old_kernel.is_deleted()  # donated: updated in place, no second copy of the state
        np.testing.assert_allclose(float(metrics["loss"]), ref_losses[i], rtol=1e-5)
    assert int(state.step) == 2 and int(state.skipped) == 0
    assert_tree_close(state.params, ref_state.params, rtol=1e-5, atol=1e-6)
    assert_tree_close(state.ema, ref_state.ema, rtol=1e-5, atol=1e-6)
    # Outputs keep the declared layout.
    assert state.params["fc1"]["kernel"].sharding == shardings.params["fc1"]["kernel"]


def test_params_and_moments_are_born_sharded():
    mesh = create_mesh(2, 2, 2)
    state, shardings, _ = setup(mesh)
    kernel = state.params["fc1"]["kernel"]
    assert kernel.sharding.spec == P("fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (WIDTH // 2, HIDDEN // 2)
    assert state.params["fc2"]["kernel"].sharding.spec == P("tensor", "fsdp")
    assert state.ema["fc1"]["kernel"].sharding.spec == P("fsdp", "tensor")
    # Adam moments mirror the params' layout; scalar counters are replicated.
    mus = [x for x in jax.tree.leaves(state.opt_state) if x.shape == (WIDTH, HIDDEN)]
    assert len(mus) == 2 and all(m.sharding.spec == P("fsdp", "tensor") for m in mus)
    assert all(x.sharding.spec == P() for x in jax.tree.leaves(state.opt_state) if x.ndim == 0)
    assert state.rng.dtype == jnp.uint32 and state.step.dtype == jnp.int32
    specs = common.param_partition_specs(shardings)
    assert specs["fc1"]["bias"] == P("tensor")


def test_nonfinite_gradient_skips_update():
    mesh = create_mesh(8, 1, 1)
    state, _, step = setup(mesh, donate=False)
    bad = make_batch(8)
    bad["x"][3, 0] = np.nan
    new, metrics = step(state, shard_batch(mesh, bad))
    assert int(metrics["update_skipped"]) == 1 and int(metrics["skipped"]) == 1
    assert not np.isfinite(float(metrics["grad_norm"]))
    assert int(new.step) == 1 and int(new.skipped) == 1
    assert_tree_close(new.params, state.params, rtol=0, atol=0)
    assert_tree_close(new.opt_state, state.opt_state, rtol=0, atol=0)
    assert_tree_close(new.ema, state.ema, rtol=0, atol=0)
    # A good step afterwards updates normally, with the schedule where a fresh run would be.
    newer, metrics = step(new, shard_batch(mesh, make_batch(8)))
    assert int(metrics["update_skipped"]) == 0 and int(newer.skipped) == 1
    assert float(metrics["learning_rate"]) == 0.0  # still warmup step 0 of the schedule
    _, fresh = step(state, shard_batch(mesh, make_batch(8)))
    np.testing.assert_allclose(float(metrics["loss"]), float(fresh["loss"]), rtol=1e-6)


def test_gradient_accumulation_matches_large_batch():
    mesh = create_mesh(8, 1, 1)
    config = dict(CONFIG, warmup_steps=0, schedule="constant", grad_clip_norm=0.5)
    big = make_batch(16)
    halves = [{k: v[:8] for k, v in big.items()}, {k: v[8:] for k, v in big.items()}]

    ref, _, ref_step = setup(mesh, config)
    ref, _ = ref_step(ref, shard_batch(mesh, big))

    state, _, step = setup(mesh, dict(config, grad_accum_steps=2))
    start = host(state.params)
    state, _ = step(state, shard_batch(mesh, halves[0]))
    assert_tree_close(state.params, start, rtol=0, atol=0)  # accumulating only
    assert_tree_close(state.ema, start, rtol=0, atol=0)
    state, _ = step(state, shard_batch(mesh, halves[1]))
    assert_tree_close(state.params, ref.params, rtol=1e-5, atol=1e-7)
    assert_tree_close(state.ema, ref.ema, rtol=1e-5, atol=1e-7)


def test_ema_update_math():
    ema = {"a": jnp.array([1.0, 2.0]), "b": jnp.array(4.0)}
    params = {"a": jnp.array([3.0, 0.0]), "b": jnp.array(0.0)}
    out = common.ema_update(ema, params, 0.75)
    np.testing.assert_allclose(out["a"], [1.5, 1.5])
    np.testing.assert_allclose(out["b"], 3.0)
    assert_tree_close(common.ema_update(ema, params, 0.0), params, rtol=0, atol=0)


def test_ema_in_step():
    mesh = create_mesh(8, 1, 1)
    state, _, step = setup(mesh, ema_decay=0.9, donate=False)
    new, _ = step(state, shard_batch(mesh, make_batch(8)))
    expected = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, host(state.ema), host(new.params))
    assert_tree_close(new.ema, expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="ema_decay"):
        common.make_train_step(loss_fn, optax.sgd(0.1), _shardings_without_ema(mesh), mesh,
                               ema_decay=0.9)


def _shardings_without_ema(mesh):
    _, shardings = common.create_train_state(init_fn, optax.sgd(0.1), jax.random.PRNGKey(0),
                                             mesh=mesh)
    return shardings


def test_schedules():
    base = dict(learning_rate=1.0, warmup_steps=10, total_steps=110)
    cosine = common.make_schedule(dict(base, schedule="cosine"))
    np.testing.assert_allclose([float(cosine(s)) for s in (0, 5, 10, 60, 110, 200)],
                               [0.0, 0.5, 1.0, 0.5, 0.0, 0.0], atol=1e-6)
    linear = common.make_schedule(dict(base, schedule="linear", end_learning_rate=0.2))
    np.testing.assert_allclose([float(linear(s)) for s in (5, 10, 60, 110)],
                               [0.5, 1.0, 0.6, 0.2], atol=1e-6)
    constant = common.make_schedule(dict(base, schedule="constant", warmup_steps=0))
    assert float(constant(0)) == 1.0 and float(constant(1000)) == 1.0
    # Under accumulation the schedule advances once per k train steps.
    lr_fn = common.make_learning_rate_fn(dict(base, schedule="cosine", grad_accum_steps=4))
    np.testing.assert_allclose(float(lr_fn(jnp.int32(20))), 0.5, atol=1e-6)


def test_config_dict_accepted():
    ml_collections = pytest.importorskip("ml_collections")  # not a declared dependency
    schedule = common.make_schedule(ml_collections.ConfigDict(
        dict(learning_rate=2.0, warmup_steps=4, schedule="constant")))
    assert float(schedule(2)) == 1.0 and float(schedule(8)) == 2.0


@pytest.mark.parametrize("bad, match", [
    (dict(schedule="exp"), "schedule"),
    (dict(schedule="cosine", total_steps=None), "total_steps"),
    (dict(grad_accum_steps=0), "grad_accum_steps"),
    (dict(weight_decay=-1.0), "weight_decay"),
    (dict(learning_rate=None), "learning_rate"),
])
def test_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        common.make_optimizer(dict(CONFIG, **bad))


def test_bf16_compute_keeps_fp32_params():
    mesh = create_mesh(8, 1, 1)
    seen = []

    def bf16_loss(params, batch, rng):
        seen.append(jax.tree.leaves(params)[0].dtype)
        return loss_fn(params, batch, rng)

    tx = common.make_optimizer(CONFIG)
    state, shardings = common.create_train_state(init_fn, tx, jax.random.PRNGKey(0), mesh=mesh)
    step = common.make_train_step(bf16_loss, tx, shardings, mesh, compute_dtype=jnp.bfloat16)
    for i in range(2):
        state, metrics = step(state, shard_batch(mesh, make_batch(8, i)))
    assert seen == [jnp.bfloat16]  # traced (and compiled) once
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert metrics["loss"].dtype == jnp.float32 and np.isfinite(float(metrics["loss"]))
    assert int(state.step) == 2


def test_loss_fn_that_takes_step_sees_the_state_step():
    mesh = create_mesh(8, 1, 1)

    def stepped(params, batch, rng, step):
        loss, metrics = loss_fn(params, batch, rng)
        return loss, {**metrics, "seen_step": step.astype(jnp.float32)}
    stepped.takes_step = True
    tx = optax.sgd(0.1)
    state, shardings = common.create_train_state(init_fn, tx, jax.random.PRNGKey(0), mesh=mesh)
    step = common.make_train_step(stepped, tx, shardings, mesh, donate=False)
    batch = shard_batch(mesh, make_batch(8))
    for want in range(3):
        state, metrics = step(state, batch)
        assert float(metrics["seen_step"]) == want
