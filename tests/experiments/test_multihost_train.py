"""Two training processes (jax.distributed on localhost, CPU collectives) end where one
process with two devices ends.

The two-process run is the real command line (``python -m experiments.train`` with
``--config.distributed=True`` and the coordinator in the environment) training the
``cvae.py:S,runlocal`` FlowCVAE on prebuilt toy clips; each process has one CPU device and
loads its own data shard, and both write their parts of the checkpoints into the shared
workdir. The run stops after STEPS - 1 steps and a second two-process run resumes it (each
process from its own data position) to STEPS. The reference (multihost_train_worker.py) is
one process with two CPU devices that feeds the same shards to the same devices for STEPS
steps straight.
"""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("grain")

from experiments.trainers import cvae
from experiments.training import loop
from flipjax.checkpoints import Checkpointer, load_params
from tests.experiments.helpers import cvae_small

# Five processes import TensorFlow (clu) and compile the CVAE: ~2 CPU-minutes, over the
# default suite's budget. Run with `pytest -m slow tests/experiments/test_multihost_train.py`.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 3
LOSS_LINE = re.compile(r"step (\d+)/\d+ \| loss ([-\d.naninf]+)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _base_env():
    # One CPU device per process: drop conftest's 8-device flag.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return {**env, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}


def _cli_processes(workdir, clips_dir, steps):
    port = _free_port()
    cli = [sys.executable, "-m", "experiments.train",
           "--config=experiments/configs/cvae.py:S,runlocal", f"--workdir={workdir}",
           "--config.distributed=True", f"--config.data_dir={clips_dir}",
           f"--config.total_steps={steps}", "--config.batch_size=4", "--config.log_every=1",
           "--config.checkpoint_every=1000", "--config.eval_batches=0"]
    return [subprocess.Popen(
        cli, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**_base_env(), "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
             "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(p)}) for p in range(2)]


def _finish(procs):
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=400)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-4000:]
    return outputs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two processes train STEPS - 1 steps, stop, and resume to STEPS; one process trains
    STEPS steps straight."""
    root = tmp_path_factory.mktemp("multihost")
    clips_dir = root / "clips"
    config = cvae_small.get_config("runlocal")
    config.toy_episodes = 1
    cvae.build_toy_clips(config, "train", clips_dir)

    multi, single = root / "two_processes", root / "one_process"
    reference = subprocess.Popen(
        [sys.executable, "-m", "tests.experiments.multihost_train_worker", str(single),
         str(clips_dir), str(STEPS)], cwd=ROOT, env=_base_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    first = _finish([*_cli_processes(multi, clips_dir, STEPS - 1), reference])
    resumed = _finish(_cli_processes(multi, clips_dir, STEPS))
    return multi, single, first[:2], resumed


def _console_losses(output):
    return {int(s): float(v) for s, v in LOSS_LINE.findall(output)}


def test_processes_joined_one_cluster(runs):
    _, _, first, resumed = runs
    for outputs in (first, resumed):
        for p in range(2):
            assert f"JAX process {p}/2, 1 local / 2 global devices" in outputs[p]
    # Both processes computed the same (replicated) loss at every step.
    losses = [_console_losses(first[p]) for p in range(2)]
    assert sorted(losses[0]) == list(range(1, STEPS))
    assert losses[0] == losses[1]
    assert all(f"resumed from step {STEPS - 1}" in out for out in resumed)
    assert _console_losses(resumed[0]) == _console_losses(resumed[1])


def test_checkpoints_hold_each_process_data_position(runs):
    multi, _, _, _ = runs
    with Checkpointer(multi) as ckpt:
        assert ckpt.all_steps() == [STEPS - 1, STEPS]
    stored = json.loads((multi / "checkpoints" / str(STEPS) / "data" / "metadata").read_text())
    assert stored["kind"] == "per_process" and len(stored["value"]) == 2
    # Each process has taken STEPS batches of its own shard.
    assert [s["value"]["next_index"] for s in stored["value"]] == [STEPS, STEPS]


def test_two_processes_train_like_one(runs):
    multi, single, _, _ = runs
    for ema in (False, True):
        # Bitwise: the same SPMD program; a sum over two devices does not depend on order.
        jax.tree.map(np.testing.assert_array_equal,
                     jax.device_get(load_params(multi, ema=ema)),
                     jax.device_get(load_params(single, ema=ema)))
    records = {name: {r["step"]: r for r in loop.read_metrics(w) if r["split"] == "train"}
               for name, w in (("multi", multi), ("single", single))}
    assert sorted(records["multi"]) == sorted(records["single"]) == list(range(1, STEPS + 1))
    for step in records["multi"]:
        for key in ("loss", "grad_norm", "skipped"):
            assert records["multi"][step][key] == records["single"][step][key], (step, key)
    # Only process 0 writes metrics and TensorBoard files (one event file per run).
    assert len(list((multi / "tensorboard").glob("events.out.tfevents.*"))) == 2
