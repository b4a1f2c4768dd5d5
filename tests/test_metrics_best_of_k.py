"""metrics.best_of_k picks, per clip, the sample nearest the truth on the valid steps."""

import jax.numpy as jnp
import numpy as np
import pytest

from flipjax import metrics


def test_best_of_k_picks_per_clip_and_respects_valid_steps():
    rng = np.random.default_rng(0)
    gt = jnp.asarray(rng.normal(size=(3, 4, 5, 2)), jnp.float32)
    offsets = jnp.asarray([2.0, 0.5, 1.0])[:, None, None, None, None]
    samples = gt[None] + offsets * jnp.ones((3, 3, 4, 5, 2))
    # Clip 1: sample 2 is exact on every step.
    samples = samples.at[2, 1].set(gt[1])
    best = metrics.best_of_k(samples, gt)
    np.testing.assert_allclose(best[0], samples[1, 0])
    np.testing.assert_allclose(best[1], gt[1])
    np.testing.assert_allclose(best[2], samples[1, 2])
    # Only the valid steps count: sample 0 is exact there, far off elsewhere.
    valid = jnp.zeros((3, 4, 4), bool).at[:, 0].set(True)
    far = samples.at[0, :, 1:].add(100.0).at[0, :, 0].set(gt[:, 0])
    picked = metrics.best_of_k(far, gt, valid)
    np.testing.assert_allclose(picked, far[0])
    assert float(metrics.ade(picked, gt, valid)) == pytest.approx(0.0, abs=1e-6)


def test_best_of_k_shapes():
    with pytest.raises(ValueError, match="gt_flow"):
        metrics.best_of_k(jnp.zeros((2, 3, 4, 5, 2)), jnp.zeros((3, 4, 6, 2)))
