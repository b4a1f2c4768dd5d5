"""RLDS layouts (BridgeData V2, OXE Bridge, LIBERO, generic) -> episodes -> clips."""

import json
import re

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")

from data_pipelines import records
from data_pipelines.build_clips import BLANK_CAMERA, BuildOptions, build_clips
from data_pipelines.frames import plan_frames
from data_pipelines.loader import ClipDataset
from data_pipelines.rlds import open_builder, read_episodes
from data_pipelines.schemas import get_schema

from . import fixtures


@pytest.fixture(scope="module")
def rlds_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("rlds")
    return {
        "bridge_dataset": fixtures.write_bridge_dataset(
            root, lengths=(6, 1, 3), instructions=["put the cup in the sink", "", "  "]),
        "bridge": fixtures.write_bridge_oxe(root),
        "libero": fixtures.write_libero(root),
    }


def _options(rlds_dir, out, **kw):
    base = dict(rlds_dir=str(rlds_dir), out=str(out), grid=4, horizon=4, history=3, future=2,
                text_dim=16, text_max_tokens=16, progress=False, workers=1)
    base.update(kw)
    return BuildOptions(**base)


def test_bridge_dataset_layout_reads(rlds_root):
    b = open_builder(rlds_root["bridge_dataset"])
    eps = list(read_episodes(b, get_schema("bridge_dataset"), "train", 0, 3, embedding=True))
    assert [e.index for e in eps] == [0, 1, 2]
    assert eps[0].frames.shape == (6, 256, 256, 3) and eps[0].frames.dtype == np.uint8
    assert eps[0].instruction == "put the cup in the sink"
    assert eps[1].instruction == "" and eps[2].instruction == ""  # whitespace is empty
    assert eps[0].embedding.shape == (512,)
    # JPEG is lossy: the column ramp survives to within a few levels.
    want = fixtures.pattern_frame(256, 256, 0, seed=0)
    assert np.abs(eps[0].frames[0].astype(int) - want).mean() < 4


def test_oxe_bridge_layout_reads_and_crops(rlds_root, tmp_path):
    b = open_builder(rlds_root["bridge"])
    eps = list(read_episodes(b, get_schema("bridge"), "train", 0, 2, embedding=True))
    assert eps[1].frames.shape == (4, 480, 640, 3)
    assert eps[1].instruction == "open drawer 1"
    np.testing.assert_array_equal(eps[1].embedding, np.full(512, 1, np.float32))
    m = build_clips(_options(rlds_root["bridge"], tmp_path / "c", schema="bridge",
                             text="dataset", size=(64, 64)))
    assert m["counts"]["frame_sizes_in"] == {"480x640": 2}
    ds = ClipDataset(tmp_path / "c")
    clip = ds[0]
    assert clip["history"].shape == (3, 64, 64, 3)
    assert clip["text_tokens"].shape == (1, 512) and clip["text_mask"].tolist() == [True]
    # Centre crop keeps columns 80..559: the red ramp at the left edge starts near 80/639.
    red = clip["history"][-1, :, :, 0].astype(float)
    assert abs(red[:, 0].mean() - 255 * 80.5 / 639) < 6
    assert abs(red[:, -1].mean() - 255 * 558.5 / 639) < 6


def _orientation_errors(got: np.ndarray, view: np.ndarray) -> dict[str, float]:
    """Mean absolute error of the ramps (R: columns, G: rows) of ``got`` against those of the
    camera view and its three flips."""
    flips = {"upright": view, "mirrored": view[:, ::-1], "upside_down": view[::-1],
             "rotated_180": view[::-1, ::-1]}
    return {k: float(np.abs(got[..., :2].astype(int) - v[..., :2].astype(int)).mean())
            for k, v in flips.items()}


