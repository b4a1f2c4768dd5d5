"""Point tracking: grid layout, LK and dense-flow trackers, ground truth, track files, resizing."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_pipelines.tracks import files as track_files
from data_pipelines.tracks import ground_truth as ground_truth_tracks
from data_pipelines.tracks import trackers as tracking

# --------------------------------------------------------------------------------------------
# Synthetic frames: a smooth continuous texture sampled at sub-pixel shifts
# --------------------------------------------------------------------------------------------


def _texture(seed: int, waves: int = 24):
    """Continuous texture f(u, v): sinusoids with wavelengths 6-64 px, amplitude ~ wavelength."""
    rng = np.random.default_rng(seed)
    wavelength = np.exp(rng.uniform(np.log(6.0), np.log(64.0), waves))
    angle = rng.uniform(0, 2 * np.pi, waves)
    phase = rng.uniform(0, 2 * np.pi, waves)
    ku = 2 * np.pi / wavelength * np.cos(angle)
    kv = 2 * np.pi / wavelength * np.sin(angle)
    amplitude = wavelength / 64.0

    def f(u, v):
        arg = u[..., None] * ku + v[..., None] * kv + phase
        return (amplitude * np.sin(arg)).sum(-1)

    return f


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.round((values - values.min()) / (values.max() - values.min()) * 255).astype(np.uint8)


def _render_translating(shifts: np.ndarray, size: int = 128, seed: int = 0) -> np.ndarray:
    """uint8[T H W 3]: frame t shows the texture moved by shifts[t] (content at p goes to p+s)."""
    vv, uu = np.mgrid[0:size, 0:size].astype(np.float64)
    f = _texture(seed)
    gray = _to_uint8(np.stack([f(uu - s[0], vv - s[1]) for s in shifts]))
    return np.repeat(gray[..., None], 3, axis=-1)


def _translation_truth(queries, shifts, horizon, size):
    """Exact tracks float[T N L 2] and in-image mask for a translating texture."""
    num_frames = len(shifts)
    frame = np.minimum(np.arange(num_frames)[:, None] + np.arange(horizon), num_frames - 1)
    motion = shifts[frame] - shifts[:, None]  # [T L 2]
    gt = queries[None, :, None, :] + motion[:, None]
    inside = np.all((gt >= -0.5) & (gt < size - 0.5), axis=-1)
    return gt, inside


SHIFTS = np.stack([np.arange(8) * 0.37, np.arange(8) * -0.23 + np.sin(np.arange(8)) * 0.4], 1)


# --------------------------------------------------------------------------------------------
# Grid queries
# --------------------------------------------------------------------------------------------


def test_grid_queries_known_answers():
    q = tracking.grid_queries(2, 4, 6)
    np.testing.assert_array_equal(q, [[1.0, 0.5], [4.0, 0.5], [1.0, 2.5], [4.0, 2.5]])
    assert q.dtype == np.float32
    np.testing.assert_array_equal(tracking.grid_queries(1, 5, 8), [[3.5, 2.0]])  # image centre
    q23 = tracking.grid_queries(23, 128, 128)
    assert q23.shape == (529, 2)
    np.testing.assert_allclose(q23[1] - q23[0], [128 / 23, 0], rtol=1e-5)  # u varies fastest
    np.testing.assert_allclose(q23[23] - q23[0], [0, 128 / 23], rtol=1e-5)


@settings(max_examples=50, deadline=None)
@given(grid=st.integers(1, 40), height=st.integers(1, 300), width=st.integers(1, 300))
def test_grid_queries_properties(grid, height, width):
    q = tracking.grid_queries(grid, height, width).astype(np.float64)
    assert q.shape == (grid * grid, 2)
    assert np.all(q >= -0.5) and np.all(q[:, 0] < width - 0.5) and np.all(q[:, 1] < height - 0.5)
    cells = q.reshape(grid, grid, 2)
    # Symmetric about the image centre, and evenly spaced along both axes.
    np.testing.assert_allclose(cells[::-1, ::-1] + cells - [width - 1, height - 1], 0, atol=1e-3)
    if grid > 1:
        np.testing.assert_allclose(np.diff(cells[..., 0], axis=1), width / grid, atol=1e-3)
        np.testing.assert_allclose(np.diff(cells[..., 1], axis=0), height / grid, atol=1e-3)


@pytest.mark.parametrize("args", [(0, 4, 4), (2, 0, 4), (2, 4, -1), (2.5, 4, 4), (True, 4, 4)])
def test_grid_queries_bad_input(args):
    with pytest.raises(ValueError):
        tracking.grid_queries(*args)


# --------------------------------------------------------------------------------------------
# Lucas-Kanade and dense-flow trackers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def translating():
    frames = _render_translating(SHIFTS)
    queries = tracking.grid_queries(12, 128, 128)
    gt, inside = _translation_truth(queries, SHIFTS, 6, 128)
    return frames, queries, gt, inside


@pytest.mark.parametrize("tracker", ["lk", "dense"])
def test_subpixel_translation_accuracy(translating, tracker):
    frames, queries, gt, inside = translating
    track = tracking.track_lk if tracker == "lk" else tracking.track_dense_flow
    tracks, visible = track(frames, queries, 6)
    assert tracks.shape == (8, 144, 6, 2) and tracks.dtype == np.float32
    assert visible.shape == (8, 144, 6) and visible.dtype == np.bool_
    errors = tracking.track_errors(tracks, gt, inside, visible)
    assert errors["median"] < (0.2 if tracker == "lk" else 0.3), errors
    assert errors["visible_recall"] > 0.95, errors
    assert errors["visible_precision"] == 1.0, errors
    np.testing.assert_array_equal(tracks[:, :, 0], np.broadcast_to(queries, (8, 144, 2)))
    assert visible[:, :, 0].all()


def test_lk_points_leaving_the_image_become_invisible():
    shifts = np.stack([np.arange(6) * 2.7, np.arange(6) * 0.3], 1)
    frames = _render_translating(shifts, seed=3)
    queries = np.stack([np.linspace(100.0, 126.0, 14), np.full(14, 60.0)], 1)
    tracks, visible = tracking.track_lk(frames, queries, 6)
    gt, _ = _translation_truth(queries, shifts, 6, 128)
    assert not visible[gt[..., 0] > 128.0].any()  # clearly outside: never visible
    assert visible[gt[..., 0] < 120.0].mean() > 0.9
    # Once lost, a point stays lost and holds its position within the window.
    lost = ~visible[0]
    first_lost = np.argmax(lost, axis=1)
    for n in np.nonzero(lost.any(axis=1))[0]:
        k = first_lost[n]
        assert lost[n, k:].all()
        np.testing.assert_array_equal(tracks[0, n, k:], np.broadcast_to(tracks[0, n, k - 1], (6 - k, 2)))


def _occluded_frames(occluder: np.ndarray | int, start: int = 4) -> np.ndarray:
    frames = _render_translating(SHIFTS)
    frames[start:, 40:88, 40:88] = np.asarray(occluder, np.uint8)[..., None]
    return frames


def _points_deep_in_occluder(queries, t, k):
    at = queries + (SHIFTS[t + k] - SHIFTS[t])
    return np.all((at > 40 + 8) & (at < 87 - 8), axis=1)


@pytest.mark.parametrize("kind", ["disappears", "textured"])
def test_lk_occluded_region_becomes_invisible(kind):
    """A region turning flat loses its points; a textured occluder needs the patch test."""
    queries = tracking.grid_queries(16, 128, 128)
    if kind == "disappears":
        frames = _occluded_frames(128)
        tracks, visible = tracking.track_lk(frames, queries, 6)
    else:
        vv, uu = np.mgrid[0:48, 0:48].astype(np.float64)
        frames = _occluded_frames(_to_uint8(_texture(seed=7)(uu, vv)))
        tracks, visible = tracking.track_lk(frames, queries, 6, max_patch_error=10.0)
    gt, inside = _translation_truth(queries, SHIFTS, 6, 128)
    for t in range(4):  # windows that see the occluder appear at frame 4
        covered = _points_deep_in_occluder(queries, t, 4 - t)
        assert covered.sum() >= 9
        assert not visible[t][covered][:, 4 - t :].any()
    # Points far from the occluder are unaffected.
    far = np.all((queries < 20) | (queries > 107), axis=1)
    assert visible[:4][:, far, 1:].mean() > 0.95
    assert tracking.track_errors(tracks[:4, far], gt[:4, far], inside[:4, far])["median"] < 0.2


def _lk_one_window(gray, queries, horizon, t, params, fb_threshold=1.0):
    """Reference: one window tracked on its own, with per-window OpenCV calls."""
    num_frames, height, width = gray.shape
    pos = queries.astype(np.float32).copy()
    vis = np.all((pos >= -0.5) & (pos < [width - 0.5, height - 0.5]), axis=1)
    tracks, visible = [pos.copy()], [vis.copy()]
    for k in range(1, horizon):
        j = min(t + k - 1, num_frames - 1)
        if t + k <= num_frames - 1 and vis.any():
            p0 = pos[vis].reshape(-1, 1, 2)
            p1, s1, _ = cv2.calcOpticalFlowPyrLK(gray[j], gray[j + 1], p0, None, **params)
            pb, s2, _ = cv2.calcOpticalFlowPyrLK(gray[j + 1], gray[j], p1, None, **params)
            p1 = p1[:, 0]
            ok = (s1[:, 0] == 1) & (s2[:, 0] == 1)
            ok &= np.linalg.norm(pb[:, 0] - p0[:, 0], axis=1) <= fb_threshold
            ok &= np.all((p1 >= -0.5) & (p1 < [width - 0.5, height - 0.5]), axis=1)
            idx = np.nonzero(vis)[0]
            pos[idx[ok]] = p1[ok]
            vis[idx[~ok]] = False
        tracks.append(pos.copy())
        visible.append(vis.copy())
    return np.stack(tracks, 1), np.stack(visible, 1)


def test_lk_batched_windows_equal_per_window_tracking():
    frames = _occluded_frames(128, start=3)[:, 16:80, 16:80]  # 64x64, with losses to hold
    gray = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames])
    queries = np.concatenate([tracking.grid_queries(7, 64, 64), [[-3.0, 5.0], [70.0, 70.0]]])
    horizon = 5
    tracks, visible = tracking.track_lk(frames, queries, horizon, window=9, levels=2)
    params = {
        "winSize": (9, 9),
        "maxLevel": 2,
        "criteria": (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 30, 0.01),
        "minEigThreshold": 1e-4,
    }
    assert (~visible[:, :-2, 1:]).any()  # the occluder really makes some points fail
    for t in range(len(frames)):
        ref_tracks, ref_visible = _lk_one_window(gray, queries, horizon, t, params)
        np.testing.assert_array_equal(tracks[t], ref_tracks)
        np.testing.assert_array_equal(visible[t], ref_visible)
    # Grayscale input and a sliced episode give the same windows.
    gray_tracks, _ = tracking.track_lk(gray, queries, horizon, window=9, levels=2)
    np.testing.assert_array_equal(gray_tracks, tracks)
    tail_tracks, tail_visible = tracking.track_lk(frames[2:], queries, horizon, window=9, levels=2)
    np.testing.assert_array_equal(tail_tracks, tracks[2:])
    np.testing.assert_array_equal(tail_visible, visible[2:])


def test_dense_flow_batched_windows_equal_sliced_episode(translating):
    frames, queries, _, _ = translating
    tracks, visible = tracking.track_dense_flow(frames, queries, 4, preset="fast")
    tail_tracks, tail_visible = tracking.track_dense_flow(frames[3:], queries, 4, preset="fast")
    np.testing.assert_array_equal(tail_tracks, tracks[3:])
    np.testing.assert_array_equal(tail_visible, visible[3:])


@pytest.mark.parametrize("tracker", ["lk", "dense"])
def test_windows_past_the_end_repeat_the_last_frame(translating, tracker):
    frames, queries, _, _ = translating
    frames = frames[:5]
    track = tracking.track_lk if tracker == "lk" else tracking.track_dense_flow
    horizon = 7
    tracks, visible = track(frames, queries, horizon)
    for t in range(5):
        last = 4 - t
        np.testing.assert_array_equal(
            tracks[t, :, last:], np.broadcast_to(tracks[t, :, last : last + 1], (144, horizon - last, 2))
        )
        np.testing.assert_array_equal(
            visible[t, :, last:], np.broadcast_to(visible[t, :, last : last + 1], (144, horizon - last))
        )
    assert not np.array_equal(tracks[0, :, 4], tracks[0, :, 0])  # real frames did move
    # A one-frame episode: every window is the query, held.
    one, one_visible = track(frames[:1], queries, 3)
    np.testing.assert_array_equal(one, np.broadcast_to(queries[None, :, None], (1, 144, 3, 2)))
    assert one_visible.all()


def test_queries_outside_the_image_are_never_visible(translating):
    frames, _, _, _ = translating
    queries = np.array([[-1.0, 10.0], [10.0, 127.5], [10.0, 127.4], [-0.5, -0.5]], np.float32)
    tracks, visible = tracking.track_lk(frames[:3], queries, 3)
    np.testing.assert_array_equal(visible[:, [0, 1]], False)
    assert visible[:, [2, 3], 0].all()
    np.testing.assert_array_equal(tracks[:, 0], np.broadcast_to(queries[0], (3, 3, 2)))


def test_per_frame_queries(translating):
    frames, queries, _, _ = translating
    per_frame = np.stack([queries + t for t in range(len(frames))])
    tracks, _ = tracking.track_dense_flow(frames, per_frame, 3, preset="ultrafast")
    np.testing.assert_array_equal(tracks[:, :, 0], per_frame)


def test_num_threads_is_restored(translating):
    frames, queries, _, _ = translating
    before = cv2.getNumThreads()
    tracking.track_lk(frames[:2], queries[:4], 2, num_threads=1)
    assert cv2.getNumThreads() == before
    with pytest.raises(ValueError, match="num_threads"):
        tracking.track_lk(frames[:2], queries[:4], 2, num_threads=0)


FRAMES = np.zeros((3, 16, 16, 3), np.uint8)
QUERIES = np.zeros((4, 2), np.float32)


@pytest.mark.parametrize(
    "frames, queries, horizon, kwargs, match",
    [
        (FRAMES.astype(np.float32), QUERIES, 2, {}, "frames"),
        (FRAMES[..., :2], QUERIES, 2, {}, "frames"),
        (FRAMES[None], QUERIES, 2, {}, "frames"),
        (FRAMES[:0], QUERIES, 2, {}, "frames"),
        (FRAMES, QUERIES[:, :1], 2, {}, "queries"),
        (FRAMES, np.zeros((2, 4, 2)), 2, {}, "queries"),
        (FRAMES, np.full((4, 2), np.nan), 2, {}, "queries"),
        (FRAMES, QUERIES, 0, {}, "horizon"),
        (FRAMES, QUERIES, 2, {"fb_threshold": 0.0}, "fb_threshold"),
        (FRAMES, QUERIES, 2, {"window": 2}, "window"),
        (FRAMES, QUERIES, 2, {"levels": -1}, "levels"),
        (FRAMES, QUERIES, 2, {"max_patch_error": -1.0}, "max_patch_error"),
    ],
)
def test_lk_bad_input(frames, queries, horizon, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tracking.track_lk(frames, queries, horizon, **kwargs)


def test_dense_flow_bad_input():
    with pytest.raises(ValueError, match="preset"):
        tracking.track_dense_flow(FRAMES, QUERIES, 2, preset="slow")
    # Sizes on which OpenCV's DIS raises (under 12 px) or crashes (24x94) are refused first.
    for size in [(8, 8), (24, 94), (94, 24)]:
        with pytest.raises(ValueError, match="aspect ratio"):
            tracking.track_dense_flow(np.zeros((2, *size, 3), np.uint8), QUERIES, 2)


# --------------------------------------------------------------------------------------------
# Ground truth from depth, segmentation and poses
# --------------------------------------------------------------------------------------------

SIZE, FOCAL = 32, 32.0
CENTRE = (SIZE - 1) / 2
K = np.array([[FOCAL, 0, CENTRE], [0, FOCAL, CENTRE], [0, 0, 1]], np.float32)
HALF = 0.15  # half side of the square, metres (4.8 px at 1 m)


def _square_centre(t):
    return -0.2 + 0.1 * t  # x of the square's centre at depth 1 m: 3.2 px per frame


def _square_angle(t):
    return 0.1 * t


def _rot_z(theta):
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _square_scene(num_frames=8):
    """Background plane at 2 m (id 0, static; top 3 rows id -1) and a square at 1 m (id 1)
    sliding right and spinning about its centre, rendered analytically."""
    vv, uu = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    depth = np.full((num_frames, SIZE, SIZE), 2.0, np.float32)
    seg = np.zeros((num_frames, SIZE, SIZE), np.int32)
    seg[:, :3] = -1
    poses = np.tile(np.eye(4, dtype=np.float32), (num_frames, 2, 1, 1))
    for t in range(num_frames):
        R = _rot_z(_square_angle(t))
        c = np.array([_square_centre(t), 0.0, 1.0])
        poses[t, 1, :3, :3] = R
        poses[t, 1, :3, 3] = c
        hit = np.stack([(uu - CENTRE) / FOCAL, (vv - CENTRE) / FOCAL, np.ones_like(uu)], -1)
        local = (hit - c) @ R  # R^T (p - c), row vectors
        on = (np.abs(local[..., 0]) <= HALF) & (np.abs(local[..., 1]) <= HALF)
        depth[t][on] = 1.0
        seg[t][on] = 1
    return depth, seg, poses


def _square_pixel_motion(uv, t, t2):
    """Where a point of the square at pixel uv at frame t is at frame t2: a 2D rigid motion."""
    c0 = np.array([CENTRE + FOCAL * _square_centre(t), CENTRE])
    c1 = np.array([CENTRE + FOCAL * _square_centre(t2), CENTRE])
    return c1 + (uv - c0) @ _rot_z(_square_angle(t2) - _square_angle(t))[:2, :2].T


def test_ground_truth_rigid_square_known_answers():
    depth, seg, poses = _square_scene()
    queries = np.array(
        [[9.5, 15.5], [11.0, 13.0], [13.0, 17.0], [15.0, 15.0], [15.0, 1.0], [40.0, 4.0]],
        np.float32,
    )
    horizon = 5
    tracks, visible = ground_truth_tracks.track_ground_truth(depth, seg, poses, K, queries, horizon)
    assert tracks.shape == (8, 6, 5, 2) and visible.shape == (8, 6, 5)
    np.testing.assert_array_equal(tracks[:, :, 0], np.broadcast_to(queries, (8, 6, 2)))

    # Points 0-2 lie on the square at frame 0 and follow its rigid motion exactly.
    for n in range(3):
        assert seg[0, round(float(queries[n, 1])), round(float(queries[n, 0]))] == 1
        for k in range(horizon):
            expected = _square_pixel_motion(queries[n].astype(np.float64), 0, k)
            np.testing.assert_allclose(tracks[0, n, k], expected, atol=1e-4)
    assert visible[0, 0].all()  # the centre stays on the square

    # Point 3 is background at frame 0; the square slides over it at frame 2.
    assert seg[0, 15, 15] == 0 and seg[2, 15, 15] == 1
    np.testing.assert_allclose(tracks[0, 3], np.broadcast_to([15.0, 15.0], (5, 2)), atol=1e-5)
    np.testing.assert_array_equal(visible[0, 3], seg[:5, 15, 15] == 0)
    # Point 4 is on no object (id -1): held and invisible after step 0. Point 5 is outside.
    np.testing.assert_array_equal(tracks[:, 4], np.broadcast_to(queries[4], (8, 5, 2)))
    assert visible[:, 4, 0].all() and not visible[:, 4, 1:].any()
    assert not visible[:, 5].any()

    # In every window, a trackable point is visible where it lands on its own object (depth
    # is constant per object here, so the depth test never decides).
    for t in range(8):
        for n in range(4):
            obj = seg[t, round(float(queries[n, 1])), round(float(queries[n, 0]))]
            for k in range(horizon):
                u, v = tracks[t, n, k]
                f = min(t + k, 7)
                inside = -0.5 <= u < SIZE - 0.5 and -0.5 <= v < SIZE - 0.5
                same = inside and seg[f, int(np.floor(v + 0.5)), int(np.floor(u + 0.5))] == obj
                assert visible[t, n, k] == (same or (k == 0 and inside)), (t, n, k)


def test_ground_truth_leaving_image_and_padding():
    depth, seg, poses = _square_scene()
    queries = np.array([[27.0, 15.5], [22.0, 14.0]], np.float32)  # on the square at frame 5
    assert (seg[5, 16, 27], seg[5, 14, 22]) == (1, 1)
    tracks, visible = ground_truth_tracks.track_ground_truth(depth, seg, poses, K, queries, 5)
    # Frame 7: the square's centre is at u = 31.5, so the first point is pushed out of the
    # image while its position keeps following the motion.
    expected = _square_pixel_motion(queries[0].astype(np.float64), 5, 7)
    assert expected[0] > SIZE - 0.5
    np.testing.assert_allclose(tracks[5, 0, 2], expected, atol=1e-4)
    assert visible[5, 0, 1] and not visible[5, 0, 2]
    # Window 5 runs past the last frame (7) at step 3: repeats step 2.
    np.testing.assert_array_equal(tracks[5, :, 2:], np.broadcast_to(tracks[5, :, 2:3], (2, 3, 2)))
    np.testing.assert_array_equal(visible[5, :, 2:], np.broadcast_to(visible[5, :, 2:3], (2, 3)))
    np.testing.assert_array_equal(tracks[7, :, 1:], np.broadcast_to(queries[:, None], (2, 4, 2)))


def test_ground_truth_moving_camera_depth_test_and_behind_camera():
    num_frames = 4
    depth = np.full((num_frames, SIZE, SIZE), 2.0, np.float32)
    seg = np.zeros((num_frames, SIZE, SIZE), np.int64)
    poses = np.tile(np.eye(4, dtype=np.float32), (num_frames, 1, 1, 1))
    poses[:, 0, 0, 3] = -0.1 * np.arange(num_frames)  # camera moves right: 1.6 px/frame at 2 m
    queries = np.array([[10.0, 10.0], [20.0, 12.0]], np.float32)
    depth[2, 12, 17] = 1.5  # something unsegmented in front of point 1 at frame 2
    tracks, visible = ground_truth_tracks.track_ground_truth(depth, seg, poses, K, queries, 3)
    steps = np.arange(3)[:, None] * np.array([-1.6, 0.0])
    np.testing.assert_allclose(tracks[0], queries[:, None] + steps, atol=1e-5)
    np.testing.assert_array_equal(visible[0], [[True, True, True], [True, True, False]])
    # A looser tolerance accepts the 0.5 m disagreement.
    _, loose = ground_truth_tracks.track_ground_truth(depth, seg, poses, K, queries, 3, depth_tolerance=0.6)
    assert loose[0].all()

    # The world moves towards the camera and behind it at step 2: position held, invisible.
    poses[:, 0] = np.eye(4)
    poses[:, 0, 2, 3] = [0.0, -1.0, -2.5, -2.5]  # depth 2, 1, -0.5, -0.5 m
    tracks, visible = ground_truth_tracks.track_ground_truth(depth, seg, poses, K, queries, 3)
    expected_step1 = CENTRE + (queries - CENTRE) * 2.0  # halving the depth doubles the offset
    np.testing.assert_allclose(tracks[0, :, 1], expected_step1, atol=1e-5)
    np.testing.assert_allclose(tracks[0, :, 2], expected_step1, atol=1e-5)
    assert not visible[0, :, 2].any()
    assert np.isfinite(tracks).all()


def test_ground_truth_bad_input():
    depth, seg, poses = _square_scene(3)
    q = np.zeros((2, 2), np.float32)
    cases = [
        ((depth[0], seg, poses, K, q, 2), "depth"),
        ((depth.astype(np.int32), seg, poses, K, q, 2), "depth"),
        ((depth, seg[:2], poses, K, q, 2), "segmentation"),
        ((depth, seg.astype(np.float32), poses, K, q, 2), "segmentation"),
        ((depth, seg, poses[:2], K, q, 2), "object_poses"),
        ((depth, seg, poses[..., :3, :], K, q, 2), "object_poses"),
        ((depth, seg, poses * np.nan, K, q, 2), "object_poses"),
        ((depth, seg, np.zeros_like(poses), K, q, 2), "singular"),
        ((depth, seg, poses, K[:2], q, 2), "K"),
        ((depth, seg, poses, K * 2, q, 2), "K"),
        ((depth, seg, poses, K, q[:, :1], 2), "queries"),
        ((depth, seg, poses, K, q, 0), "horizon"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            ground_truth_tracks.track_ground_truth(*args)


# --------------------------------------------------------------------------------------------
# Track files
# --------------------------------------------------------------------------------------------


def _random_tracks(num_frames=5, num_points=3, horizon=4, seed=0):
    rng = np.random.default_rng(seed)
    tracks = rng.uniform(0, 100, (num_frames, num_points, horizon, 2)).astype(np.float32)
    visible = rng.random((num_frames, num_points, horizon)) > 0.3
    return tracks, visible


def test_track_file_path():
    assert track_files.track_file_path("/data/tracks", 42).as_posix() == "/data/tracks/00000042.npz"
    for bad in (-1, 1.0, True):
        with pytest.raises(ValueError, match="episode_index"):
            track_files.track_file_path("/data/tracks", bad)


def test_track_file_round_trip(tmp_path):
    tracks, visible = _random_tracks()
    path = track_files.track_file_path(tmp_path / "tracks", 7)
    track_files.save_track_file(path, tracks, visible, image_size=(240, 320))
    assert path.name == "00000007.npz" and path.is_file()
    loaded, loaded_visible = track_files.load_track_file(path, 5, image_size=(240, 320))
    np.testing.assert_array_equal(loaded, tracks)
    np.testing.assert_array_equal(loaded_visible, visible)
    assert loaded.dtype == np.float32 and loaded_visible.dtype == np.bool_
    # Written by another tool: float64 tracks, 0/1 visibility, no image size.
    other = tmp_path / "other.npz"
    np.savez(other, tracks=tracks.astype(np.float64), visible=visible.astype(np.uint8))
    loaded, loaded_visible = track_files.load_track_file(other, 5, image_size=(1, 1))
    np.testing.assert_array_equal(loaded, tracks)
    np.testing.assert_array_equal(loaded_visible, visible)


def _write(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d, tr, vis: d / "missing.npz", "not found"),
        (lambda d, tr, vis: (d / "junk.npz").write_bytes(b"not a zip") and d / "junk.npz", "cannot read"),
        (lambda d, tr, vis: np.save(d / "a.npy", tr) or d / "a.npy", "not an .npz"),
        (lambda d, tr, vis: _write(d / "a.npz", tracks=tr), "missing key 'visible'"),
        (lambda d, tr, vis: _write(d / "a.npz", visible=vis), "missing key 'tracks'"),
        (lambda d, tr, vis: _write(d / "a.npz", tracks=tr[:4], visible=vis[:4]), "num_frames=5"),
        (lambda d, tr, vis: _write(d / "a.npz", tracks=tr, visible=vis[:, :2]), "visible: expected shape"),
        (lambda d, tr, vis: _write(d / "a.npz", tracks=tr[..., :1], visible=vis), "tracks: expected"),
        (lambda d, tr, vis: _write(d / "a.npz", tracks=tr.astype(np.int32), visible=vis), "tracks: expected"),
        (lambda d, tr, vis: _write(d / "a.npz", tracks=np.where(vis[..., None], tr, np.nan), visible=vis), "non-finite"),
        (lambda d, tr, vis: _write(d / "a.npz", tracks=tr, visible=vis * 0.5), "visible: expected bool"),
        (lambda d, tr, vis: _write(d / "a.npz", tracks=tr, visible=vis.astype(int) * 2), "visible: expected bool"),
        (lambda d, tr, vis: _write(d / "a.npz", tracks=tr, visible=vis, image_size=np.array([10, 20])), "frames are"),
        (lambda d, tr, vis: _write(d / "a.npz", tracks=tr, visible=vis, image_size=np.array([10])), "image_size"),
    ],
)
def test_track_file_validation(tmp_path, make, match):
    tracks, visible = _random_tracks()
    path = make(tmp_path, tracks, visible)
    with pytest.raises(ValueError, match=match) as info:
        track_files.load_track_file(path, 5, image_size=(240, 320))
    assert path.name in str(info.value)


def test_save_track_file_validates(tmp_path):
    tracks, visible = _random_tracks()
    with pytest.raises(ValueError, match="visible"):
        track_files.save_track_file(tmp_path / "a.npz", tracks, visible[:, :, :2])
    with pytest.raises(ValueError, match="image_size"):
        track_files.save_track_file(tmp_path / "a.npz", tracks, visible, image_size=(0, 5))


# --------------------------------------------------------------------------------------------
# Resizing tracks and evaluating them
# --------------------------------------------------------------------------------------------


def test_transform_tracks_known_answers():
    tracks = np.array([[-0.5, -0.5], [0.0, 0.0], [3.5, 1.5], [7.4, 3.4]], np.float32)
    visible = np.array([True, True, True, False])
    # Halve an 8x4 (W x H) image into 4x2, then pad one column on the left.
    out, out_visible = track_files.transform_tracks(tracks, (0.5, 0.5), (1.0, 0.0), (2, 5), visible)
    np.testing.assert_allclose(out, [[0.5, -0.5], [0.75, -0.25], [2.5, 0.5], [4.45, 1.45]], atol=1e-6)
    np.testing.assert_array_equal(out_visible, [True, True, True, False])
    # Crop 3 columns off the left: the first two points leave the image.
    out, out_visible = track_files.transform_tracks(tracks, (1.0, 1.0), (-3.0, 0.0), (4, 5), visible)
    np.testing.assert_allclose(out[:, 0], tracks[:, 0] - 3.0)
    np.testing.assert_array_equal(out_visible, [False, False, True, False])
    assert out.dtype == np.float32


@settings(max_examples=50, deadline=None)
@given(
    sx=st.floats(0.1, 10.0), sy=st.floats(0.1, 10.0), ox=st.floats(-50, 50), oy=st.floats(-50, 50),
    seed=st.integers(0, 2**16),
)
def test_transform_tracks_inverse_round_trip(sx, sy, ox, oy, seed):
    tracks, visible = _random_tracks(seed=seed)
    out, _ = track_files.transform_tracks(tracks, (sx, sy), (ox, oy), (1000, 1000), visible)
    # Inverse: u = (u' + 0.5 - ox) / sx - 0.5, i.e. scale 1/sx and offset -ox/sx.
    back, back_visible = track_files.transform_tracks(
        out, (1 / sx, 1 / sy), (-ox / sx, -oy / sy), (100, 100), np.ones_like(visible)
    )
    np.testing.assert_allclose(back, tracks, atol=1e-3 * max(1.0, 1 / sx, 1 / sy))
    # Identity maps the image onto itself; visibility only ever drops.
    same, same_visible = track_files.transform_tracks(tracks, (1, 1), (0, 0), (101, 101), visible)
    np.testing.assert_array_equal(same, tracks)
    np.testing.assert_array_equal(same_visible, visible)
    assert not (back_visible & ~np.all((back >= -0.5) & (back < 99.5), axis=-1)).any()


@pytest.mark.parametrize(
    "args, match",
    [
        ((np.zeros((3, 3)), (1, 1), (0, 0), (4, 4), np.ones(3, bool)), "tracks"),
        ((np.zeros((3, 2), int), (1, 1), (0, 0), (4, 4), np.ones(3, bool)), "tracks"),
        ((np.zeros((3, 2)), (1, 1), (0, 0), (4, 4), np.ones(2, bool)), "visible"),
        ((np.zeros((3, 2)), (1, 1), (0, 0), (4, 4), np.ones(3)), "visible"),
        ((np.zeros((3, 2)), (0, 1), (0, 0), (4, 4), np.ones(3, bool)), "scale"),
        ((np.zeros((3, 2)), (1,), (0, 0), (4, 4), np.ones(3, bool)), "scale"),
        ((np.zeros((3, 2)), (1, 1), (0, np.inf), (4, 4), np.ones(3, bool)), "offset"),
        ((np.zeros((3, 2)), (1, 1), (0, 0), (4, 0), np.ones(3, bool)), "out_size"),
        ((np.zeros((3, 2)), (1, 1), (0, 0), 4, np.ones(3, bool)), "out_size"),
    ],
)
def test_transform_tracks_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        track_files.transform_tracks(*args)


def test_track_errors_known_answer():
    gt = np.zeros((1, 2, 3, 2))
    pred = gt.copy()
    pred[0, 0, :, 0] = [5.0, 1.0, 2.0]  # step 0 is ignored
    pred[0, 1, :, 1] = [0.0, 3.0, 100.0]
    gt_visible = np.array([[[True, True, True], [True, True, False]]])
    pred_visible = np.array([[[True, True, False], [True, True, True]]])
    errors = tracking.track_errors(pred, gt, gt_visible, pred_visible)
    assert errors["num_points"] == 3
    assert errors["median"] == pytest.approx(2.0)
    assert errors["mean"] == pytest.approx(2.0)
    assert errors["p90"] == pytest.approx(2.8)
    assert errors["within_1px"] == pytest.approx(1 / 3)
    assert errors["visible_recall"] == pytest.approx(2 / 3)
    assert errors["visible_precision"] == pytest.approx(2 / 3)
    empty = tracking.track_errors(pred, gt, np.zeros_like(gt_visible))
    assert empty["num_points"] == 0 and np.isnan(empty["median"]) and np.isnan(empty["visible_recall"])
    with pytest.raises(ValueError, match="gt_visible"):
        tracking.track_errors(pred, gt, gt_visible[..., :2])
    with pytest.raises(ValueError, match="pred_tracks"):
        tracking.track_errors(pred[..., :1, :], gt, gt_visible)
    with pytest.raises(ValueError, match="pred_visible"):
        tracking.track_errors(pred, gt, gt_visible, pred_visible.astype(int))


@pytest.mark.parametrize("orientation,want", [
    ("rotate_180", [[6.0, 3.0], [0.0, 5.0]]),
    ("mirror_lr", [[6.0, 2.0], [0.0, 0.0]]),
    ("flip_ud", [[1.0, 3.0], [7.0, 5.0]]),
    ("none", [[1.0, 2.0], [7.0, 0.0]]),
])
def test_transform_tracks_flip_matches_frame_orientation(orientation, want):
    """Negative scales are the flips frames.FrameTransform applies to the frames (LIBERO)."""
    from data_pipelines.frames import plan_frames

    tf = plan_frames((6, 8), (6, 8), orientation=orientation)
    img = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    tracks = np.array([[[[1.0, 2.0], [7.0, 0.0]]]], np.float32)  # [T=1 N=1 L=2 2]
    out, vis = track_files.transform_tracks(tracks, tf.scale, tf.offset, (6, 8),
                                            np.ones((1, 1, 2), bool))
    np.testing.assert_allclose(out[0, 0], want)
    assert vis.all()
    turned = tf(img)
    for (u, v), (u2, v2) in zip(tracks[0, 0], out[0, 0], strict=True):
        np.testing.assert_array_equal(turned[int(v2), int(u2)], img[int(v), int(u)])
