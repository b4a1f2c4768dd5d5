"""Tests of flipjax.checkpoints: exact resume, retention, sharded restore, preemption."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from flipjax.checkpoints import Checkpointer, handle_preemption, load_params
from flipjax.sharding import create_mesh


def make_state(seed: int = 0, ema: bool = True) -> dict:
    """A tiny training state with everything a trainer keeps."""
    rng = np.random.default_rng(seed)
    params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
                        "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}}
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)
    # One update so the adam moments and count are non-trivial.
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = tx.update(grads, opt_state, params)
    state = {"params": params, "opt_state": opt_state, "step": jnp.int32(7 + seed),
             "rng": jax.random.key_data(jax.random.PRNGKey(seed)),
             "key": jax.random.key(seed)}
    if ema:
        state["ema"] = jax.tree.map(lambda x: x * 0.5, params)
    return state


def assert_tree_equal(a, b) -> None:
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


DATA_STATE = {"next_index": 123, "worker": [0, 1], "name": "shard-0", "seed": None}


def test_round_trip_exact(tmp_path):
    state = make_state()
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(7, state, DATA_STATE, meta={"config": {"lr": 1e-3, "dims": (1, 2)}})
        ckpt.wait()
        target = jax.eval_shape(lambda: state)
        restored, data_state, meta = ckpt.restore(target=target)
    assert_tree_equal(restored, state)
    assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(restored))
    assert data_state == DATA_STATE
    assert meta["step"] == 7 and meta["config"] == {"lr": 1e-3, "dims": [1, 2]}
    assert isinstance(meta["wall_time"], float)


def test_restore_without_target_and_bytes_data_state(tmp_path):
    state = {"params": {"w": np.arange(4, dtype=np.float32)},
             "rng": jax.random.key_data(jax.random.PRNGKey(3))}
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, state, b'{"pos": 5}')
        restored, data_state, _ = ckpt.restore(1)
    assert isinstance(restored["params"]["w"], jax.Array)
    assert_tree_equal(restored, state)
    assert data_state == b'{"pos": 5}'
    # Typed keys are documented as stored via key_data; re-wrapping gives the same stream.
    key = jax.random.wrap_key_data(restored["rng"], impl="threefry2x32")
    np.testing.assert_array_equal(jax.random.normal(key, (3,)),
                                  jax.random.normal(jax.random.PRNGKey(3), (3,)))


def test_keep_n_deletes_older_steps(tmp_path):
    state = {"w": jnp.zeros(2)}
    with Checkpointer(tmp_path, keep=2) as ckpt:
        for step in range(1, 5):
            ckpt.save(step, state)
        ckpt.wait()
        assert ckpt.all_steps() == [3, 4]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3", "4"]


def test_save_every_and_force(tmp_path):
    state = {"w": jnp.zeros(2)}
    with Checkpointer(tmp_path, save_every=5, keep=None) as ckpt:
        saved = [step for step in range(1, 12) if ckpt.save(step, state)]
        assert saved == [5, 10]
        assert ckpt.save(11, state, force=True)
        # A step that exists already is skipped, not an error (preemption at a save step).
        assert not ckpt.save(11, state, force=True)
        ckpt.wait()
        assert ckpt.all_steps() == [5, 10, 11]
        assert ckpt.latest_step() == 11


def test_latest_step_persists_across_instances(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, {"w": jnp.ones(2)})
        ckpt.save(9, {"w": jnp.full(2, 9.0)})
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 9
        state, data_state, meta = ckpt.restore()
    np.testing.assert_array_equal(state["w"], np.full(2, 9.0))
    assert data_state is None and meta["step"] == 9


def test_restore_into_sharded_target(tmp_path):
    mesh = create_mesh()
    state = make_state(ema=False)
    row = NamedSharding(mesh, PartitionSpec("data"))
    rep = NamedSharding(mesh, PartitionSpec())
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state)
        ckpt.wait()
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                           sharding=row if x.shape == (8, 4) else rep),
            jax.eval_shape(lambda: state))
        restored, _, _ = ckpt.restore(target=target)
    kernel = restored["params"]["dense"]["kernel"]
    assert kernel.sharding == row
    assert len(kernel.addressable_shards) == 8
    assert kernel.addressable_shards[0].data.shape == (1, 4)
    assert restored["opt_state"][0].mu["dense"]["kernel"].sharding == row
    assert restored["params"]["dense"]["bias"].sharding == rep
    assert_tree_equal(restored, state)


def test_load_params_and_ema(tmp_path):
    state = make_state()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, make_state(seed=1))
        ckpt.save(2, state)
    assert_tree_equal(load_params(tmp_path), state["params"])
    assert_tree_equal(load_params(tmp_path, ema=True), state["ema"])
    assert_tree_equal(load_params(tmp_path, step=1), make_state(seed=1)["params"])
    with pytest.raises(ValueError, match=r"available steps: \[1, 2\]"):
        load_params(tmp_path, step=5)


def test_load_params_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_params(tmp_path)
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(FileNotFoundError, match=str(tmp_path)):
            ckpt.restore()
        ckpt.save(1, make_state(ema=False))
    with pytest.raises(ValueError, match="no state\\['ema'\\]") as err:
        load_params(tmp_path, ema=True)
    assert str(tmp_path) in str(err.value)


def test_async_save_then_wait(tmp_path):
    state = {"w": jnp.arange(1000.0)}
    ckpt = Checkpointer(tmp_path, async_save=True)
    assert ckpt.save(1, state)
    ckpt.wait()
    assert ckpt.latest_step() == 1
    assert (tmp_path / "checkpoints" / "1" / "state").is_dir()
    restored, _, _ = ckpt.restore(1)
    np.testing.assert_array_equal(restored["w"], state["w"])
    ckpt.close()


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        Checkpointer(tmp_path, keep=0)
    with pytest.raises(ValueError, match="save_every"):
        Checkpointer(tmp_path, save_every=0)
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(ValueError, match="JSON"):
            ckpt.save(1, {"w": jnp.zeros(1)}, data_state={"pos": (1, 2)})
        ckpt.save(1, {"w": jnp.zeros(1)})
        with pytest.raises(ValueError, match=r"step 4.*available steps: \[1\]"):
            ckpt.restore(4)


def test_preemption_flag_and_handler_restored(tmp_path):
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: calls.append(s))
    try:
        ckpt = Checkpointer(tmp_path)
        with handle_preemption(ckpt) as guarded:
            assert guarded is ckpt and not ckpt.should_stop(step=0)
            os.kill(os.getpid(), signal.SIGTERM)
            assert ckpt.preempted and ckpt.should_stop(step=1)
            # The loop does the save once it sees the flag.
            assert ckpt.save(1, {"w": jnp.zeros(1)}, force=True)
        assert calls == []
        os.kill(os.getpid(), signal.SIGTERM)
        assert calls == [signal.SIGTERM]
        ckpt.close()
        assert ckpt.latest_step() == 1
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_partial_step_directories_are_ignored(tmp_path):
    state = {"params": {"w": jnp.ones(3)}}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(2, state)
    root = tmp_path / "checkpoints"
    # What a crash mid-save leaves behind, and an integer directory that was never finalised.
    (root / "5.orbax-checkpoint-tmp-1234" / "state").mkdir(parents=True)
    (root / "6" / "state").mkdir(parents=True)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 2
        assert ckpt.all_steps() == [2]
        restored, _, meta = ckpt.restore()
    assert meta["step"] == 2
    assert_tree_equal(restored, state)
    assert_tree_equal(load_params(tmp_path), state["params"])


def test_relative_workdir(tmp_path, monkeypatch):
    # The README's quickstart passes a relative --workdir; orbax's async writers need absolute
    # paths.
    monkeypatch.chdir(tmp_path)
    state = {"w": jnp.arange(4.0)}
    with Checkpointer("runs/rel", async_save=True) as ckpt:
        ckpt.save(1, state, force=True)
        ckpt.wait()
    assert (tmp_path / "runs" / "rel" / "checkpoints" / "1").is_dir()
    with Checkpointer("runs/rel") as ckpt:
        restored, _, _ = ckpt.restore(1)
    np.testing.assert_array_equal(restored["w"], state["w"])