def test_oxe_bridge_from_tfds_fake_data_reads(tmp_path):
    """The OXE layout filled and stored by tfds alone (random values of the published spec)."""
    import tensorflow_datasets as tfds

    d = fixtures.write_bridge_oxe_fake(tmp_path / "rlds")
    want = []
    for ep in tfds.as_numpy(tfds.builder_from_directory(str(d)).as_dataset(
            split="train", shuffle_files=False)):
        obs = [s["observation"] for s in ep["steps"]]
        want.append((np.stack([o["image"] for o in obs]),
                     obs[0]["natural_language_instruction"].decode().strip(),
                     obs[0]["natural_language_embedding"]))
    eps = list(read_episodes(open_builder(d), get_schema("bridge"), "train", 0, 2,
                             embedding=True))
    assert len(eps) == len(want) == 2
    for ep, (frames, text, emb) in zip(eps, want, strict=True):
        assert ep.frames.shape == (3, 480, 640, 3)
        np.testing.assert_array_equal(ep.frames, frames)
        assert ep.instruction == text
        np.testing.assert_array_equal(ep.embedding, emb)
    m = build_clips(_options(d, tmp_path / "c", schema="auto", text="dataset", size=(32, 32),
                             tracker="dis"))
    assert m["options"]["schema"] == "bridge" and m["counts"]["episodes"] == 2
    assert m["counts"]["frame_sizes_in"] == {"480x640": 2}


def test_the_name_bridge_does_not_decide_the_layout(tmp_path):
    """tfds catalogues call the rail-berkeley layout 'bridge' too: keys decide, never a crash."""
    d = fixtures.write_bridge_dataset(tmp_path / "rlds", lengths=(3,), size=(32, 32),
                                      name="bridge")
    with pytest.raises(ValueError, match=r"RLDS dataset 'bridge' has the layout of "
                                         r"--schema=bridge_dataset \(steps/observation/image_0, "
                                         r".*not that of --schema=bridge \(steps/observation/"
                                         r"image, .*use --schema=bridge_dataset or --schema=auto"):
        build_clips(_options(d, tmp_path / "c", schema="bridge"))
    m = build_clips(_options(d, tmp_path / "c2", schema="auto", size=(32, 32), tracker="dis"))
    assert m["options"]["schema"] == "bridge_dataset" and m["counts"]["episodes"] == 1
    oxe = fixtures.write_bridge_oxe(tmp_path / "oxe", lengths=(2,))
    with pytest.raises(ValueError, match=r"has the layout of --schema=bridge .*use "
                                         r"--schema=bridge"):
        build_clips(_options(oxe, tmp_path / "c3", schema="bridge_dataset"))
    with pytest.raises(ValueError, match=r"--schema=auto: .*has no known layout.*use "
                                         r"--schema=generic"):
        build_clips(_options(fixtures.write_generic(tmp_path / "g", [[np.zeros((8, 8, 3),
                                                                             np.uint8)] * 2],
                                                    ["a"]), tmp_path / "c4", schema="auto"))


def test_libero_comes_out_in_the_camera_view(rlds_root, tmp_path):
    """The published LIBERO RLDS stores robosuite's upside-down render turned by 180 degrees
    (upright, mirrored); clips must show the camera view. Fails with the old rotate_180."""
    b = open_builder(rlds_root["libero"])
    ep = next(read_episodes(b, get_schema("libero"), "train", 0, 1))
    assert ep.frames.shape == (5, 256, 256, 3)
    view = fixtures.pattern_frame(256, 256, 0, seed=0)  # R: column ramp, G: row ramp
    # What is stored is the mirrored view (jpeg: a few levels of error).
    stored = _orientation_errors(ep.frames[0], view)
    assert stored["mirrored"] < 4 and min(stored.values()) == stored["mirrored"]
    m = build_clips(_options(rlds_root["libero"], tmp_path / "c", schema="libero", size=(64, 64),
                             tracker="dis"))
    clip = ClipDataset(tmp_path / "c", history=1, future=0)[0]
    small = fixtures.pattern_frame(64, 64, 0, seed=0)  # resized ramps are the same ramps
    errors = _orientation_errors(clip["history"][-1], small)
    assert errors["upright"] < 6, errors
    assert all(errors[k] > 40 for k in ("mirrored", "upside_down", "rotated_180")), errors
    assert m["schema"]["orientation"] == "mirror_lr"
    # Points map with the frames: the stored top-left pixel is the view's top-right one.
    tf = plan_frames((256, 256), (256, 256), orientation=get_schema("libero").orientation)
    np.testing.assert_allclose(tf.points(np.array([0.0, 0.0])), [255.0, 0.0])
    np.testing.assert_array_equal(tf(ep.frames[:1])[0][0, 255], ep.frames[0, 0, 0])


