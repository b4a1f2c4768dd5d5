"""The learnability ladder's scenes have the answers they claim."""

import numpy as np
import pytest

from data_pipelines.toy import ladder


def _colour_at(hist, points):
    """float[N 3] colour of the first history frame at the nearest pixel of each point."""
    ij = np.clip(np.rint(points).astype(int), 0, hist.shape[1] - 1)
    return (hist[0][ij[:, 1], ij[:, 0]] + 1.0) / 2.0


@pytest.mark.parametrize("rung", ladder.RUNGS)
def test_points_on_the_named_block_move_by_the_stated_steps_and_nothing_else_does(rung):
    b = ladder.make_batch(rung, np.random.default_rng(1), 24, num_points=40)
    assert b["history"].shape == (24, 2, 32, 32, 3) and b["flow"].shape == (24, 40, 4, 2)
    assert b["history"].min() >= -1 and b["history"].max() <= 1
    np.testing.assert_array_equal(b["history"][:, 0], b["history"][:, 1])  # blocks at rest
    for i in range(24):
        steps = np.diff(b["flow"][i], axis=1)  # [N 3 2]
        moving = np.abs(steps).sum(-1).max(-1) > 0
        want = 2.0 * ladder.DIRECTIONS[b["direction"][i]]
        np.testing.assert_allclose(steps[moving], np.broadcast_to(want, steps[moving].shape),
                                   atol=1e-5)
        # Interior points (away from the block edges) are coloured like the block iff they move.
        q = b["flow"][i, :, 0]
        colour = _colour_at(b["history"][i], q)
        is_block = ~np.all(np.isclose(colour, ladder.TABLE), axis=-1)
        frac = np.abs(q - np.rint(q))
        interior = np.all(frac < 0.45, axis=-1)
        if rung == "two_objects":
            moving_colour = colour[moving][0]
            is_block &= np.all(np.isclose(colour, moving_colour), axis=-1)
        np.testing.assert_array_equal(moving[interior], is_block[interior])
        assert moving.mean() >= 0.4  # half the points are drawn on the moving block


@pytest.mark.parametrize("rung", ["free_direction", "two_objects"])
def test_future_frames_show_the_named_block_moved_by_the_flow(rung):
    b = ladder.make_batch(rung, np.random.default_rng(2), 8)
    assert b["future"].shape == (8, 3, 32, 32, 3)
    table = 2 * ladder.TABLE - 1
    for i in range(8):
        start = b["history"][i, -1]
        if rung == "two_objects":
            colour = 2 * ladder.COLOURS[b["text"][i, 0, :4].argmax()] - 1
        else:
            colour = start[np.any(start != table, axis=-1)][0]
        block = np.all(np.isclose(start, colour), axis=-1)
        for k in range(3):
            du, dv = (2 * (k + 1) * ladder.DIRECTIONS[b["direction"][i]]).astype(int)
            want = start.copy()
            want[block] = table
            want[np.roll(block, shift=(dv, du), axis=(0, 1))] = colour
            np.testing.assert_allclose(b["future"][i, k], want, atol=1e-6)


def test_what_each_rung_tells_the_model():
    rng = np.random.default_rng(0)
    one = ladder.make_batch("one_object", rng, 16)
    assert np.all(one["direction"] == 0) and not one["text"].any()
    free = ladder.make_batch("free_direction", rng, 64)
    assert not free["text"].any() and len(set(free["direction"])) == 4
    told = ladder.make_batch("text_direction", rng, 16)
    np.testing.assert_array_equal(told["text"][:, 0, 4:].argmax(-1), told["direction"])
    assert not told["text"][:, 0, :4].any()
    two = ladder.make_batch("two_objects", rng, 16)
    np.testing.assert_array_equal(two["text"][:, 0, 4:].argmax(-1), two["direction"])
    assert np.all(two["text"][:, 0, :4].sum(-1) == 1)  # one colour named
    # Two colours in every frame besides the table.
    for h in two["history"][:, 0]:
        colours = {tuple(c) for c in np.round((h.reshape(-1, 3) + 1) / 2, 3)}
        assert len(colours) == 3


def test_deterministic_and_bad_input():
    a = ladder.make_batch("two_objects", np.random.default_rng(5), 4)
    b = ladder.make_batch("two_objects", np.random.default_rng(5), 4)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    with pytest.raises(ValueError, match="unknown rung 'nope'"):
        ladder.make_batch("nope", np.random.default_rng(0), 1)
    with pytest.raises(ValueError, match="does not fit in 32 px"):
        ladder.make_batch("one_object", np.random.default_rng(0), 1, block=24)
