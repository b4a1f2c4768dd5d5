"""Meta-World demos: geometry against the simulator, RLDS -> build_clips, cache, resume, CLI."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

# Sets MUJOCO_GL (imports nothing from the simulator): must precede the first mujoco import.
from data_pipelines.metaworld import sim
from tests.sim_support import require_sim

pytest.importorskip("tensorflow_datasets")
require_sim()
import mujoco  # noqa: E402 (after require_sim: skipped without the sim extra)

from data_pipelines import metaworld as mw  # noqa: E402
from data_pipelines.build_clips import BuildOptions, build_clips  # noqa: E402
from data_pipelines.loader import ClipDataset  # noqa: E402
from data_pipelines.metaworld import demos as metaworld_demos  # noqa: E402
from data_pipelines.rlds import open_builder, read_episodes  # noqa: E402
from data_pipelines.schemas import METAWORLD, get_schema  # noqa: E402

TASK, CAMERA, SEED, VAL_SEED = "button-press", "corner", 0, 1
SMALL = {"image_size": 64, "max_steps": 30, "num_points": 32}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(build root, RLDS dir) of one short button-press rollout per split."""
    root = tmp_path_factory.mktemp("mw")
    path = mw.build(root, [TASK], [CAMERA], [SEED], val_seeds=[VAL_SEED], workers=1,
                    progress=False, **SMALL)
    return root, path


@pytest.fixture(scope="module")
def demo(built):
    return mw.load_demo(mw.cache_path(built[0], TASK, SEED))[CAMERA]


def _cast_rays(model, data, K, world_from_camera, size):
    """MuJoCo's own ray casts through every pixel centre: body id int[H W] (0: no hit) and
    z-depth float[H W] (the ray direction has unit z in the camera frame)."""
    v, u = np.mgrid[:size, :size]
    dirs = np.stack([u, v, np.ones_like(u)], -1).reshape(-1, 3) @ np.linalg.inv(K).T \
        @ world_from_camera[:3, :3].T
    origin = np.ascontiguousarray(world_from_camera[:3, 3])
    groups = np.array([1, 1, 1, 0, 0, 0], np.uint8)  # the groups MuJoCo renders by default
    body, dist, geom = np.zeros(len(dirs), int), np.full(len(dirs), np.inf), np.zeros(1, np.int32)
    for i, vec in enumerate(dirs):
        x = mujoco.mj_ray(model, data, origin, np.ascontiguousarray(vec), groups, 1, -1, geom)
        if x >= 0:
            body[i], dist[i] = model.geom_bodyid[geom[0]], x
    return body.reshape(size, size), dist.reshape(size, size)


@pytest.fixture(scope="module")
def replay(demo):
    """The stored actions replayed in a fresh env: obs float[T 39] and world_from_body
    float[T B 4 4] straight from MuJoCo, ray casts {step: (body, depth)} at the first and last
    step, and the model."""
    env = sim.make_env(TASK, SEED)
    K = demo["intrinsics"].astype(np.float64)
    W = demo["world_from_camera"].astype(np.float64)
    size = demo["image"].shape[1]
    obs, poses = [env.last_obs], [sim.body_poses(env.data)]
    rays = {0: _cast_rays(env.model, env.data, K, W, size)}
    for a in demo["action"][:-1]:
        o, *_ = env.step(a)
        obs.append(o)
        poses.append(sim.body_poses(env.data))
    rays[len(obs) - 1] = _cast_rays(env.model, env.data, K, W, size)
    model = env.model
    env.close()
    return np.asarray(obs), np.asarray(poses), rays, model


def _project(K, cam):
    return (cam @ np.asarray(K, np.float64).T)[..., :2] / cam[..., 2:]


