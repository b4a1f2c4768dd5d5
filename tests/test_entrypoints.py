"""The README's main job (geometry demo), the geometry benchmark, CI wiring and lint."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_geometry_demo_writes_plot_and_accurate_summary(tmp_path):
    from experiments import geometry_demo

    summary = geometry_demo.main(["--out_dir", str(tmp_path), "--batch", "4"])
    png = tmp_path / "trajectory.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary  # JSON round-trips floats exactly
    assert summary["direct (flipjax)"]["rot_err_deg_median"] < 0.5


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
