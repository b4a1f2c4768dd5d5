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
