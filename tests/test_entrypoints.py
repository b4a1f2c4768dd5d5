"""The README's commands (geometry and data demos, data CLIs), benchmarks, CI wiring, lint."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~30 s of compiles on 2 cores; its fits are tested in tests/geometry
def test_geometry_demo_writes_plot_and_accurate_summary(tmp_path):
    from experiments import geometry_demo

    summary = geometry_demo.main(["--out_dir", str(tmp_path), "--batch", "4"])
    png = tmp_path / "trajectory.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary  # JSON round-trips floats exactly
    assert summary["direct (flipjax)"]["rot_err_deg_median"] < 0.5


@pytest.mark.slow  # ~40 s on 2 cores; the geometry itself is tested in tests/geometry
def test_geometry_benchmark_quick_writes_figures(tmp_path):
    from benchmarks import geometry as bench

    out = tmp_path / "geo.json"
    bench.main(["--quick", "--out", str(out), "--avdc_sequences", "1"])
    res = json.loads(out.read_text())
    assert {t["batch"] for t in res["throughput"]} == {1, 64}
    assert all(t["seq_per_s"] > 0 and t["compile_s"] >= 0 for t in res["throughput"])
    assert res["accuracy"]["direct"]["rot_err_deg_median"] < 0.5
    assert res["avdc_baseline"]["speedup_batch1_latency"] > 1.0
    assert res["targets_met"]["rot_err_deg_median"] is True


def _ci_test_command() -> str:
    text = (ROOT / ".ci" / "run").read_text()
    return re.search(r"^TEST_COMMAND='(.*)'$", text, re.M).group(1)


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert _ci_test_command() in readme


@pytest.mark.skipif(shutil.which("ruff") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "ruff")), reason="ruff not installed")
def test_ruff_clean():
    ruff = shutil.which("ruff") or os.path.join(os.path.dirname(sys.executable), "ruff")
    res = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def _run(args, **kw):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    res = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=600, **kw)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def test_data_command_lines(tmp_path):
    """The README's data commands, as a user types them."""
    pytest.importorskip("tensorflow_datasets")
    _run(["data_pipelines.toy", "--out", str(tmp_path / "rlds"), "--episodes", "2",
          "--val_episodes", "1"])
    rlds = tmp_path / "rlds" / "toy_world" / "1.0.0"
    assert (rlds / "dataset_info.json").exists()
    res = _run(["data_pipelines.build_clips", f"--rlds_dir={rlds}", "--schema=toy",
                f"--out={tmp_path / 'clips'}", "--grid=8", "--workers=1", "--size=64",
                "--split=val"])
    assert "clips from 1 episodes in 1 shards" in res.stdout
    m = json.loads((tmp_path / "clips" / "manifest.json").read_text())
    assert m["options"]["grid"] == 8 and m["options"]["size"] == [64, 64]
    assert m["options"]["tracker"] == "lk" and m["layout"]["num_points"] == 64
    bad = subprocess.run([sys.executable, "-m", "data_pipelines.build_clips",
                          f"--rlds_dir={rlds}", "--schema=bridge_dataset",
                          f"--out={tmp_path / 'c2'}", "--workers=1"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    # One line naming the layout the data has and the --schema to use, not a traceback.
    assert bad.returncode != 0 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    assert bad.stderr.strip().splitlines()[-1].startswith(
        "build_clips: error: RLDS dataset 'toy_world' has the layout of --schema=toy (")
    assert "use --schema=toy or --schema=auto" in bad.stderr


def test_data_demo_runs_end_to_end(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from experiments import data_demo

    s = data_demo.main(["--out_dir", str(tmp_path), "--episodes", "2", "--workers", "1"])
    assert s["batch_shapes"]["history"] == [8, 16, 128, 128, 3]
    assert s["batch_shapes"]["tracks"] == [8, 529, 16, 2]
    assert s["lk_vs_ground_truth_px"]["median_visible"] < 1.0
    assert (tmp_path / "tracks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_data_demo_on_real_bridge_episodes(tmp_path):
    """The README's picture of real tracks on real frames: the demo on the 25 real episodes."""
    pytest.importorskip("tensorflow_datasets")
    from experiments import data_demo

    real = ROOT / "tests" / "data" / "bridge_dataset_real" / "bridge_dataset" / "1.0.0"
    s = data_demo.main(["--out_dir", str(tmp_path), "--rlds_dir", str(real), "--size", "64",
                        "--grid", "8", "--horizon", "4", "--workers", "1"])
    assert (s["schema"], s["episodes"], s["clips"], s["skipped"]) == ("bridge_dataset", 25,
                                                                       250, {})
    assert s["batch_shapes"]["text_tokens"] == [8, 1, 512]  # the dataset's own embedding
    assert s["batch_shapes"]["tracks"] == [8, 64, 4, 2]
    assert (tmp_path / "tracks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # ~20 s; building, tracking and loading are tested in tests/data_pipelines
def test_data_benchmark_quick_writes_figures(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from benchmarks import data as bench

    out = tmp_path / "data.json"
    bench.main(["--quick", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["build_clips"]["lk_1_worker"]["frames_per_s"] > 0
    assert res["bytes_per_clip"]["ratio_official_issue_over_flipjax"] > 3
    assert res["tracking_accuracy"]["lk"]["median_px_visible"] < 1.0
    assert res["loader"]["numpy_threads2_clips_per_s"] > 0


@pytest.mark.slow  # ~20 s; the parameter counts are tested in tests/models
def test_models_benchmark_quick_writes_figures(tmp_path):
    from benchmarks import models as bench

    out = tmp_path / "models.json"
    bench.main(["--quick", "--out", str(out)])
    res = json.loads(out.read_text())
    dit = res["dit"]["S"]
    assert dit["shared"]["params"] == 31_267_232 and res["cvae"]["S"]["params"] == 14_939_600
    assert dit["shared"]["forward_gflop_per_sample"] <= 80
    assert dit["concat_over_shared_flops"] > 3  # the official replication costs far more
    assert res["param_counts"]["L"] == {"dit": 399_156_256, "cvae": 72_979_280}
    assert res["targets_met"]["dit_s_forward_gflop_per_sample"] is True


@pytest.mark.slow  # a trainer subprocess and a DiT compile: ~1 minute on 2 cores
def test_train_benchmark_quick_writes_figures(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from benchmarks import train as bench

    out = tmp_path / "train.json"
    bench.main(["--quick", "--only", "cvae_tiny", "--out", str(out)])
    res = json.loads(out.read_text())
    run = res["trainers"]["cvae_tiny"]
    assert run["steps_per_s"] > 0 and 0.0 <= run["input_wait_fraction"] <= 1.0
    assert run["peak_host_memory_mb"] > 100  # a JAX process; the child's own ru_maxrss
    step = res["dit_step"]["tiny_fp32"]
    # Under the test's 8 devices XLA counts one device's share; the total is 8 shares.
    assert step["flops_per_step"] == pytest.approx(step["devices"]
                                                   * step["flops_per_step_per_device"])
    assert step["flops_per_step"] > 3e9  # ~5.1e9 for the tiny DiT step at batch 8
    assert step["mfu"] is None  # no peak FLOP/s for CPUs
    assert "accelerator" in res["targets_met"]
