"""Toy planning problems: shapes, determinism, disjointness from training episodes, the success
predicate under known motions, and depth/K/mask/extrinsics consistency."""

import numpy as np
import pytest

from data_pipelines import toy
from data_pipelines.text import make_text_encoder
from data_pipelines.toy import problems as tp
from data_pipelines.toy.tasks import sample_episode
from data_pipelines.toy.world import ToyConfig, pose_matrix, render_rgb_uint8

SIZE, HISTORY, DIM, TOKENS, NUM = 32, 3, 32, 16, 12


@pytest.fixture(scope="module")
def problems():
    return tp.make_problems(NUM, 0, image_size=SIZE, history=HISTORY, text_dim=DIM,
                            text_max_tokens=TOKENS)


def _translation(dx, dy):
    m = np.eye(4)
    m[:2, 3] = dx, dy
    return m


def test_shapes_and_dtypes(problems):
    p = problems
    assert len(p) == NUM
    assert p.history.shape == (NUM, HISTORY, SIZE, SIZE, 3) and p.history.dtype == np.uint8
    assert p.text_tokens.shape == (NUM, TOKENS, DIM) and p.text_tokens.dtype == np.float32
    assert p.text_mask.shape == (NUM, TOKENS) and p.text_mask.dtype == bool
    assert p.depth.shape == (NUM, SIZE, SIZE) and p.object_mask.shape == (NUM, SIZE, SIZE)
    assert p.K.shape == (3, 3) and p.extrinsics.shape == (4, 4)
    assert len(p.instructions) == len(p.tasks) == len(p.blocks) == NUM
    assert all(p.object_mask.reshape(NUM, -1).sum(1) > 0)
    for i in range(NUM):
        nb = len(p.halves[i])
        assert p.blocks[i].shape == p.blocks_first[i].shape == p.blocks_final[i].shape == (nb, 4)


def test_text_is_the_clips_hash_encoding(problems):
    tokens, mask = make_text_encoder("hash", dim=DIM, max_tokens=TOKENS).encode(
        problems.instructions)
    np.testing.assert_array_equal(problems.text_mask, mask)
    # Rounded through float16 as build_clips stores the token table.
    np.testing.assert_array_equal(problems.text_tokens, tokens.astype(np.float16))
    assert not np.array_equal(problems.text_tokens, tokens)


def test_deterministic_per_seed():
    kw = dict(image_size=SIZE, history=2, text_dim=DIM, text_max_tokens=TOKENS)
    a, b = tp.make_problems(3, 5, **kw), tp.make_problems(3, 5, **kw)
    c = tp.make_problems(3, 6, **kw)
    np.testing.assert_array_equal(a.history, b.history)
    np.testing.assert_array_equal(a.depth, b.depth)
    assert a.instructions == b.instructions
    assert not np.array_equal(a.history, c.history)


def test_problems_are_not_training_episodes(problems):
    cfg = ToyConfig(image_size=SIZE)
    for split in ("train", "val"):
        for j in range(2 * NUM):
            ep = sample_episode(toy.episode_rng(0, split, j), cfg)
            blocks = ep.poses[0, tp.FIRST_BLOCK:]
            for i in range(NUM):
                assert not (blocks.shape == problems.blocks_first[i].shape
                            and np.allclose(blocks, problems.blocks_first[i])), (split, j, i)


def test_contact_start_is_just_before_the_block_moves(problems):
    cfg = ToyConfig(image_size=SIZE)
    for i in range(4):
        ep = sample_episode(toy.episode_rng(0, tp.SPLIT, i), cfg)
        t, k = int(problems.start_steps[i]), problems.tasks[i].block
        block = ep.poses[:, tp.FIRST_BLOCK + k]
        np.testing.assert_array_equal(block[t], block[0])
        assert np.abs(block[t + 1] - block[0]).max() > 0
        # The history ends on the start step's frame and steps back one frame at a time.
        render = render_rgb_uint8(ep.scene)
        np.testing.assert_array_equal(problems.history[i, -1], render(ep.poses[t])[0])
        np.testing.assert_array_equal(problems.history[i, 0], render(ep.poses[t - 2])[0])


def test_begin_repeats_the_first_frame():
    p = tp.make_problems(2, 0, image_size=SIZE, history=3, text_dim=DIM,
                         text_max_tokens=TOKENS, start="begin")
    assert list(p.start_steps) == [0, 0]
    np.testing.assert_array_equal(p.history[:, 0], p.history[:, 2])
    q = tp.make_problems(1, 0, image_size=SIZE, history=1, text_dim=DIM,
                         text_max_tokens=TOKENS, start=5)
    assert q.start_steps[0] == 5


def test_scripted_motion_succeeds_and_identity_fails(problems):
    assert problems.scripted_success.all()
    for i in range(NUM):
        assert tp.success_after(problems, i, tp.scripted_motion(problems, i)), i
        # Every toy task needs the block to move at least 4 cm.
        assert not tp.success_after(problems, i, np.eye(4)), i


