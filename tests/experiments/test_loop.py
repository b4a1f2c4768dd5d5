"""The generic training loop end to end with a tiny Dense model and an in-memory loader:
metric writers (TensorBoard, metrics.jsonl, console), profiler window, NaN skipping,
SIGTERM, CLI errors, frozen and pretrained parameters."""

import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs.common import base_config
from experiments.training import loop
from flipjax.checkpoints import Checkpointer, load_params

ROOT = pathlib.Path(__file__).resolve().parents[2]
# conftest gives 8 CPU devices; the batch must split over the data axis.
BATCH = 8


class Tiny(nn.Module):
    """x float[B 2] -> float[B 3] through two Dense layers named enc and dec."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="dec")(nn.tanh(nn.Dense(4, name="enc")(x)))


def init_fn(rng):
    return Tiny().init(rng, jnp.zeros((1, 2)))["params"]


def loss_fn(params, batch, rng):
    del rng
    pred = Tiny().apply({"params": params}, batch["x"])
    return jnp.mean((pred - 1.0) ** 2), {"pred_mean": jnp.mean(pred)}


class MemLoader:
    """Batch i (1-based) is x = i / 10 everywhere, NaN for i in ``nan_at``; optional delay."""

    def __init__(self, nan_at=(), delay=0.0):
        self.i, self.nan_at, self.delay = 0, tuple(nan_at), delay

    def __next__(self):
        if self.delay:
            time.sleep(self.delay)
        self.i += 1
        value = np.nan if self.i in self.nan_at else self.i / 10
        return {"x": jnp.full((BATCH, 2), value, jnp.float32)}

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]


def tiny_config(total_steps, **overrides):
    c = base_config()
    c.total_steps = total_steps
    c.batch_size = BATCH
    c.log_every = 1
    c.checkpoint_every = 1000
    c.eval_every = 0
    c.learning_rate = 1e-2
    c.ema_decay = 0.9
    c.async_checkpointing = False
    for k, v in overrides.items():
        c[k] = v
    c.lock()
    return c


def run(workdir, total_steps, loader_kwargs=None, **kwargs):
    overrides = kwargs.pop("config", {})
    return loop.train(tiny_config(total_steps, **overrides), workdir, init_fn=init_fn,
                      loss_fn=loss_fn,
                      make_loader=lambda mesh: MemLoader(**(loader_kwargs or {})), **kwargs)


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, host(a), host(b))


# ------------------------------------------------------------------------------------------
# One run with eval samples, TensorBoard and a profiler window, checked by several tests
# ------------------------------------------------------------------------------------------

IMAGE = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
VIDEO = np.stack([np.full((8, 6, 3), 40 * t, np.uint8) for t in range(3)])


def make_eval(mesh):
    del mesh

    def eval_fn(state, step):
        return {"step_seen": float(step), "ema_sum": sum(float(jnp.sum(x)) for x in
                                                         jax.tree.leaves(state.ema)),
                "picture": IMAGE, "clip": VIDEO}

    return eval_fn


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    import logging as py_logging

    workdir = tmp_path_factory.mktemp("logged")
    handler_records = []

    class Capture(py_logging.Handler):
        def emit(self, record):
            handler_records.append(record.getMessage())

    absl_logger = py_logging.getLogger("absl")
    capture = Capture(level=py_logging.INFO)
    old_level = absl_logger.level
    absl_logger.setLevel(py_logging.INFO)
    absl_logger.addHandler(capture)
    try:
        state = run(workdir, 4, make_eval=make_eval,
                    config=dict(log_every=2, eval_every=2, profile_start_step=2,
                                profile_steps=2))
    finally:
        absl_logger.removeHandler(capture)
        absl_logger.setLevel(old_level)
    return workdir, state, handler_records


def read_tensorboard(workdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    acc = EventAccumulator(str(workdir / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    tags = acc.Tags()["tensors"]
    return tags, {t: [(e.step, tensor_util.make_ndarray(e.tensor_proto))
                      for e in acc.Tensors(t)] for t in tags}


def test_tensorboard_holds_the_logged_scalars_and_samples(logged_run):
    workdir, _, _ = logged_run
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    tags, values = read_tensorboard(workdir)
    records = loop.read_metrics(workdir)
    train = {r["step"]: r for r in records if r["split"] == "train"}
    assert sorted(train) == [2, 4]
    loss = values["train/loss"]
    assert [s for s, _ in loss] == [2, 4]
    for s, v in loss:
        assert float(v) == pytest.approx(train[s]["loss"], rel=1e-6)
    assert [(s, float(v)) for s, v in values["eval/step_seen"]] == [(2, 2.0), (4, 4.0)]
    # Images are (width, height, png...) string tensors; the video became a 3-frame strip.
    (_, picture), _ = values["samples/picture"]
    assert picture[:2].tolist() == [b"8", b"8"]
    (_, strip), _ = values["samples/clip"]
    assert strip[:2].tolist() == [b"18", b"8"]
    assert "_hparams_/session_start_info" in tags


def test_jsonl_records_memory_and_eval(logged_run):
    workdir, _, _ = logged_run
    records = loop.read_metrics(workdir)
    train = [r for r in records if r["split"] == "train"]
    assert {"loss", "grad_norm", "skipped", "pred_mean", "steps_per_s", "examples_per_s",
            "learning_rate"} <= set(train[0])
    assert all(r["host_peak_rss_mb"] > 10 for r in train)
    # CPU reports no device memory statistics; the key must then be absent, not faked.
    has_device_stats = jax.devices()[0].memory_stats() is not None
    assert ("device_peak_memory_mb" in train[0]) == has_device_stats
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    assert evals[0]["step_seen"] == 2.0 and evals[0]["eval_seconds"] >= 0.0
    assert set(evals[0]) == {"step", "split", "step_seen", "ema_sum", "eval_seconds"}
    samples = sorted(p.name for p in (workdir / "samples").iterdir())
    assert samples == ["clip_00000002.gif", "clip_00000004.gif", "picture_00000002.png",
                       "picture_00000004.png"]


def test_console_lines(logged_run):
    _, _, lines = logged_run
    train = [m for m in lines if m.startswith("step ")]
    assert len(train) == 2 and train[-1].startswith("step 4/4 | loss ")
    assert "steps/s |" in train[-1] and "examples/s | ETA 0:00:00" in train[-1]
    evals = [m for m in lines if m.startswith("eval step ")]
    assert len(evals) == 2 and evals[0].startswith("eval step 2 (")
    assert "step_seen 2.0000" in evals[0]


def test_profiler_window_writes_a_trace(logged_run):
    workdir, _, lines = logged_run
    traces = list((workdir / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert any(m.startswith("profiling steps 2-3") for m in lines)


def test_profiler_window_validation(tmp_path):
    with pytest.raises(ValueError, match="profile_start_step"):
        loop.ProfileWindow(-1, 5, tmp_path)
    with pytest.raises(ValueError, match="profile_steps"):
        loop.ProfileWindow(3, 0, tmp_path)
    assert not loop.ProfileWindow(0, 5, tmp_path).enabled


def test_writer_helpers(tmp_path):
    from experiments.training import logging_utils as lu

    strip = lu.video_strip(np.stack([np.full((2, 3, 3), t, np.uint8) for t in range(20)]),
                           max_frames=4)
    assert strip.shape == (2, 12, 3)
    assert strip[0, ::3, 0].tolist() == [0, 6, 13, 19]
    with pytest.raises(ValueError, match=r"\(2, 3, 3\)"):
        lu.video_strip(np.zeros((2, 3, 3), np.uint8))
    flat = lu.flatten_hparams(tiny_config(3))
    assert flat["total_steps"] == 3 and flat["mesh.data"] == -1
    assert flat["ema_decay"] == 0.9 and flat["schedule"] == "constant"
    assert all(isinstance(v, bool | int | float | str) for v in flat.values())
    writer = lu.JsonlWriter(tmp_path / loop.METRICS_FILE)
    writer.write_scalars(5, {"train/loss": np.float32(0.5), "eval/psnr": 20, "lr": 1e-3})
    assert loop.read_metrics(tmp_path) == [
        {"step": 5, "split": "train", "loss": 0.5, "lr": 1e-3},
        {"step": 5, "split": "eval", "psnr": 20.0}]
    assert lu.format_eta(3725) == "1:02:05" and lu.format_eta(math.inf) == "?"


# ------------------------------------------------------------------------------------------
# Robustness
# ------------------------------------------------------------------------------------------


def test_nan_batch_is_skipped_and_counted(tmp_path):
    before = run(tmp_path / "two", 2)
    after = run(tmp_path / "nan", 3, loader_kwargs=dict(nan_at=(3,)))
    assert int(after.step) == 3 and int(after.skipped) == 1
    assert_trees_equal(after.params, before.params)
    assert_trees_equal(after.ema, before.ema)
    assert_trees_equal(after.opt_state, before.opt_state)
    train = {r["step"]: r for r in loop.read_metrics(tmp_path / "nan")}
    assert [train[s]["skipped"] for s in (1, 2, 3)] == [0, 0, 1]
    assert train[3]["update_skipped"] == 1 and not math.isfinite(train[3]["loss"])
    # Training goes on after the bad batch.
    resumed = run(tmp_path / "nan", 4, loader_kwargs=dict(nan_at=(3,)))
    assert int(resumed.skipped) == 1
    assert not np.array_equal(host(resumed.params)["dec"]["kernel"],
                              host(before.params)["dec"]["kernel"])


def slow_run(workdir):
    """Entry of the SIGTERM test's subprocess: a long run with a slow loader."""
    run(workdir, 100_000, loader_kwargs=dict(delay=0.05))


