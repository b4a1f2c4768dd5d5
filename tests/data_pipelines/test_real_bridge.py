"""Real BridgeData V2 episodes (tests/data/bridge_dataset_real, see tests/data/README.md) through
``python -m data_pipelines.build_clips``, checked against an independent tfds read.

The records were written by the rail-berkeley builder, not by this project, and carry the
quirks of the real thing: jpeg frames, a camera (image_3) that is all zeros, has_image_* flags
that are all False, is_last never True, float32 reward and discount.
"""

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")

from data_pipelines.build_clips import BLANK_CAMERA, BuildOptions, build_clips
from data_pipelines.loader import ClipDataset

from .fixtures import REAL_BRIDGE

ROOT = Path(__file__).resolve().parents[2]
BUILD_ARGS = ["--schema=bridge_dataset", "--text=dataset", "--size=64", "--grid=8",
              "--horizon=4", "--history=2", "--future=3", "--workers=1"]


def _run_build(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "data_pipelines.build_clips",
                           f"--rlds_dir={REAL_BRIDGE}", f"--out={out}", *BUILD_ARGS, *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def real_clips(tmp_path_factory):
    out = tmp_path_factory.mktemp("real_bridge") / "clips"
    run = _run_build(out)
    assert run.returncode == 0, run.stderr[-3000:]
    return out, run.stdout


@pytest.fixture(scope="module")
def tfds_episodes():
    """The 25 episodes as tfds itself decodes them (no flipjax code involved)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(REAL_BRIDGE))
    episodes = []
    for ep in tfds.as_numpy(builder.as_dataset(split="train", shuffle_files=False)):
        steps = list(ep["steps"])
        episodes.append({
            "frames": np.stack([s["observation"]["image_0"] for s in steps]),
            "image_3": np.stack([s["observation"]["image_3"] for s in steps]),
            "instruction": steps[0]["language_instruction"].decode(),
            "embedding": np.stack([s["language_embedding"] for s in steps]),
            "is_last": [bool(s["is_last"]) for s in steps],
            "has_image": [bool(ep["episode_metadata"][f"has_image_{i}"]) for i in range(4)],
        })
    return episodes


def test_the_records_have_the_quirks_of_the_real_dataset(tfds_episodes):
    assert len(tfds_episodes) == 25
    assert all(len(e["frames"]) == 10 for e in tfds_episodes)
    assert all(not any(e["is_last"]) for e in tfds_episodes)  # truncated episodes
    assert all(not any(e["has_image"]) for e in tfds_episodes)  # flags say no camera at all
    assert all(e["frames"].std() > 10 for e in tfds_episodes)  # ... but image_0 has content
    assert all(not e["image_3"].any() for e in tfds_episodes)  # and image_3 is all zeros


def test_build_clips_reads_every_real_episode(real_clips, tfds_episodes):
    out, stdout = real_clips
    m = json.loads((out / "manifest.json").read_text())
    c = m["counts"]
    assert c["episodes_in_split_range"] == 25 and c["episodes"] == 25
    assert c["clips"] == 250 and c["skipped"] == {} and c["frame_sizes_in"] == {"64x64": 25}
    assert c["empty_instruction_episodes"] == 0 and c["padded_short_episodes"] == 0
    assert "250 clips from 25 episodes" in stdout
    want = {e["instruction"] for e in tfds_episodes}
    names = json.loads((out / "text_instructions.json").read_text())
    assert len(want) == 4 and set(names) == want and m["text"]["instructions"] == len(names)
    # LK tracks on real frames: most points stay tracked over 3 steps, some move.
    assert m["statistics"]["visible_fraction"] > 0.7
    assert m["statistics"]["mean_displacement_px"] > 0.1


def test_clip_frames_text_and_episodes_equal_an_independent_tfds_read(real_clips,
                                                                      tfds_episodes):
    out, _ = real_clips
    ds = ClipDataset(out, history=1, future=0)
    index = ds.index_table()
    names = json.loads((out / "text_instructions.json").read_text())
    seen = defaultdict(list)
    for i in range(len(ds)):
        clip = ds[i]
        e, t = int(clip["episode_id"]), int(clip["frame_index"])
        want = tfds_episodes[e]
        seen[e].append(t)
        # Stored at its own size: the clip frame is the decoded jpeg, bit for bit.
        np.testing.assert_array_equal(clip["history"][-1], want["frames"][t])
        # --text=dataset: one token, the dataset's own 512-d embedding (stored as float16).
        assert clip["text_mask"].tolist() == [True]
        np.testing.assert_allclose(clip["text_tokens"][0], want["embedding"][t], rtol=1e-3,
                                   atol=1e-3)
        assert names[int(index[i, 4])] == want["instruction"]
    assert sorted(seen) == list(range(25))
    assert all(sorted(v) == list(range(10)) for v in seen.values())
    assert len(ds.index_table()) == 250


def test_an_all_zero_camera_is_refused_in_one_line(tmp_path):
    run = _run_build(tmp_path / "c", "--camera=image_3")
    assert run.returncode != 0
    lines = [ln for ln in run.stderr.splitlines() if ln.startswith("build_clips: error")]
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert ("camera 'image_3' (steps/observation/image_3) has no content: 25 of 25 episodes"
            in lines[0])
    assert "cameras with content in the first episode: ['image_0', 'image_1', 'image_2']" \
        in lines[0]
    # The manifest written before the refusal counts the reason.
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["counts"]["skipped"] == {BLANK_CAMERA: 25}


def test_other_real_cameras_build(tmp_path, tfds_episodes):
    m = build_clips(BuildOptions(rlds_dir=str(REAL_BRIDGE), out=str(tmp_path / "c"),
                                 camera="image_2", size=(64, 64), grid=4, horizon=3, history=1,
                                 future=0, tracker="dis", text="dataset", progress=False,
                                 max_episodes=3))
    assert m["counts"]["episodes"] == 3 and m["counts"]["skipped"] == {}