def test_shapes_dtypes_and_points(demo, replay):
    t_len, n, s = 31, SMALL["num_points"], SMALL["image_size"]
    want = {"image": ((t_len, s, s, 3), np.uint8), "depth": ((t_len, s, s), np.float32),
            "segmentation": ((t_len, s, s), np.uint8), "object_mask": ((t_len, s, s), np.bool_),
            "state": ((t_len, 39), np.float32), "action": ((t_len, 4), np.float32),
            "reward": ((t_len,), np.float32), "intrinsics": ((3, 3), np.float32),
            "world_from_camera": ((4, 4), np.float32)}
    for part in ("object", "gripper"):
        want[f"{part}_tracks"] = ((t_len, n, 2), np.float32)
        want[f"{part}_visible"] = ((t_len, n), np.bool_)
        want[f"{part}_point_bodies"] = ((n,), np.int32)
    for k, (shape, dtype) in want.items():
        assert demo[k].shape == shape and demo[k].dtype == dtype, (k, demo[k].shape)
    nbody = demo["object_poses"].shape[1]
    assert demo["object_poses"].shape == (t_len, nbody, 4, 4) and nbody > 30
    assert demo["segmentation"].max() < nbody
    assert (demo["task"], demo["camera"], demo["seed"], demo["num_steps"]) == (TASK, CAMERA,
                                                                                SEED, t_len)
    assert demo["instruction"] == sim.INSTRUCTIONS[TASK]
    assert demo["success"] is False  # 30 actions are too few to press the button
    np.testing.assert_array_equal(demo["action"][-1], 0)
    assert np.abs(demo["action"][:-1]).max() <= 1 and np.abs(demo["action"][:-1]).max() > 0.1
    # The mask is the target body's pixels; points start on distinct pixels of their part.
    seg0 = demo["segmentation"][0]
    assert np.all(seg0[demo["object_mask"][0]] == demo["target_body"])
    grip = np.isin(seg0, sim.gripper_bodies(replay[3]))
    for part, pixels in (("object", demo["object_mask"][0]), ("gripper", grip)):
        bodies = demo[f"{part}_point_bodies"]
        valid = bodies >= 0
        # The 64x64 frame shows fewer pixels than points: every pixel is used, the rest pads.
        assert 0 < pixels.sum() < n and valid.sum() == pixels.sum(), part
        uv0 = demo[f"{part}_tracks"][0, valid]
        np.testing.assert_array_equal(uv0, np.round(uv0))
        u, v = uv0[:, 0].astype(int), uv0[:, 1].astype(int)
        assert pixels[v, u].all() and len(set(zip(u, v, strict=True))) == valid.sum()
        np.testing.assert_array_equal(seg0[v, u], bodies[valid])
        assert demo[f"{part}_visible"][0, valid].all()
        assert np.isnan(demo[f"{part}_tracks"][:, ~valid]).all()
        assert not demo[f"{part}_visible"][:, ~valid].any()


def test_states_and_poses_match_a_replay(demo, replay):
    obs, world_from_body, _, _ = replay
    np.testing.assert_allclose(demo["state"], obs, atol=1e-6)
    camera_from_world = np.linalg.inv(demo["world_from_camera"].astype(np.float64))
    np.testing.assert_allclose(demo["object_poses"], camera_from_world @ world_from_body,
                               atol=1e-5)


@pytest.mark.parametrize("t", [0, 30])
def test_depth_K_and_extrinsics_agree_with_ray_casts(demo, replay, t):
    """Rays through the pixel centres, built from K and world_from_camera and cast by MuJoCo
    itself, hit the body the segmentation shows at the rendered depth (a 1% error in the
    focal length would fail ~30% of the pixels)."""
    body, dist = replay[2][t]
    seg, depth = demo["segmentation"][t], demo["depth"][t]
    hit = seg > 0
    assert hit.mean() > 0.5
    err = np.abs(dist - depth)[hit]
    assert np.median(err) < 1e-4
    assert ((body == seg)[hit] & (err < 2e-3)).mean() > 0.98  # misses: tessellated silhouettes