def test_sigterm_saves_a_restorable_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from tests.experiments.test_loop import slow_run; "
                               "slow_run(sys.argv[1])", str(workdir)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while len(loop.read_metrics(workdir)) < 3:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.time() < deadline, "no training progress within 180 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "preempted: saving step" in out
    logged = max(r["step"] for r in loop.read_metrics(workdir))
    with Checkpointer(workdir) as ckpt:
        reached = ckpt.latest_step()
    assert reached is not None and 3 <= logged <= reached < 100_000
    params = load_params(workdir)
    assert set(params) == {"enc", "dec"}
    # Resuming continues exactly: equal to an uninterrupted run to the same step.
    resumed = run(workdir, reached + 2)
    straight = run(tmp_path / "straight", reached + 2)
    assert int(resumed.step) == reached + 2
    assert_trees_equal(resumed.params, straight.params)
    steps = [r["step"] for r in loop.read_metrics(workdir)]
    assert steps[-2:] == [reached + 1, reached + 2]


def _cli(*args, debug=False):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu"}
    env.pop("FLIPJAX_DEBUG", None)
    if debug:
        env["FLIPJAX_DEBUG"] = "1"
    return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


def test_cli_unknown_config_field_fails_at_start(tmp_path):
    res = _cli("--config=experiments/configs/cvae.py:S,runlocal",
               f"--workdir={tmp_path / 'run'}", "--config.no_such_field=1")
    assert res.returncode != 0
    assert "the config has no field 'no_such_field'" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "run").exists()


