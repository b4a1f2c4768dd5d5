"""The README's main command, shortened: the quickstart trains all four modules on one toy build
through the CLI and writes checkpoints, samples and a summary."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("tensorflow_datasets")

from experiments.configs import quickstart as quickstart_config
from experiments.trainers import quickstart
from flipjax.checkpoints import load_params

ROOT = pathlib.Path(__file__).resolve().parents[2]


def run_cli(workdir, *flags):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "experiments.train",
         "--config=experiments/configs/quickstart.py:runlocal", f"--workdir={workdir}",
         "--config.total_steps=3", "--config.batch_size=8", "--config.log_every=3",
         "--config.toy_episodes=3", "--config.toy_val_episodes=1", *flags],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow  # ~2 minutes on 2 cores (four models compiled); the fast test below covers
# the glue in the default run and each trainer has its own tests.
def test_quickstart_cli_trains_every_module(tmp_path):
    res = run_cli(tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    for i, module in enumerate(quickstart.MODULES, 1):
        assert f"quickstart [{i}/4] {module}" in res.stderr
    summary = json.loads((tmp_path / quickstart.SUMMARY_FILE).read_text())
    assert list(summary["modules"]) == list(quickstart.MODULES)
    for module, entry in summary["modules"].items():
        assert entry["step"] == 3, module
        assert entry["eval"] is not None and entry["eval"]["step"] == 3, module
        assert entry["samples"], f"{module} wrote no samples"
        assert all(pathlib.Path(p).exists() for p in entry["samples"])
        assert load_params(tmp_path / module)
    # The DiT trained on the quickstart autoencoder's latents at its measured scale.
    scale = summary["modules"]["autoencoder"]["eval"]["scale_for_unit_std"]
    assert scale > 0
    logged = re.search(r"on autoencoder latents .*scale ([0-9.e+-]+)\)", res.stderr)
    assert logged and float(logged.group(1)) == pytest.approx(scale, rel=1e-5)
    assert "codec_psnr" in summary["modules"]["dit"]["eval"]
    # One toy build serves every module.
    assert sorted(p.name for p in (tmp_path / "toy_data").iterdir()) == ["train", "val"]


def test_quickstart_in_process_two_modules(tmp_path):
    c = quickstart_config.get_config("runlocal")
    c.modules = "value,cvae"
    c.total_steps, c.batch_size, c.log_every = 2, 8, 2
    c.toy_episodes, c.toy_val_episodes = 3, 1
    summary = quickstart.train_and_evaluate(c, str(tmp_path))
    assert list(summary["modules"]) == ["cvae", "value"]
    on_disk = json.loads((tmp_path / quickstart.SUMMARY_FILE).read_text())
    assert on_disk == summary
    for module in ("cvae", "value"):
        entry = summary["modules"][module]
        assert entry["step"] == 2 and entry["eval"]["step"] == 2
        assert entry["samples"] and all(pathlib.Path(p).exists() for p in entry["samples"])
    assert 0.0 <= summary["modules"]["cvae"]["eval"]["prior_ltdr"] <= 1.0
    assert not (tmp_path / "autoencoder").exists() and not (tmp_path / "dit").exists()


def test_module_selection_and_errors(tmp_path):
    c = quickstart_config.get_config()
    assert c.trainer == "quickstart" and c.total_steps == 200
    assert quickstart.selected_modules(c) == list(quickstart.MODULES)
    c.modules = "value,cvae"
    assert quickstart.selected_modules(c) == ["cvae", "value"]
    c.modules = "cvae,policy"
    with pytest.raises(ValueError, match="policy"):
        quickstart.selected_modules(c)
    c.modules = "dit"
    with pytest.raises(ValueError, match="autoencoder"):
        quickstart.train_and_evaluate(c, str(tmp_path))
    # Failed scripts are play data for the action and dynamics modules, never value targets.
    c.modules, c.toy_failure_fraction = "cvae,value", 0.5
    with pytest.raises(ValueError, match=r"toy_failure_fraction=0\.5 with the value module"):
        quickstart.train_and_evaluate(c, str(tmp_path))
    assert not (tmp_path / "toy_data").exists()  # refused before any work


def test_readme_main_command_is_the_quickstart():
    readme = (ROOT / "README.md").read_text()
    assert ('pip install -e ".[train]" && python -m experiments.train '
            '--config=experiments/configs/quickstart.py --workdir=outputs/quickstart') in readme


def test_toy_failure_fraction_reaches_the_world(tmp_path, monkeypatch):
    from data_pipelines import toy
    from experiments.training import clips

    seen = {}

    def fake_build(out, episodes, *, seed, config):
        seen.update(episodes=episodes, config=config)
        raise RuntimeError("stop after the world config")

    monkeypatch.setattr(toy, "build", fake_build)
    c = quickstart_config.get_config("runlocal")
    c.toy_failure_fraction, c.toy_speed = 0.25, 0.03
    spec = clips.ClipSpec(image_size=(32, 32), horizon=4, history=2, future=0, text_dim=32)
    with pytest.raises(RuntimeError, match="stop after"):
        clips.build_toy_clips(c, "train", tmp_path / "train", spec)
    assert seen["episodes"] == {"train": c.toy_episodes}
    assert seen["config"].failure_fraction == 0.25 and seen["config"].speed == 0.03
    assert not (tmp_path / "train").exists()
    c.toy_failure_fraction = 1.5
    with pytest.raises(ValueError, match=r"toy_failure_fraction must lie in \[0, 1\], got 1.5"):
        clips.build_toy_clips(c, "train", tmp_path / "train", spec)
