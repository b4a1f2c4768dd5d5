"""Real data through training: clips built from the 25 real BridgeData V2 episodes in
``tests/data/bridge_dataset_real`` (64x64 frames, LK tracks, the dataset's 512-d sentence
embedding as the one text token) train the tiny FlowCVAE (with a resume) and the tiny VideoDiT
for a few steps through ``python -m experiments.train``."""

import math
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("grain")

from data_pipelines.build_clips import BuildOptions, build_clips
from data_pipelines.loader import ClipDataset
from experiments.training import loop
from flipjax.checkpoints import Checkpointer, load_params
from tests.experiments.helpers import BATCH

ROOT = pathlib.Path(__file__).resolve().parents[2]
RLDS = ROOT / "tests" / "data" / "bridge_dataset_real" / "bridge_dataset" / "1.0.0"
EPISODES, STEPS = 25, 10  # the stored episodes and their length
SIZE, GRID = 64, 8  # the stored frame size (no resize) and a small query grid
HISTORY, HORIZON = 2, 4  # the :runlocal models' history frames and track length
TEXT_DIM = 512  # BridgeData's steps/language_embedding
# The training runs use one CPU device, not conftest's 8: the real-data path is the point here
# (sharding is covered by the toy-data tests), and on 8 virtual devices orbax's first save in
# every process spends 5-10 s moving the state to the host, a third of this module's time.
DEVICES = 1


@pytest.fixture(scope="module")
def bridge_clips(tmp_path_factory):
    """(clip directory, manifest) of every real episode, built once for this module."""
    out = tmp_path_factory.mktemp("bridge_real") / "clips"
    manifest = build_clips(BuildOptions(
        rlds_dir=str(RLDS), out=str(out), schema="bridge_dataset", split="train",
        size=(SIZE, SIZE), grid=GRID, horizon=HORIZON, history=HISTORY, future=HORIZON - 1,
        tracker="lk", text="dataset", workers=1, progress=False))
    return out, manifest


