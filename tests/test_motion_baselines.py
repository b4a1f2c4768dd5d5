"""benchmarks.motion_baselines: the hand-written motion predictors the CVAE is measured against."""

import numpy as np
import pytest

from benchmarks.motion_baselines import constant_velocity, score


def _block(x0: float, v: float, length: int = 4) -> np.ndarray:
    """float[2 L 2]: a moving point at (x0, 5) and a still one at (20, 20)."""
    steps = np.arange(length)
    moving = np.stack([x0 + v * steps, np.full(length, 5.0)], -1)
    still = np.tile([[20.0, 20.0]], (length, 1))
    return np.stack([moving, still])


def test_constant_velocity_extrapolates_what_landed_on_the_point():
    prev, now = _block(5.0, 2.0), _block(7.0, 2.0)
    pred = constant_velocity(now, prev, radius=1.0)
    np.testing.assert_allclose(pred, now)              # exact for a constant motion
    # Nothing landed within the radius: the point stays still.
    far = constant_velocity(_block(12.0, 2.0), prev, radius=1.0)
    np.testing.assert_allclose(far[0], np.tile([[12.0, 5.0]], (4, 1)))
    with pytest.raises(ValueError, match="share L"):
        constant_velocity(now[:, :3], prev, 1.0)


def test_score_compares_against_no_motion_on_moving_steps():
    clips = {(0, 0): _block(5.0, 2.0), (0, 1): _block(7.0, 2.0), (1, 3): _block(0.0, 3.0)}
    out = score(clips, radius=1.0)
    assert out["clips_scored"] == 1 and out["moving_steps"] == 3
    assert out["constant_velocity_ade_moving"] == pytest.approx(0.0)
    assert out["still_ade_moving"] == pytest.approx((2 + 4 + 6) / 3)
    assert out["ratio"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="consecutive"):
        score({(0, 0): _block(5.0, 2.0)}, 1.0)