def test_cli_missing_data_dir_fails_at_start(tmp_path):
    missing = tmp_path / "no_clips_here"
    res = _cli("--config=experiments/configs/cvae.py:S", f"--workdir={tmp_path / 'run'}",
               f"--config.data_dir={missing}")
    assert res.returncode == 1
    # One line naming the problem, last on stderr, and no traceback.
    errors = [line for line in res.stderr.splitlines() if "error" in line.lower()]
    assert errors == [res.stderr.strip().splitlines()[-1]], res.stderr[-3000:]
    assert errors[0].startswith(f"train: error: data directory {missing} does not exist")
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
    # FLIPJAX_DEBUG=1: the exception itself, traceback included.
    debug = _cli("--config=experiments/configs/cvae.py:S", f"--workdir={tmp_path / 'run'}",
                 f"--config.data_dir={missing}", debug=True)
    assert debug.returncode != 0
    assert "Traceback (most recent call last)" in debug.stderr
    assert f"ValueError: data directory {missing} does not exist" in debug.stderr


def test_cli_usage_errors_are_one_line(tmp_path):
    res = _cli("--config=experiments/configs/cvae.py:S")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [
        "train: error: --workdir is required (--help lists the flags)"]
    res = _cli("--config=experiments/configs/cvae.py:S", f"--workdir={tmp_path / 'run'}",
               "--config.trainer=no_such_trainer")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith(
        "train: error: unknown trainer 'no_such_trainer' (config.trainer); available trainers:")
    missing = "experiments/configs/no_such_config.py"
    res = _cli(f"--config={missing}", f"--workdir={tmp_path / 'run'}")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [
        f"train: error: --config: [Errno 2] No such file or directory: '{missing}' "
        "(--help lists the flags)"]
    res = _cli("--config=experiments/configs/cvae.py:no_such_variant",
               f"--workdir={tmp_path / 'run'}")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    [line] = res.stderr.strip().splitlines()
    assert line.startswith("train: error: flag --config=experiments/configs/cvae.py:no_such_"
                           "variant: Error whilst parsing config file: ValueError: "), line


