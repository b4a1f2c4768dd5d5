"""Two real processes (jax.distributed on localhost) read disjoint halves of the clips."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

pytest.importorskip("tensorflow_datasets")

from data_pipelines import toy
from data_pipelines.build_clips import BuildOptions, build_clips
from data_pipelines.loader import ClipDataset
from data_pipelines.toy.world import ToyConfig

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_get_disjoint_data_as_global_arrays(tmp_path):
    rlds = toy.build(tmp_path / "rlds", {"train": 2}, seed=1, config=ToyConfig(image_size=32))
    clips = tmp_path / "clips"
    build_clips(BuildOptions(rlds_dir=str(rlds), out=str(clips), schema="toy", size=(32, 32),
                             grid=4, horizon=4, history=2, future=2, tracker="ground_truth",
                             progress=False))
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.data_pipelines.loader_worker",
                               str(p), port, str(clips), str(tmp_path / f"out{p}.json")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for p in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    res = [json.loads((tmp_path / f"out{p}.json").read_text()) for p in range(2)]
    assert [r["process_index"] for r in res] == [0, 1]
    assert all(r["process_count"] == 2 and r["devices"] == 2 for r in res)
    assert res[0]["steps"] == res[1]["steps"] > 0  # equal step counts: no multi-host hang
    # Every batch is one global array of 4 clips, 2 from each process.
    assert all(r["global_shapes"] == [[4, 2, 32, 32, 3]] for r in res)
    seen = [{tuple(c) for c in r["clips"]} for r in res]
    assert len(seen[0]) == len(res[0]["clips"]) and len(seen[1]) == len(res[1]["clips"])
    assert not seen[0] & seen[1]
    n = len(ClipDataset(clips))
    assert len(seen[0] | seen[1]) == 2 * 2 * res[0]["steps"] >= n - 2 * 2 - 1