def train(config, workdir, clips, total_steps, *overrides):
    """Runs ``python -m experiments.train`` with ``config`` (``family.py:variant``) and
    ``,runlocal`` on ``clips``
    (never toy data: a missing manifest must fail, not silently build toy clips there).

    Returns:
      The subprocess's stderr (absl logs there).
    """
    xla_flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                       os.environ.get("XLA_FLAGS", ""))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{xla_flags} --xla_force_host_platform_device_count={DEVICES}".strip()}
    res = subprocess.run(
        [sys.executable, "-m", "experiments.train",
         f"--config=experiments/configs/{config},runlocal", f"--workdir={workdir}",
         f"--config.data_dir={clips}", f"--config.eval_data_dir={clips}",
         "--config.build_toy_data_if_missing=False",
         f"--config.total_steps={total_steps}", f"--config.batch_size={BATCH}",
         "--config.log_every=1", "--config.checkpoint_every=2", "--config.eval_every=0",
         "--config.eval_batches=0", f"--config.model.history={HISTORY}",
         f"--config.model.flow_horizon={HORIZON}", *overrides],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stderr


def train_records(workdir):
    return [r for r in loop.read_metrics(workdir) if r["split"] == "train"]


def test_clips_hold_the_real_episodes(bridge_clips):
    out, m = bridge_clips
    assert m["counts"]["episodes"] == EPISODES and m["counts"]["skipped_total"] == 0
    assert m["counts"]["clips"] == EPISODES * STEPS
    assert m["counts"]["frame_sizes_in"] == {f"{SIZE}x{SIZE}": EPISODES}
    lay = m["layout"]
    assert (lay["height"], lay["width"], lay["num_points"], lay["horizon"]) == (
        SIZE, SIZE, GRID * GRID, HORIZON)
    assert (lay["text_tokens"], lay["text_dim"]) == (1, TEXT_DIM)
    # LK keeps most real points and sees the arm move (real motion, unlike a still video).
    assert 0.5 < m["statistics"]["visible_fraction"] <= 1.0
    assert m["statistics"]["mean_displacement_px"] > 0.05
    # The first clip is episode 0's first frame, unchanged (64x64 in, 64x64 out), and its
    # text token is the episode's own language embedding (stored as float16).
    from data_pipelines.rlds import open_builder, read_episodes
    from data_pipelines.schemas import get_schema

    (ep,) = read_episodes(open_builder(str(RLDS)), get_schema("bridge_dataset"), "train", 0, 1,
                          embedding=True)
    clip = ClipDataset(out, history=HISTORY, future=HORIZON - 1)[0]
    np.testing.assert_array_equal(clip["history"][-1], ep.frames[0])
    np.testing.assert_array_equal(clip["future"], ep.frames[1:HORIZON])
    assert clip["text_mask"].tolist() == [True]
    np.testing.assert_allclose(clip["text_tokens"][0], ep.embedding, atol=1e-3, rtol=1e-3)
    assert np.abs(ep.embedding).max() > 0


def test_cvae_trains_checkpoints_and_resumes_on_real_clips(bridge_clips, tmp_path):
    clips_dir, _ = bridge_clips
    workdir = tmp_path / "cvae"
    overrides = (f"--config.model.img_size=({SIZE}, {SIZE})",
                 f"--config.model.language_dim={TEXT_DIM}")
    log = train("cvae.py:S", workdir, clips_dir, 4, *overrides)
    assert f"{EPISODES * STEPS} training clips in {clips_dir}" in log
    assert not (workdir / "toy_data").exists()
    with Checkpointer(workdir) as ckpt:
        assert ckpt.all_steps() == [2, 4]
    assert (workdir / "checkpoints" / "4").is_dir()
    first = train_records(workdir)
    assert [r["step"] for r in first] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["ade"]) for r in first)
    # The model reads the 512-d sentence embedding.
    assert load_params(workdir)["language_encoder"]["kernel"].shape[0] == TEXT_DIM

    log = train("cvae.py:S", workdir, clips_dir, 6, *overrides)
    assert f"resumed from step 4 of {workdir}" in log
    records = train_records(workdir)
    assert records[:4] == first  # the resumed run appends, it does not retrain steps 1-4
    assert [r["step"] for r in records[4:]] == [5, 6]
    assert all(math.isfinite(r["loss"]) for r in records)
    with Checkpointer(workdir) as ckpt:
        assert ckpt.all_steps() == [2, 4, 6]
    # Training on the real clips moves the parameters and lowers the loss.
    before, after = load_params(workdir, step=4), load_params(workdir, step=6)
    assert not np.array_equal(before["language_encoder"]["kernel"],
                              after["language_encoder"]["kernel"])
    assert records[-1]["loss"] < records[0]["loss"]


@pytest.mark.slow  # covered by the CVAE run on the same real clips and the DiT trainer's toy run
def test_dit_trains_and_checkpoints_on_real_clips(bridge_clips, tmp_path):
    clips_dir, _ = bridge_clips
    workdir = tmp_path / "dit"
    log = train("dit.py:S", workdir, clips_dir, 4, f"--config.image_size=({SIZE}, {SIZE})",
                f"--config.model.text_dim={TEXT_DIM}", "--config.model.text_layers=1",
                "--config.codec.kind=pixels")
    assert f"{EPISODES * STEPS} training clips in {clips_dir}" in log
    assert not (workdir / "toy_data").exists()
    with Checkpointer(workdir) as ckpt:
        assert ckpt.all_steps() == [2, 4]
    records = train_records(workdir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    # Zero-initialised output layer: eps = 0 at first, so the MSE starts near E[noise^2] = 1.
    assert 0.5 < records[0]["mse"] < 1.5
    params = load_params(workdir)
    assert params["language_encoder"]["compress_fn"]["kernel"].shape[0] == TEXT_DIM
    # Pixel latents of 64x64 frames at the :runlocal factor 4: 16x16x48, 96 outputs (learned
    # sigma) per patch-1 token.
    assert params["final_layer"]["linear"]["kernel"].shape[-1] == 96
