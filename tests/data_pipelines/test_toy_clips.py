"""Toy world -> RLDS -> clips -> loader round trip, LK accuracy, multi-process sharding, resume."""

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("grain")

import jax

from data_pipelines import toy
from data_pipelines.build_clips import BuildOptions, build_clips
from data_pipelines.loader import ClipDataset, make_loader
from data_pipelines.rlds import open_builder, read_episodes
from data_pipelines.schemas import TOY
from data_pipelines.toy.tasks import sample_episode
from data_pipelines.toy.world import ToyConfig, render
from data_pipelines.tracks import ground_truth as ground_truth_tracks
from data_pipelines.tracks import trackers as tracking
from flipjax.sharding import create_mesh

TRAIN_EPISODES = 6


@pytest.fixture(scope="module")
def toy_rlds(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    return toy.build(root, {"train": TRAIN_EPISODES, "val": 2}, seed=3,
                     config=ToyConfig(failure_fraction=0.3))


@pytest.fixture(scope="module")
def toy_clips(toy_rlds, tmp_path_factory):
    out = tmp_path_factory.mktemp("clips")
    manifest = build_clips(BuildOptions(rlds_dir=str(toy_rlds), out=str(out), schema="toy",
                                        tracker="ground_truth", episodes_per_shard=2,
                                        progress=False))
    return out, manifest


def test_round_trip_shapes_and_dtypes(toy_rlds, toy_clips):
    out, m = toy_clips
    eps = list(read_episodes(open_builder(toy_rlds), TOY, "train", 0, TRAIN_EPISODES,
                             ground_truth=True))
    assert m["counts"]["episodes"] == TRAIN_EPISODES
    assert m["counts"]["clips"] == sum(len(e.frames) for e in eps)
    assert m["counts"]["skipped_total"] == 0 and len(m["shards"]) == 3
    ds = ClipDataset(out)
    assert len(ds) == m["counts"]["clips"]
    clip = ds[37]
    want = {"history": ((16, 128, 128, 3), np.uint8), "future": ((15, 128, 128, 3), np.uint8),
            "tracks": ((529, 16, 2), np.float32), "visible": ((529, 16), np.bool_),
            "text_tokens": ((16, 128), np.float32), "text_mask": ((16,), np.bool_)}
    assert set(clip) == {*want, "episode_id", "frame_index"}
    for k, (shape, dtype) in want.items():
        assert clip[k].shape == shape and clip[k].dtype == dtype, k
    # Frames are stored losslessly: the clip's current frame is the RLDS frame.
    ep = next(e for e in eps if e.index == clip["episode_id"])
    t = int(clip["frame_index"])
    np.testing.assert_array_equal(clip["history"][-1], ep.frames[t])
    for k in range(15):
        np.testing.assert_array_equal(clip["future"][k], ep.frames[min(t + 1 + k,
                                                                        len(ep.frames) - 1)])
    np.testing.assert_array_equal(clip["tracks"][:, 0], tracking.grid_queries(23, 128, 128))
    # One text table for the whole dataset: each distinct instruction once, memory-mapped.
    assert m["text"]["instructions"] == len({e.instruction for e in eps})
    tokens, _ = ds._text_table()
    assert isinstance(tokens, np.memmap) and tokens.shape == (m["text"]["instructions"], 16, 128)
    # Other history/future splits come from the same shards.
    dyn = ClipDataset(out, history=4, future=15)[37]
    np.testing.assert_array_equal(dyn["history"], clip["history"][-4:])


def test_ground_truth_tracks_follow_the_moved_block(toy_rlds, toy_clips):
    """Tracks on the target block end where the block's pose says (float16 storage: < 0.1 px)."""
    out, _ = toy_clips
    ep = next(read_episodes(open_builder(toy_rlds), TOY, "train", 0, 1, ground_truth=True))
    ds = ClipDataset(out)
    clip = ds[0]
    k = int(ep.segmentation[0].max())  # some block id present at t = 0
    q = clip["tracks"][:, 0]
    ids = ep.segmentation[0][np.round(q[:, 1]).astype(int), np.round(q[:, 0]).astype(int)]
    on = np.flatnonzero(ids == k)
    assert len(on) > 0
    kmat = ep.intrinsics
    z = ep.depth[0][np.round(q[on, 1]).astype(int), np.round(q[on, 0]).astype(int)]
    cam = np.stack([(q[on, 0] - kmat[0, 2]) * z / kmat[0, 0],
                    (q[on, 1] - kmat[1, 2]) * z / kmat[1, 1], z, np.ones_like(z)])
    later = ep.object_poses[15, k] @ np.linalg.inv(ep.object_poses[0, k]) @ cam
    uv = (kmat @ later[:3])[:2] / later[2]
    vis = clip["visible"][on, 15]
    np.testing.assert_allclose(clip["tracks"][on, 15][vis], uv.T[vis], atol=0.1)


def test_lk_matches_ground_truth_on_toy_scenes(toy_rlds):
    eps = list(read_episodes(open_builder(toy_rlds), TOY, "train", 0, 2, ground_truth=True))
    errors, moving = [], []
    for ep in eps:
        q = tracking.grid_queries(23, 128, 128)
        gt, gt_vis = ground_truth_tracks.track_ground_truth(ep.depth, ep.segmentation, ep.object_poses,
                                                 ep.intrinsics, q, 16)
        opts = BuildOptions(rlds_dir="", out="")  # the settings build_clips tracks with
        lk, _ = tracking.track_lk(ep.frames, q, 16, window=opts.lk_window, levels=opts.lk_levels)
        e = tracking.track_errors(lk, gt, gt_vis)
        errors.append(e["median"])
        # Error on points that actually move (the gripper and the carried block).
        move = gt_vis[:, :, 1:] & (np.linalg.norm(gt[:, :, 1:] - gt[:, :, :1], axis=-1) > 2)
        err = np.linalg.norm(lk[:, :, 1:] - gt[:, :, 1:], axis=-1)
        moving.append(np.median(err[move]))
    print(f"LK vs ground truth on toy scenes: median {np.median(errors):.3f} px (all visible), "
          f"{np.median(moving):.3f} px (moving points)")
    assert np.median(errors) < 1.0
    assert np.median(moving) < 1.0


def test_toy_success_predicate_and_scripts():
    cfg = ToyConfig(failure_fraction=0.5)
    outcomes = [sample_episode(np.random.default_rng(s), cfg) for s in range(30)]
    for ep in outcomes:
        assert ep.success == (ep.failure == ""), (ep.task, ep.failure)
    assert {ep.task.kind for ep in outcomes} == {"push", "place", "next_to"}
    ep = outcomes[0]
    # Segmentation and depth agree with the poses: the block's centre pixel shows the block.
    k = 4 + ep.task.block
    x, y, z, _ = ep.poses[0, k]
    f = cfg.focal
    c = (cfg.image_size - 1) / 2
    u, v = x * f / (cfg.camera_height - z) + c, -y * f / (cfg.camera_height - z) + c
    _, seg, depth = render(ep.scene, ep.poses[0])
    assert seg[round(v), round(u)] == k
    assert depth[round(v), round(u)] == pytest.approx(cfg.camera_height - z)


def test_processes_get_disjoint_complete_data(toy_clips):
    out, _ = toy_clips
    ds = ClipDataset(out)
    seen = []
    for p in range(2):
        ld = make_loader(ds, 8, seed=0, num_epochs=1, process_index=p, process_count=2)
        ids = set()
        for _ in range(ld.steps_per_epoch):
            b = next(ld)
            assert b["history"].shape == (4, 16, 128, 128, 3)  # local share of the global 8
            ids |= set(zip(b["episode_id"].tolist(), b["frame_index"].tolist(), strict=True))
        seen.append(ids)
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    per = len(ds) // 2
    assert len(seen[0]) == len(seen[1]) == (per // 4) * 4


def test_iterator_state_restores_the_same_batches(toy_clips):
    out, _ = toy_clips
    kw = dict(seed=7, num_points=100, track_noise=0.5, process_index=0, process_count=1)
    a = make_loader(out, 4, **kw)
    for _ in range(3):
        next(a)
    state = a.get_state()
    want = [next(a) for _ in range(2)]
    b = make_loader(out, 4, **kw)
    b.set_state(state)
    got = [next(b) for _ in range(2)]
    for w, g in zip(want, got, strict=True):
        assert w["tracks"].shape == (4, 100, 16, 2)
        for k in w:
            np.testing.assert_array_equal(w[k], g[k])
    # Noise leaves the query points exact and perturbs the rest.
    clean = ClipDataset(out)
    assert not np.array_equal(want[0]["tracks"][:, :, 1:], np.round(want[0]["tracks"][:, :, 1:]))
    assert np.isin(want[0]["tracks"][0, :, 0, 0], clean[0]["tracks"][:, 0, 0]).all()


def test_batches_are_global_sharded_arrays(toy_clips):
    out, _ = toy_clips
    mesh = create_mesh(data=4, fsdp=2)
    ld = make_loader(out, 8, mesh=mesh, seed=0)
    b = next(ld)
    assert isinstance(b["history"], jax.Array) and b["history"].shape == (8, 16, 128, 128, 3)
    assert len(b["tracks"].sharding.device_set) == 8
    assert b["tracks"].addressable_shards[0].data.shape == (1, 529, 16, 2)


def test_loader_rejects_bad_configuration(toy_clips):
    out, _ = toy_clips
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        make_loader(out, 8, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="exceeds the 529 tracked points"):
        next(make_loader(out, 2, num_points=600, process_index=0, process_count=1))
    with pytest.raises(ValueError, match=r"no manifest\.json"):
        ClipDataset(out / "nope")


def test_motion_aware_subset():
    from data_pipelines.loader import Augment

    n, lh = 40, 4
    tracks = np.zeros((n, lh, 2), np.float32)
    moving = np.array([3, 11, 17, 29])
    tracks[moving, :, 0] = 2.0 * np.arange(lh)  # 2 px per step: moving
    tracks[5, :, 0] = 0.5 * np.arange(lh)  # 0.5 px per step: still by the metric's threshold
    clip = {"tracks": tracks, "visible": np.ones((n, lh), bool)}
    rng = np.random.default_rng(0)
    for fraction, want in ((0.5, 4), (0.25, 2), (1.0, 4)):
        out = Augment(8, moving_fraction=fraction)(clip, rng)["tracks"]
        assert out.shape == (8, lh, 2)
        assert int((out[:, -1, 0] > 5).sum()) == want  # capped by the 4 moving points
        assert len({tuple(t.ravel()) for t in out[:, :, 0]}) >= 2
    # Uniform draws rarely pick more than one of 4 movers out of 40.
    uniform = [int((Augment(8)(clip, rng)["tracks"][:, -1, 0] > 5).sum()) for _ in range(50)]
    assert np.mean(uniform) < 1.5
    # More points than still ones: the rest come from the movers.
    assert Augment(38, moving_fraction=0.0)(clip, rng)["tracks"].shape == (38, lh, 2)
    out = Augment(38, moving_fraction=0.05)(clip, rng)["tracks"]
    assert int((out[:, -1, 0] > 5).sum()) == 38 - 36
    with pytest.raises(ValueError, match="moving_fraction must lie"):
        Augment(8, moving_fraction=1.5)
    with pytest.raises(ValueError, match="needs num_points"):
        Augment(None, moving_fraction=0.5)