def test_orientation_is_a_setting_for_every_schema(rlds_root, tmp_path):
    with pytest.raises(ValueError, match=r"orientation must be one of \('none', 'rotate_180', "
                                         r"'mirror_lr', 'flip_ud'\), got 'upside'"):
        get_schema("generic", image_key="steps/observation/image", language_key=None,
                   orientation="upside")
    with pytest.raises(ValueError, match="--orientation must be one of"):
        build_clips(_options(rlds_root["libero"], tmp_path / "c0", schema="libero",
                             orientation="rot180"))
    # The generic schema reads LIBERO when told its orientation; an override applies to a
    # named schema too, and the manifest records what was used.
    m = build_clips(_options(rlds_root["libero"], tmp_path / "c", schema="generic",
                             image_key="steps/observation/image", orientation="mirror_lr",
                             language_key="steps/language_instruction", size=(64, 64),
                             tracker="dis"))
    assert m["schema"]["orientation"] == "mirror_lr"
    want = ClipDataset(tmp_path / "c", history=1, future=0)[0]["history"]
    m = build_clips(_options(rlds_root["libero"], tmp_path / "c2", schema="libero",
                             orientation="none", size=(64, 64), tracker="dis"))
    assert m["schema"]["orientation"] == "none"
    got = ClipDataset(tmp_path / "c2", history=1, future=0)[0]["history"]
    np.testing.assert_array_equal(got, want[:, :, ::-1])


def test_missing_key_lists_dataset_keys(rlds_root, tmp_path):
    with pytest.raises(ValueError, match=r"has the layout of --schema=libero .*not that of "
                                         r"--schema=bridge_dataset .*use --schema=libero"):
        build_clips(_options(rlds_root["libero"], tmp_path / "c", schema="bridge_dataset"))
    with pytest.raises(ValueError, match=r"no key.*steps/observation/rgb.*keys it has.*"
                                         r"steps/observation/wrist_image"):
        build_clips(_options(rlds_root["libero"], tmp_path / "c1", schema="generic",
                             image_key="steps/observation/rgb"))
    with pytest.raises(ValueError, match="has no camera 'image_7'"):
        build_clips(_options(rlds_root["bridge_dataset"], tmp_path / "c2", camera="image_7"))
    with pytest.raises(ValueError, match="no dataset language embedding"):
        build_clips(_options(rlds_root["libero"], tmp_path / "c3", schema="libero",
                             text="dataset"))
    with pytest.raises(ValueError, match="unknown schema"):
        build_clips(_options(rlds_root["libero"], tmp_path / "c4", schema="nope"))


def test_short_episode_and_empty_instruction(rlds_root, tmp_path):
    out = tmp_path / "c"
    m = build_clips(_options(rlds_root["bridge_dataset"], out, size=(32, 32)))
    c = m["counts"]
    # Episode 1 has a single frame: skipped and counted; episode 2 (3 frames < horizon 4) is
    # padded; episodes 1 and 2 have no instruction but only episode 2 is kept.
    assert c["skipped"] == {"short episode (< 2 frames)": 1}
    assert c["episodes"] == 2 and c["clips"] == 6 + 3
    assert c["padded_short_episodes"] == 1 and c["empty_instruction_episodes"] == 1
    ds = ClipDataset(out)
    assert len(ds) == 9
    by_episode = {}
    for i in range(len(ds)):
        clip = ds[i]
        by_episode.setdefault(int(clip["episode_id"]), []).append(clip)
    assert sorted(by_episode) == [0, 2]
    assert all(cl["text_mask"].any() for cl in by_episode[0])
    for cl in by_episode[2]:
        assert not cl["text_mask"].any()  # masked, not a zero vector posing as text
        np.testing.assert_array_equal(cl["text_tokens"], 0)
    # Padding: the last clip of episode 2 repeats its last frame in the future and the track
    # windows past the end hold still.
    last = by_episode[2][-1]
    assert last["frame_index"] == 2
    for k in range(2):
        np.testing.assert_array_equal(last["future"][k], last["history"][-1])
    np.testing.assert_allclose(last["tracks"][:, 1:], last["tracks"][:, :1].repeat(3, 1))
    first = by_episode[0][0]
    np.testing.assert_array_equal(first["history"][0], first["history"][-1])


