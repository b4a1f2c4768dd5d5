"""Known answers of the image metrics flipjax.metrics.psnr / ssim."""

import math

import numpy as np
import pytest

from flipjax import metrics


def test_psnr_uint8_known_answers():
    target = np.zeros((2, 4, 5, 3), np.uint8)
    pred = target.copy()
    pred[0] = 255  # MSE = 255^2 -> 0 dB
    pred[1] = 1  # MSE = 1 -> 20 log10(255)
    np.testing.assert_allclose(np.asarray(metrics.psnr(pred, target)),
                               [0.0, 20 * math.log10(255)], rtol=1e-5, atol=1e-5)


def test_psnr_float_uses_the_minus_one_to_one_range():
    rng = np.random.default_rng(0)
    target = rng.uniform(-0.8, 0.8, (3, 8, 8, 3)).astype(np.float32)
    pred = target + 0.2  # MSE 0.04, peak-to-peak 2 -> 10 log10(4 / 0.04) = 20 dB
    np.testing.assert_allclose(np.asarray(metrics.psnr(pred, target)), [20.0] * 3, rtol=1e-4)
    # [0, 1] images: the caller names the range.
    np.testing.assert_allclose(float(metrics.psnr(pred[0], target[0], max_value=1.0)),
                               10 * math.log10(1 / 0.04), rtol=1e-4)


def test_psnr_half_the_pixels_wrong():
    target = np.zeros((4, 4, 1), np.uint8)
    pred = target.copy()
    pred[:2] = 10  # MSE = 100 / 2 = 50
    assert float(metrics.psnr(pred, target)) == pytest.approx(10 * math.log10(255**2 / 50),
                                                              rel=1e-5)


def test_psnr_identical_images_are_infinite():
    x = np.full((6, 6, 3), 7, np.uint8)
    assert math.isinf(float(metrics.psnr(x, x)))


def test_psnr_errors_name_the_problem():
    x = np.zeros((2, 4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.psnr(x, x[:1])
    with pytest.raises(ValueError, match="mix integer and float"):
        metrics.psnr(x, x.astype(np.float32))
    with pytest.raises(ValueError, match=r"H W C"):
        metrics.psnr(x[0, 0], x[0, 0])


def test_ssim_known_answers():
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(metrics.ssim(x, x)), [1.0, 1.0], rtol=1e-5)
    # Constant images: no variance, so SSIM is the luminance term alone.
    a, b = 0.3, -0.2
    c1 = (0.01 * 2.0) ** 2
    want = (2 * a * b + c1) / (a * a + b * b + c1)
    got = metrics.ssim(np.full((12, 12, 1), b, np.float32), np.full((12, 12, 1), a, np.float32))
    assert float(got) == pytest.approx(want, rel=1e-5)
    # Noise lowers it, and more noise lowers it more.
    noisy = [float(metrics.ssim(x[0] + s * rng.normal(size=x[0].shape).astype(np.float32), x[0]))
             for s in (0.05, 0.5)]
    assert 1.0 > noisy[0] > noisy[1]
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(x[:, :8, :8], x[:, :8, :8])


def test_ssim_matches_tensorflow():
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (2, 20, 24, 3)).astype(np.uint8)
    b = np.clip(a.astype(np.int32) + rng.integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
    want = tf.image.ssim(tf.constant(a), tf.constant(b), max_val=255).numpy()
    np.testing.assert_allclose(np.asarray(metrics.ssim(a, b)), want, rtol=1e-4, atol=1e-5)


def test_changed_psnr_pools_only_the_pixels_that_differ_from_the_reference():
    from flipjax.metrics import changed_psnr
    ref = np.zeros((2, 4, 4, 3), np.uint8)
    target = ref.copy()
    target[0, 1, 1] = 100          # one changed pixel in image 0
    target[1, 2, 3, 0] = 50        # one changed pixel (one channel) in image 1
    pred = target.copy()
    pred[0, 1, 1] = 90             # error 10 on 3 channels of the first changed pixel
    pred[1, 0, 0] = 200            # an error on an unchanged pixel does not count
    mse = (3 * 10**2 + 0) / (2 * 3)
    np.testing.assert_allclose(changed_psnr(pred, target, ref), 10 * np.log10(255**2 / mse),
                               rtol=1e-6)
    # Predicting the reference itself: the changes' own energy.
    mse_ref = (3 * 100**2 + 50**2) / 6
    np.testing.assert_allclose(changed_psnr(ref, target, ref[:1]), 10 * np.log10(255**2 / mse_ref),
                               rtol=1e-6)