def test_tracks_match_the_simulator_and_the_segmentation(demo, replay):
    world_from_body = replay[1]
    K, W = demo["intrinsics"].astype(np.float64), demo["world_from_camera"].astype(np.float64)
    moved = 0.0
    for part in ("object", "gripper"):
        bodies, tracks = demo[f"{part}_point_bodies"], demo[f"{part}_tracks"]
        visible = demo[f"{part}_visible"]
        valid = np.flatnonzero(bodies >= 0)
        b = bodies[valid]
        uv0 = tracks[0, valid].astype(int)
        z = demo["depth"][0][uv0[:, 1], uv0[:, 0]].astype(np.float64)
        cam = np.concatenate([uv0, np.ones((len(valid), 1))], -1) @ np.linalg.inv(K).T * z[:, None]
        world = np.concatenate([cam @ W[:3, :3].T + W[:3, 3], np.ones((len(valid), 1))], -1)
        in_body = np.einsum("nij,nj->ni", np.linalg.inv(world_from_body[0, b]), world)
        for t in range(demo["num_steps"]):
            later = np.einsum("nij,nj->ni", np.linalg.inv(W) @ world_from_body[t, b], in_body)
            np.testing.assert_allclose(tracks[t, valid], _project(K, later[:, :3]), atol=0.01)
            # A visible point shows its own body within 1 px of its track.
            seg = np.pad(demo["segmentation"][t], 1, constant_values=255)
            for i in np.flatnonzero(visible[t, valid]):
                c, r = np.round(tracks[t, valid[i]]).astype(int) + 1
                assert b[i] in seg[r - 1:r + 2, c - 1:c + 2], (part, t, i)
        moved = max(moved, np.nanmax(np.linalg.norm(tracks[-1] - tracks[0], axis=-1)))
        assert visible[-1, valid].mean() > 0.3, part
    assert moved > 3.0  # the gripper travels towards the button


def test_rlds_reads_through_build_clips(built, demo, tmp_path):
    _, path = built
    assert get_schema("metaworld") is METAWORLD
    builder = open_builder(path)
    assert {s: builder.info.splits[s].num_examples for s in ("train", "val")} == {"train": 1,
                                                                                  "val": 1}
    ep = next(read_episodes(builder, METAWORLD, "train", 0, 1, ground_truth=True))
    assert ep.instruction == "press the button"
    np.testing.assert_array_equal(ep.frames, demo["image"])
    np.testing.assert_array_equal(ep.depth, demo["depth"])
    np.testing.assert_array_equal(ep.segmentation, demo["segmentation"])
    np.testing.assert_array_equal(ep.object_poses, demo["object_poses"])
    np.testing.assert_array_equal(ep.intrinsics, demo["intrinsics"])
    import tensorflow_datasets as tfds

    for split, seed in (("train", SEED), ("val", VAL_SEED)):
        (raw,) = tfds.as_numpy(builder.as_dataset(split=split))
        meta, steps = raw["episode_metadata"], list(raw["steps"])
        assert (meta["task"].decode(), meta["camera"].decode(), int(meta["seed"])) == (
            TASK, CAMERA, seed)
        assert int(meta["num_steps"]) == len(steps) == 31
        assert int(meta["target_body"]) == demo["target_body"] and not meta["success"]
        assert steps[0]["is_first"] and steps[-1]["is_last"]
        assert not any(s["is_terminal"] for s in steps)  # cut at max_steps: truncated
        assert {s["language_instruction"].decode() for s in steps} == {"press the button"}
    # The train episode's steps are the cached rollout's.
    (raw,) = tfds.as_numpy(builder.as_dataset(split="train"))
    steps = list(raw["steps"])
    for key in ("gripper_tracks", "object_visible", "object_mask", "state"):
        np.testing.assert_array_equal(np.stack([s["observation"][key] for s in steps]),
                                      demo[key], err_msg=key)
    np.testing.assert_array_equal(np.stack([s["action"] for s in steps]), demo["action"])
    np.testing.assert_array_equal(raw["episode_metadata"]["gripper_point_bodies"],
                                  demo["gripper_point_bodies"])

    out = tmp_path / "clips"
    m = build_clips(BuildOptions(rlds_dir=str(path), out=str(out), schema="metaworld",
                                 tracker="ground_truth", size=(64, 64), grid=8, horizon=8,
                                 history=2, future=3, episodes_per_shard=1, workers=1,
                                 progress=False))
    assert m["counts"]["episodes"] == 1 and m["counts"]["clips"] == 31
    assert m["counts"]["skipped_total"] == 0
    ds = ClipDataset(out)
    clip = ds[10]
    want = {"history": (2, 64, 64, 3), "future": (3, 64, 64, 3), "tracks": (64, 8, 2),
            "visible": (64, 8)}
    assert {k: clip[k].shape for k in want} == want
    np.testing.assert_array_equal(clip["history"][-1], demo["image"][10])
    assert json.loads((out / "text_instructions.json").read_text()) == ["press the button"]
    # Ground-truth grid tracks on the moving gripper move; those on the static table do not.
    assert 0.5 < clip["visible"].mean() <= 1
    disp = np.linalg.norm(clip["tracks"][:, -1] - clip["tracks"][:, 0], axis=-1)
    assert np.median(disp[clip["visible"][:, -1]]) < 0.01 and disp.max() > 1