def test_cut_instructions_are_counted_and_warned(rlds_root, tmp_path):
    from data_pipelines.text import TextTruncationWarning

    with pytest.warns(TextTruncationWarning, match=r"--text=hash keeps 4 tokens per instruction: "
                                                   r"1 instruction\(s\) of 1 episode\(s\) were "
                                                   r"cut, e.g. 'put the cup in the sink' needs 6"):
        m = build_clips(_options(rlds_root["bridge_dataset"], tmp_path / "c", size=(32, 32),
                                 text_max_tokens=4, tracker="dis"))
    c = m["counts"]
    assert (c["truncated_instruction_episodes"], c["truncated_instructions"]) == (1, 1)
    assert c["truncated_examples"] == ["'put the cup in the sink' needs 6 tokens"]
    m = build_clips(_options(rlds_root["bridge_dataset"], tmp_path / "c2", size=(32, 32),
                             text_max_tokens=6, tracker="dis"))
    assert m["counts"]["truncated_instructions"] == 0


def test_wrong_image_size_and_bad_channels(tmp_path):
    rng = np.random.default_rng(0)
    good = [rng.integers(0, 255, (40, 60, 3), dtype=np.uint8) for _ in range(3)]
    odd = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    gray = [rng.integers(0, 255, (32, 32, 1), dtype=np.uint8) for _ in range(3)]
    blank = [np.zeros((40, 60, 3), np.uint8) for _ in range(3)]  # a camera that was absent
    d = fixtures.write_generic(tmp_path, [good, odd, gray, blank], ["a", "b", "c", "d"])
    opts = _options(d, tmp_path / "c", schema="generic", image_key="steps/observation/rgb",
                    language_key="steps/instruction", size=(16, 16), aspect="pad")
    m = build_clips(opts)
    c = m["counts"]
    # Other sizes are resized to the configured size; a non-RGB episode and one whose camera
    # has no content are skipped with their reasons.
    assert c["frame_sizes_in"] == {"40x60": 1, "64x64": 1}
    assert c["skipped"] == {"image shape [32, 32, 1] is not [H W 3]": 1, BLANK_CAMERA: 1}
    (example,) = c["skipped_examples"][BLANK_CAMERA]  # tfds orders records by key hash
    assert re.fullmatch(r"episode [0-3]: value 0", example)
    ds = ClipDataset(tmp_path / "c")
    assert {ds[i]["history"].shape for i in range(len(ds))} == {(3, 16, 16, 3)}
    with pytest.raises(ValueError, match="needs --image_key"):
        build_clips(_options(d, tmp_path / "c2", schema="generic"))


def test_corrupt_shard_is_detected_and_rebuilt(rlds_root, tmp_path):
    out = tmp_path / "c"
    opts = _options(rlds_root["bridge_dataset"], out, size=(32, 32), episodes_per_shard=1)
    m = build_clips(opts)
    assert len(m["shards"]) == 3 and m["timing"]["resumed_shards"] == 0
    frames = records.shard_files(records.shard_stem(out, 0))["frames"]
    frames.write_bytes(frames.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"clip shard file .*clips-00000.frames.array_record "
                                         r"is corrupt"):
        ClipDataset(out)
    # Same size, flipped bytes: only the CRC notices.
    m = build_clips(opts)
    assert m["timing"]["resumed_shards"] == 2  # only the bad shard was rebuilt
    data = bytearray(frames.read_bytes())
    data[-5000] ^= 0xFF
    frames.write_bytes(bytes(data))
    ClipDataset(out)  # sizes match: fast open passes
    with pytest.raises(ValueError, match="CRC32 mismatch"):
        ClipDataset(out, verify=True)
    build_clips(opts)
    ClipDataset(out, verify=True)


def test_changed_options_refuse_to_mix(rlds_root, tmp_path):
    out = tmp_path / "c"
    build_clips(_options(rlds_root["bridge_dataset"], out, size=(32, 32)))
    with pytest.raises(ValueError, match=r"built with other options.*grid"):
        build_clips(_options(rlds_root["bridge_dataset"], out, size=(32, 32), grid=5))
    saved = json.loads((out / "build_options.json").read_text())
    assert saved["grid"] == 4