def test_success_follows_the_blocks_translation(problems):
    pushes = [i for i, t in enumerate(problems.tasks) if t.kind in ("push", "place")]
    assert pushes
    for i in pushes:
        task = problems.tasks[i]
        xy = problems.blocks[i][task.block, :2]
        gap = np.asarray(task.target) - xy
        assert tp.success_after(problems, i, _translation(*gap))
        assert not tp.success_after(problems, i, _translation(*(0.25 * gap)))
        assert not tp.success_after(problems, i, _translation(*(-gap)))


def test_moved_block_turns_about_z(problems):
    block = problems.blocks[0][problems.tasks[0].block]
    # A rotation about the block's own centre keeps it in place and turns its yaw.
    turn = np.radians(30)
    about = pose_matrix(block[0], block[1], block[2], 0.0).astype(np.float64)
    rot = about @ pose_matrix(0, 0, 0, turn) @ np.linalg.inv(about)
    moved = tp.moved_block(problems, 0, rot)
    np.testing.assert_allclose(moved[:3], block[:3], atol=1e-6)
    np.testing.assert_allclose(moved[3], block[3] + turn, atol=1e-6)


def test_mask_pixels_back_project_into_the_block(problems):
    p = problems
    K = p.K.astype(np.float64)
    for i in range(NUM):
        v, u = np.nonzero(p.object_mask[i])
        z = p.depth[i, v, u].astype(np.float64)
        cam = np.stack([(u - K[0, 2]) / K[0, 0] * z, (v - K[1, 2]) / K[1, 1] * z, z,
                        np.ones_like(z)])
        world = (p.extrinsics.astype(np.float64) @ cam)[:3].T
        x, y, ztop, yaw = p.blocks[i][p.tasks[i].block].astype(np.float64)
        half = p.halves[i][p.tasks[i].block]
        c, s = np.cos(yaw), np.sin(yaw)
        lx = c * (world[:, 0] - x) + s * (world[:, 1] - y)
        ly = -s * (world[:, 0] - x) + c * (world[:, 1] - y)
        assert np.all(np.abs(lx) <= half + 1e-5) and np.all(np.abs(ly) <= half + 1e-5), i
        np.testing.assert_allclose(world[:, 2], ztop, atol=1e-5)


def test_camera_to_world_motion_round_trip(problems):
    # A world motion seen from the camera and mapped back is the same motion.
    m = pose_matrix(0.03, -0.02, 0.01, 0.4).astype(np.float64)
    w = problems.extrinsics.astype(np.float64)
    cam = np.linalg.inv(w) @ m @ w
    np.testing.assert_allclose(tp.camera_to_world_motion(problems, cam), m, atol=1e-6)


def test_bad_arguments_are_named(problems):
    kw = dict(image_size=SIZE, history=2, text_dim=DIM, text_max_tokens=TOKENS)
    with pytest.raises(ValueError, match="start"):
        tp.make_problems(1, 0, start="middle", **kw)
    with pytest.raises(ValueError, match="num"):
        tp.make_problems(0, 0, **kw)
    with pytest.raises(ValueError, match="outside an episode"):
        tp.make_problems(1, 0, start=10_000, **kw)
    with pytest.raises(ValueError, match=r"block_motion_world: expected float\[4 4\]"):
        tp.success_after(problems, 0, np.eye(3))
    with pytest.raises(ValueError, match="out of range"):
        tp.scripted_motion(problems, NUM)


def test_scripted_tracks_follow_the_block(problems):
    i = next(k for k, t in enumerate(problems.tasks) if t.kind == "push")
    u, v = np.meshgrid(np.arange(SIZE, dtype=np.float32), np.arange(SIZE, dtype=np.float32))
    queries = np.stack([u.ravel(), v.ravel()], -1)
    tracks = tp.scripted_tracks(problems, i, queries, 4, 3)
    assert tracks.shape == (3, 4, SIZE * SIZE, 2)
    np.testing.assert_allclose(tracks[:, 0], np.broadcast_to(queries, (3, SIZE * SIZE, 2)))
    # Most of the frame is the table, which stays put.
    still = np.linalg.norm(tracks[0, -1] - tracks[0, 0], axis=-1) < 1e-3
    assert still.mean() > 0.7
    # A pixel on the block at the start of chunk 1 moves as the block's pose says.
    ep = sample_episode(toy.episode_rng(0, tp.SPLIT, int(problems.episodes[i])), problems.config)
    t0 = int(problems.start_steps[i]) + 3
    k = tp.FIRST_BLOCK + problems.tasks[i].block
    _, seg, depth = render_rgb_uint8(ep.scene)(ep.poses[t0])
    rows, cols = np.nonzero(seg == k)
    cam_from_world = problems.config.camera_from_world.astype(np.float64)
    move = (cam_from_world @ pose_matrix(*ep.poses[t0 + 3, k]).astype(np.float64)
            @ np.linalg.inv(pose_matrix(*ep.poses[t0, k]).astype(np.float64))
            @ np.linalg.inv(cam_from_world))
    K = problems.K.astype(np.float64)
    z = depth[rows, cols].astype(np.float64)
    pts = np.stack([(cols - K[0, 2]) / K[0, 0] * z, (rows - K[1, 2]) / K[1, 1] * z, z], -1)
    moved = pts @ move[:3, :3].T + move[:3, 3]
    expect = moved[:, :2] / moved[:, 2:] * K[[0, 1], [0, 1]] + K[:2, 2]
    np.testing.assert_allclose(tracks[1, 3, rows * SIZE + cols], expect, atol=1e-3)
    assert np.abs(expect - np.stack([cols, rows], -1)).max() > 0.5  # the block did move