def test_other_settings_are_refused(built):
    root, _ = built
    cached = mw.cache_path(root, TASK, SEED)
    before = cached.stat().st_mtime_ns
    with pytest.raises(ValueError, match="max_steps: cached 30 vs requested 31"):
        mw.build(root, [TASK], [CAMERA], [SEED], workers=1, progress=False,
                 **{**SMALL, "max_steps": 31})
    with pytest.raises(ValueError, match="cameras"):
        mw.build(root, [TASK], [CAMERA, "corner2"], [SEED], workers=1, progress=False, **SMALL)
    settings = mw.cache_settings([CAMERA], **{**SMALL, "image_size": 96})
    with pytest.raises(ValueError, match="image_size: cached 64 vs requested 96"):
        mw.load_demo(cached, settings)
    assert cached.stat().st_mtime_ns == before


@pytest.mark.parametrize("text, want", [("0-4,7", [0, 1, 2, 3, 4, 7]), ("5", [5]), ("", []),
                                        (" 2-3 , 9 ", [2, 3, 9])])
def test_parse_range(text, want):
    assert sim.parse_range(text) == want


@pytest.mark.parametrize("call, match", [
    (lambda: sim.parse_range("3-1"), "empty range"),
    (lambda: sim.parse_range("a-b"), "bad range"),
    (lambda: mw.render_demo("door-opn", 0, ["corner"]), "unknown Meta-World task"),
    (lambda: mw.render_demo("door-open", 0, ["top"]), "unknown camera"),
    (lambda: mw.render_demo("door-open", 0, ["corner"], max_steps=501), "max_steps"),
    (lambda: mw.build("/nonexistent", ["door-open"], ["corner"], [0, 1], [1]), "both in the train"),
    (lambda: mw.build("/nonexistent", ["door-open"], ["corner"], []), "at least one task, seed"),
    (lambda: mw.build("/nonexistent", ["door-open"], ["corner", "corner"], [0]), "distinct"),
])
def test_bad_inputs_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_body_point_tracks_known_answer():
    """A point 1 m ahead on body 1, moved 0.1 m right at step 1, behind a wall at step 2."""
    K = np.array([[100.0, 0, 15.5], [0, 100, 15.5], [0, 0, 1]])
    poses = np.tile(np.eye(4), (3, 2, 1, 1))
    poses[:, 1, :3, 3] = [0, 0, 1]
    poses[1:, 1, 0, 3] = 0.1
    depth = np.ones((3, 32, 32), np.float32)
    depth[2] = 0.5
    tracks, visible = metaworld_demos.body_point_tracks(np.zeros((2, 3)), np.array([1, -1]), poses, depth, K)
    np.testing.assert_allclose(tracks[:, 0], [[15.5, 15.5], [25.5, 15.5], [25.5, 15.5]])
    np.testing.assert_array_equal(visible, [[True, False], [True, False], [False, False]])
    assert np.isnan(tracks[:, 1]).all()


# --------------------------------------------------------------------------------------------
# Slow: full episodes, parallel build, resume after a kill
# --------------------------------------------------------------------------------------------


def test_render_demo_refuses_a_process_with_tensorflow(built):
    import tensorflow  # noqa: F401 (the fixture's RLDS write has loaded it already)

    with pytest.raises(RuntimeError, match="TensorFlow is loaded"):
        mw.render_demo(TASK, SEED, [CAMERA], **SMALL)