# ------------------------------------------------------------------------------------------
# Frozen and pretrained parameters
# ------------------------------------------------------------------------------------------


def _filled(value):
    shapes = jax.eval_shape(init_fn, jax.random.key(0))
    return jax.tree.map(lambda s: np.full(s.shape, value, np.float32), shapes)


def test_frozen_params_stay_bitwise_and_pretrained_values_are_used(tmp_path):
    state = run(tmp_path / "run", 3, trainable=lambda path: path[0] == "dec",
                pretrained=lambda: _filled(0.5), config=dict(weight_decay=0.1))
    params, ema = host(state.params), host(state.ema)
    # Frozen under weight decay too: still exactly the pretrained values.
    for leaf in jax.tree.leaves(params["enc"]) + jax.tree.leaves(ema["enc"]):
        assert np.all(leaf == np.float32(0.5))
    assert not np.all(params["dec"]["kernel"] == np.float32(0.5))
    # A fresh run without pretrained values starts elsewhere.
    scratch = host(run(tmp_path / "scratch", 1).params)
    assert not np.all(scratch["enc"]["kernel"] == np.float32(0.5))


def test_pretrained_is_ignored_on_resume(tmp_path):
    run(tmp_path / "run", 2, pretrained=lambda: _filled(0.5))
    resumed = run(tmp_path / "run", 4, pretrained=lambda: _filled(7.0))
    straight = run(tmp_path / "straight", 4, pretrained=lambda: _filled(0.5))
    assert_trees_equal(resumed.params, straight.params)


def test_pretrained_shape_mismatch_names_the_parameter(tmp_path):
    bad = _filled(0.5)
    bad["enc"]["kernel"] = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"enc/kernel: shape \(3, 4\) != model \(2, 4\)"):
        run(tmp_path / "run", 1, pretrained=lambda: bad)


def test_input_wait_fraction_tells_a_slow_loader_from_a_fast_one(tmp_path):
    run(tmp_path / "fast", 6, config={"log_every": 3})
    run(tmp_path / "slow", 6, loader_kwargs={"delay": 0.2}, config={"log_every": 3})

    def last_wait(name):
        train = [r for r in loop.read_metrics(tmp_path / name) if r["split"] == "train"]
        return train[-1]["input_wait_fraction"]

    # A tiny Dense step takes well under a millisecond: with a 0.2 s loader nearly all of
    # the window is spent waiting, without it almost none.
    assert last_wait("slow") > 0.8
    assert 0.0 <= last_wait("fast") < 0.5