def test_followed_scripted_tracks_chain_the_chunks(problems):
    """``follow``: chunk h starts where chunk h-1 ended (clipped to the frame), each chunk is
    the script's tracks of those points (``chunk_tracks``), and the points on the moving block
    stay on it, where fixed queries lose it."""
    i = next(k for k, t in enumerate(problems.tasks) if t.kind == "push")
    v, u = np.nonzero(problems.object_mask[i])
    queries = np.stack([u, v], -1).astype(np.float32)
    fixed = tp.scripted_tracks(problems, i, queries, 4, 4)
    tracks = tp.scripted_tracks(problems, i, queries, 4, 4, follow=True)
    assert tracks.shape == fixed.shape == (4, 4, len(queries), 2)
    np.testing.assert_allclose(tracks[0], fixed[0], atol=1e-5)
    np.testing.assert_allclose(tracks[1:, 0], np.clip(tracks[:-1, -1], 0, SIZE - 1), atol=1e-6)
    for h in range(4):
        np.testing.assert_allclose(tracks[h], tp.chunk_tracks(problems, i, tracks[h, 0], 4, h),
                                   atol=1e-6)
        np.testing.assert_allclose(fixed[h], tp.chunk_tracks(problems, i, queries, 4, h),
                                   atol=1e-6)
    moved = lambda t: np.linalg.norm(t[:, -1] - t[:, 0], axis=-1).mean(-1)
    # The followed points keep moving with the block in every chunk; the fixed ones, once
    # the block has left them, stand on the table.
    assert moved(tracks).min() > 0.5, moved(tracks)
    assert moved(fixed)[-1] < 0.5 * moved(tracks)[-1], (moved(fixed), moved(tracks))
    with pytest.raises(ValueError, match=r"queries: expected float\[N 2\]"):
        tp.chunk_tracks(problems, i, queries[:, :1], 4, 0)
    with pytest.raises(ValueError, match="chunk >= 0"):
        tp.chunk_tracks(problems, i, queries, 4, -1)


def test_ending_clips_faithful_and_failed(problems):
    from data_pipelines.toy.tasks import episode_rng

    good = tp.ending_clips(problems, 2)
    bad = tp.ending_clips(problems, 2, failed=True)
    assert good.shape == bad.shape == (NUM, 2, SIZE, SIZE, 3) and good.dtype == np.uint8
    for i in range(NUM):
        ep = sample_episode(episode_rng(0, tp.SPLIT, i), problems.config)
        frame = render_rgb_uint8(ep.scene)(ep.poses[-1])[0]
        np.testing.assert_array_equal(good[i, -1], frame)  # the script's last frame
        failed = sample_episode(episode_rng(0, tp.SPLIT, i),
                                ToyConfig(image_size=SIZE, failure_fraction=1.0))
        # Same scene and instruction, a failing script, a different ending.
        assert failed.task == ep.task and failed.failure and not failed.success
        assert np.abs(good[i, -1].astype(int) - bad[i, -1]).max() > 0
    with pytest.raises(ValueError, match="frames must be >= 1"):
        tp.ending_clips(problems, 0)


def test_future_frames_are_the_script_after_the_start(problems):
    from data_pipelines.toy.tasks import episode_rng

    future = tp.future_frames(problems, 3)
    assert future.shape == (NUM, 3, SIZE, SIZE, 3) and future.dtype == np.uint8
    for i in range(NUM):
        ep = sample_episode(episode_rng(0, tp.SPLIT, i), problems.config)
        t0, last = int(problems.start_steps[i]), len(ep.poses) - 1
        for k in range(3):
            frame = render_rgb_uint8(ep.scene)(ep.poses[min(t0 + 1 + k, last)])[0]
            np.testing.assert_array_equal(future[i, k], frame)
        # The history ends at the start step: its last frame precedes the first future one.
        np.testing.assert_array_equal(problems.history[i, -1],
                                      render_rgb_uint8(ep.scene)(ep.poses[t0])[0])
    np.testing.assert_array_equal(tp.future_frames(problems, 3, [1]), future[1:2])
    with pytest.raises(ValueError, match="frames must be >= 1"):
        tp.future_frames(problems, 0)
    with pytest.raises(ValueError, match="problem index"):
        tp.future_frames(problems, 3, [NUM])
