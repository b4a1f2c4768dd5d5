"""Faithful and failed endings of one toy scene: the value module's same-scene negatives."""

import dataclasses

import numpy as np
import pytest

from data_pipelines.toy import problems as tp
from data_pipelines.toy.endings import ending_pairs
from data_pipelines.toy.world import ToyConfig

SIZE, FRAMES, DIM, TOKENS, NUM = 32, 2, 32, 16, 4
WORLD = ToyConfig(image_size=SIZE, speed=0.045)


def test_plan_split_pairs_are_the_planning_problems_endings():
    pairs = ending_pairs(NUM, 0, "plan", frames=FRAMES, text_dim=DIM, text_max_tokens=TOKENS,
                         toy_config=WORLD)
    problems = tp.make_problems(NUM, 0, image_size=SIZE, history=1, text_dim=DIM,
                                text_max_tokens=TOKENS, toy_config=WORLD)
    assert pairs.success.shape == pairs.failure.shape == (NUM, FRAMES, SIZE, SIZE, 3)
    assert pairs.success.dtype == np.uint8
    np.testing.assert_array_equal(pairs.success, tp.ending_clips(problems, FRAMES))
    np.testing.assert_array_equal(pairs.failure, tp.ending_clips(problems, FRAMES, failed=True))
    np.testing.assert_array_equal(pairs.text_tokens, problems.text_tokens)
    np.testing.assert_array_equal(pairs.text_mask, problems.text_mask)
    assert pairs.instructions == problems.instructions
    # Every failed script is a real failure of its scene's faithful script.
    assert pairs.valid.all() and all(f for f in pairs.failures)
    assert all(np.any(pairs.success[i] != pairs.failure[i]) for i in range(NUM))


def test_train_pairs_are_the_training_scenes_and_ignore_failure_fraction():
    from data_pipelines.toy.tasks import episode_rng, sample_episode

    kw = dict(frames=FRAMES, text_dim=DIM, text_max_tokens=TOKENS)
    a = ending_pairs(2, 5, "train", toy_config=WORLD, **kw)
    b = ending_pairs(2, 5, "train", toy_config=dataclasses.replace(WORLD, failure_fraction=0.5),
                     **kw)
    np.testing.assert_array_equal(a.success, b.success)
    np.testing.assert_array_equal(a.failure, b.failure)
    assert a.instructions == [sample_episode(episode_rng(5, "train", i), WORLD).task.instruction
                              for i in range(2)]
    with pytest.raises(ValueError, match="frames"):
        ending_pairs(2, 5, "train", toy_config=WORLD, **{**kw, "frames": 0})


def test_cached_pairs_are_the_rendered_pairs_and_are_not_rendered_twice(tmp_path, monkeypatch):
    from data_pipelines.toy import endings

    kw = dict(frames=FRAMES, text_dim=DIM, text_max_tokens=TOKENS, toy_config=WORLD)
    first = endings.cached_ending_pairs(tmp_path, 2, 0, "plan", **kw)
    fresh = ending_pairs(2, 0, "plan", **kw)
    monkeypatch.setattr(endings, "ending_pairs", lambda *a, **k: pytest.fail("re-rendered"))
    again = endings.cached_ending_pairs(tmp_path, 2, 0, "plan", **kw)
    for got in (first, again):
        for f in ("success", "failure", "text_tokens", "text_mask", "valid"):
            np.testing.assert_array_equal(getattr(got, f), getattr(fresh, f))
        assert got.instructions == fresh.instructions and got.failures == fresh.failures
    assert len(list(tmp_path.glob("*.npz"))) == 1
    # A smaller count is the prefix of the larger rendering, not a new one.
    one = endings.cached_ending_pairs(tmp_path, 1, 0, "plan", **kw)
    np.testing.assert_array_equal(one.success, fresh.success[:1])
    assert one.instructions == fresh.instructions[:1]


def test_shift_clips_translates_each_clip_by_one_offset_and_repeats_the_edge():
    from data_pipelines.toy.endings import shift_clips

    clips = np.zeros((3, 2, 8, 8, 3), np.uint8)
    clips[:, :, 4, 4] = 200
    out = shift_clips(clips, np.random.default_rng(1), 2)
    assert out.shape == clips.shape and out.dtype == np.uint8
    for i in range(3):
        (ys, xs) = np.nonzero(out[i, 0, ..., 0])
        assert len(ys) == 1 and abs(ys[0] - 4) <= 2 and abs(xs[0] - 4) <= 2
        np.testing.assert_array_equal(out[i, 0], out[i, 1])  # the same offset for every frame
    assert shift_clips(clips, np.random.default_rng(1), 0) is clips
    edge = np.zeros((1, 1, 4, 4, 3), np.uint8)
    edge[..., 0, :, :] = 9  # the top row; a downward shift repeats it
    shifted = shift_clips(edge, np.random.default_rng(0), 3)
    assert set(np.unique(shifted)) <= {0, 9}
    with pytest.raises(ValueError, match="max_shift"):
        shift_clips(clips, np.random.default_rng(0), -1)


def test_a_corrupt_cache_entry_is_rendered_again(tmp_path):
    from data_pipelines.toy import endings

    kw = dict(frames=FRAMES, text_dim=DIM, text_max_tokens=TOKENS, toy_config=WORLD)
    fresh = endings.cached_ending_pairs(tmp_path, 1, 0, "plan", **kw)
    (entry,) = tmp_path.glob("*.npz")
    entry.write_bytes(b"not a zip file")
    again = endings.cached_ending_pairs(tmp_path, 1, 0, "plan", **kw)
    np.testing.assert_array_equal(again.success, fresh.success)
    with np.load(entry) as z:  # rewritten whole
        np.testing.assert_array_equal(z["success"], fresh.success)
