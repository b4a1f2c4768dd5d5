"""benchmarks.warp_baseline: the no-network warp beside copying, known answers."""

import numpy as np
import pytest

from benchmarks import warp_baseline as wb


def _clips(moving: bool):
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (1, 1, 8, 8, 3), dtype=np.uint8)
    history = np.repeat(frame, 2, axis=1)
    # One track per 2x2 cell at its centre (pixel 2j + 0.5 in the tracks' pixel-index units,
    # as the toy world's 16x16 grid on 32x32 frames): the factor-2 latent cells' centres.
    cols, rows = np.meshgrid(2 * np.arange(4) + 0.5, 2 * np.arange(4) + 0.5)
    start = np.stack([cols.ravel(), rows.ravel()], -1)
    tracks = np.repeat(start[None, :, None], 4, axis=2).astype(np.float32)
    future = np.repeat(frame, 3, axis=1).copy()
    if moving:   # a 4x4 patch of the frame slides one pixel to the right each step
        patch = frame[0, 0, 2:6, 1:5].copy()
        for k in range(3):
            future[0, k] = frame[0, 0]
            future[0, k, 2:6, 2 + k:6 + k] = patch
        on = ((start[:, 1] > 2) & (start[:, 1] < 6) & (start[:, 0] > 1) & (start[:, 0] < 5))
        tracks[0, on, 1:, 0] += np.arange(1, 4, dtype=np.float32)
    return history, future, tracks


def test_still_tracks_at_the_cell_centres_warp_to_copying_in_every_setting():
    out = wb.score(*_clips(moving=False))
    assert out["copy"]["psnr"] == 100.0          # the future is the current frame: the cap
    assert len(out["warps"]) == len(wb.FACTORS) * len(wb.SETTINGS)
    for w in out["warps"]:
        if w["factor"] == 2:
            assert w["psnr"] == pytest.approx(out["copy"]["psnr"]), w
        else:   # four tracks per 4x4 cell, none at its centre: the bilinear read blurs
            assert w["psnr"] < 60.0, w


def test_a_moving_patch_is_followed_better_than_copying_it():
    out = wb.score(*_clips(moving=True))
    fine = [w for w in out["warps"] if w["factor"] == 2 and w["front_gain"] == wb.FRONT_GAIN]
    assert fine[0]["moving_psnr"] > out["copy"]["moving_psnr"] + 1.0


def test_a_missing_clip_directory_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="no such directory"):
        wb.main(["--clips", str(tmp_path / "nope"), "--out", str(tmp_path / "o.json")])


def test_a_directory_without_clips_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"manifest\.json"):
        wb.main(["--clips", str(tmp_path), "--out", str(tmp_path / "o.json")])
