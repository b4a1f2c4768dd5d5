"""Drawing helpers: plots render to images of the asked size with visible content; files."""

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("PIL")

from PIL import Image

from flipjax import viz


def _coloured_pixels(image):
    return int((np.ptp(image.astype(int), axis=-1) > 60).sum())


def test_value_curve_image_draws_the_curves():
    image = viz.value_curve_image([np.linspace(-1, 1, 5), np.zeros(3)],
                                  [np.arange(5), np.arange(0, 6, 2)], "t", size=(200, 300))
    assert image.shape == (200, 300, 3) and image.dtype == np.uint8
    # Not a blank canvas: the lines are coloured.
    assert _coloured_pixels(image) > 50


def test_flow_panels_draw_tracks_over_the_frame():
    frame = np.full((32, 32, 3), 128, np.uint8)
    start = np.stack(np.meshgrid(np.arange(4, 32, 8), np.arange(4, 32, 8)), -1).reshape(-1, 2)
    moving = start[:, None] + np.linspace(0, 6, 4)[None, :, None] * np.array([1.0, 0.5])
    still = np.repeat(start[:, None].astype(float), 4, axis=1)
    image = viz.flow_panels_image(frame, {"truth": moving, "sample": still}, panel_size=120)
    assert image.shape == (120, 240, 3)
    # Coloured track segments only where the tracks move: the left panel.
    assert _coloured_pixels(image[:, :120]) > 20 + _coloured_pixels(image[:, 120:])


def test_to_uint8_and_files(tmp_path):
    x = np.array([[-1.0, 0.0, 1.0, 2.0]])[..., None].repeat(3, -1)
    np.testing.assert_array_equal(viz.to_uint8(x)[..., 0], [[0, 128, 255, 255]])
    frames = np.random.default_rng(0).integers(0, 255, (3, 8, 8, 3), dtype=np.uint8)
    viz.write_image(tmp_path / "a.png", frames[0])
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png")), frames[0])
    viz.write_video(tmp_path / "v.gif", frames)
    assert Image.open(tmp_path / "v.gif").n_frames == 3
    with pytest.raises(ValueError, match=r"uint8\[T H W 3\]"):
        viz.write_video(tmp_path / "w.gif", frames[0])