@pytest.mark.slow
def test_door_open_expert_succeeds_on_all_cameras():
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # no rendering in-process
        demo = pool.apply(mw.render_demo, ("door-open", 0, sim.CAMERAS))
    assert list(demo) == list(sim.CAMERAS)
    for camera, ep in demo.items():
        assert ep["success"] is True and ep["num_steps"] < sim.MAX_STEPS, camera
        assert ep["image"].shape[1:] == (128, 128, 3)
        valid = ep["object_point_bodies"] >= 0
        assert valid.sum() > 5, camera
        np.testing.assert_array_equal(ep["state"], demo["corner"]["state"])
    moves = [np.nanmedian(np.linalg.norm(ep["object_tracks"][-1] - ep["object_tracks"][0],
                                         axis=-1)) for ep in demo.values()]
    assert max(moves) > 5, moves  # the handle swings with the door


def _cache_arrays(root):
    out = {}
    for path in sorted((Path(root) / mw.CACHE_DIR).glob("*/*.npz")):
        with np.load(path) as z:
            out[str(path.relative_to(root))] = {k: z[k] for k in z.files}
    return out


@pytest.mark.slow
def test_parallel_build_equals_serial(tmp_path):
    kw = {"image_size": 48, "max_steps": 20, "num_points": 16, "progress": False}
    tasks = ["button-press", "door-close"]
    serial = mw.build(tmp_path / "a", tasks, ["corner", "corner3"], [0, 1], [2], workers=1, **kw)
    parallel = mw.build(tmp_path / "b", tasks, ["corner", "corner3"], [0, 1], [2], workers=2,
                        **kw)
    a, b = _cache_arrays(tmp_path / "a"), _cache_arrays(tmp_path / "b")
    assert sorted(a) == sorted(b) and len(a) == 6
    for name in a:
        assert sorted(a[name]) == sorted(b[name])
        for k in a[name]:
            np.testing.assert_array_equal(a[name][k], b[name][k], err_msg=f"{name} {k}")
    for split, count in (("train", 8), ("val", 4)):
        ea = list(read_episodes(open_builder(serial), METAWORLD, split, 0, count,
                                ground_truth=True))
        eb = list(read_episodes(open_builder(parallel), METAWORLD, split, 0, count,
                                ground_truth=True))
        assert len(ea) == len(eb) == count
        for x, y in zip(ea, eb, strict=True):
            np.testing.assert_array_equal(x.frames, y.frames)
            np.testing.assert_array_equal(x.object_poses, y.object_poses)


@pytest.mark.slow
def test_killed_cli_build_resumes(tmp_path):
    cmd = [sys.executable, "-m", "data_pipelines.metaworld", f"--out={tmp_path}",
           "--tasks=button-press", "--cameras=corner", "--seeds=0-2", "--workers=1",
           "--image_size=48", "--max_steps=20"]
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(cmd, cwd=root, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first = mw.cache_path(tmp_path, "button-press", 0)
    try:
        deadline = time.time() + 300
        while not first.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert first.exists(), "the CLI wrote no rollout"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = {p: p.stat().st_mtime_ns for p in (tmp_path / mw.CACHE_DIR).glob("*/*.npz")}
    assert 1 <= len(done) < 3, "kill the build before it finished"
    stale = first.with_name("2.npz.tmp999")  # what a kill mid-write leaves behind
    stale.write_bytes(b"partial")
    path = mw.build(tmp_path, ["button-press"], ["corner"], [0, 1, 2], image_size=48,
                    max_steps=20, progress=False)
    assert {p: p.stat().st_mtime_ns for p in done} == done  # finished rollouts were kept
    assert len(list((tmp_path / mw.CACHE_DIR).glob("*/*.npz"))) == 3 and not stale.exists()
    eps = list(read_episodes(open_builder(path), METAWORLD, "train", 0, 3))
    assert len(eps) == 3 and all(e.instruction == "press the button" for e in eps)


@pytest.mark.parametrize("content", [b"PK\x03\x04garbage", b"not a zip at all", b""])
def test_a_corrupt_cache_file_is_named(tmp_path, content):
    path = tmp_path / "0.npz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"0\.npz is unreadable.*delete it to re-render"):
        mw.load_demo(path)
