"""benchmarks.pod: TPU slice names, the HLO collective count, and a real deviceless compile of
a tiny train step for a 4-chip v5e slice (needs jax[tpu]: the `pod` extra)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from benchmarks.pod_topology import CHIPS, collectives, parse_slice

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name, torus, chips", [
    ("v5p-128", "v5p:4x4x4", 64), ("v5p-8", "v5p:2x2x1", 4), ("v5p-256", "v5p:4x4x8", 128),
    ("v5e-16", "v5e:4x4", 16), ("v5e-256", "v5e:16x16", 256), ("v5e-8", "v5e:2x4", 8),
    ("v5e:2x2", "v5e:2x2", 4), ("v6e-64", "v6e:8x8", 64),
])
def test_slice_names_give_the_published_tori(name, torus, chips):
    s = parse_slice(name)
    assert (s.topology, s.chips) == (torus, chips)
    assert s.chip is CHIPS[name[:3]]


@pytest.mark.parametrize("name", ["v5p-127", "v5e-12", "v9-8", "v5e:4", "v5p:2x2", "tpu", ""])
def test_bad_slice_names_are_refused(name):
    with pytest.raises(ValueError, match="topology"):
        parse_slice(name)


def test_collectives_counts_ops_and_result_bytes():
    hlo = "\n".join([
        "  %all-reduce.1 = f32[1024]{0} all-reduce(f32[1024]{0} %p), replica_groups={}",
        "  %ag = bf16[8,64]{1,0} all-gather-start(bf16[1,64]{1,0} %x), dimensions={0}",
        "  %agd = bf16[8,64]{1,0} all-gather-done(%ag)",
        "  %t = (f32[2]{0}, s32[3]{0}) all-reduce(f32[2]{0} %a, s32[3]{0} %b)",
        "  %rs = f32[128]{0} reduce-scatter(f32[1024]{0} %g), dimensions={0}",
        "  %add = f32[1024]{0} add(f32[1024]{0} %a, f32[1024]{0} %b)",
    ])
    c = collectives(hlo)
    assert c["all-reduce"] == {"count": 2, "bytes": 1024 * 4 + 2 * 4 + 3 * 4}
    assert c["all-gather"] == {"count": 1, "bytes": 8 * 64 * 2}  # the -done op is not counted
    assert c["reduce-scatter"] == {"count": 1, "bytes": 128 * 4}
    assert c["all-to-all"] == c["collective-permute"] == {"count": 0, "bytes": 0}


def _compile(tmp_path, name, mesh):
    out = tmp_path / f"{name}.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.pod", "--config=experiments/configs/cvae.py:S,runlocal",
         "--topology=v5e-4", "--per_chip_batch=2", f"--mesh={mesh}", f"--out={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="jax[tpu] (the pod extra) is not installed")
def test_tiny_train_step_compiles_for_a_v5e_slice(tmp_path):
    dp = _compile(tmp_path, "data", "-1,1,1")
    assert dp["chips"] == 4 and dp["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert dp["global_batch"] == 8 and dp["fits"] is True
    params = dp["parameters"]
    # Data parallel: each chip holds params, Adam's two moments and the EMA in float32, and
    # the gradients are all-reduced once, exactly the parameters' float32 bytes (+ scalars).
    assert dp["hbm_breakdown_bytes"]["argument"] >= 4 * 4 * params
    assert 0 < dp["hbm_per_chip_bytes"] < 0.01 * dp["hbm_capacity_bytes"]
    ar = dp["collectives"]["all-reduce"]
    assert ar["count"] >= 1 and 4 * params <= ar["bytes"] <= 4 * params + 4096
    assert dp["flops_per_chip"] > 6 * params * 2  # forward + backward of 2 samples, at least
    assert 0 < dp["estimated_mfu"] <= 1 and dp["estimated_step_s"] > 0
    # FSDP over the same 4 chips: the state is split four ways, so the arguments shrink (not
    # four times: TPU tiles pad the tiny model's small arrays), and the parameters are
    # all-gathered where they are used.
    fs = _compile(tmp_path, "fsdp", "1,4,1")
    assert fs["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and fs["global_batch"] == 8
    assert fs["hbm_breakdown_bytes"]["argument"] < 0.8 * dp["hbm_breakdown_bytes"]["argument"]
    assert fs["collectives"]["all-gather"]["count"] > 0


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="jax[tpu] (the pod extra) is not installed")
def test_tiny_planner_compiles_for_a_v5e_slice(tmp_path):
    out = tmp_path / "plan.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.pod", "--config=experiments/configs/dit.py:S,runlocal",
         "--topology=v5e-4", "--planner", "--problems=8", "--horizon=2", "--sample_steps=2",
         f"--out={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    f = json.loads(out.read_text())
    assert f["mode"] == "planner" and f["per_chip_problems"] == 2 and f["fits"] is True
    assert f["flops_per_chip"] > 0 and 0 < f["hbm_per_chip_bytes"] < f["hbm_capacity_bytes"]
    # Problems are independent: nothing is exchanged between chips but the replicated inputs.
    assert f["collectives"]["all-gather"]["count"] == f["collectives"]["all-to-all"]["count"] == 0


def test_sweep_meshes_cover_the_slice_and_divide_the_model_widths():
    from benchmarks import pod_sweep
    for case in pod_sweep.cases(quick=False):
        mesh = next(f for f in case["flags"] if f.startswith("--mesh="))
        data, fsdp, tensor = (int(x) for x in mesh.split("=")[1].split(","))
        if data == -1:   # data parallel over every chip
            continue
        assert data * fsdp * tensor == pod_sweep.CHIPS[case["slice"]], case["name"]
        # FSDP splits the 384- and 768-wide parameters: over 256 chips it could not.
        assert 384 % fsdp == 0 and 768 % fsdp == 0, case["name"]
