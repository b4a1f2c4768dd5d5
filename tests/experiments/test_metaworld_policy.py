"""AVDC's closed-loop policy and the evaluation's bookkeeping, without a simulator: a point hand
moves 1 cm per action unit per step, as Meta-World's mocap does."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.metaworld import evaluation as ev
from experiments.metaworld.policy import (
    GRIP_CLOSE,
    GRIP_OPEN,
    ClosedLoopPolicy,
    ControlConfig,
    MotionPlan,
    PlanUnavailable,
)


def push_plan() -> MotionPlan:
    return MotionPlan(np.array([0.1, 0.7, 0.05]), np.array([0.1, 0.62, 0.05]),
                      np.array([[0.1, 0.7, 0.02], [0.1, 0.8, 0.02], [0.1, 0.9, 0.02]]), False)


def grasp_plan() -> MotionPlan:
    return MotionPlan(np.array([0.0, 0.6, 0.03]), np.array([0.0, 0.6, 0.03]),
                      np.array([[0.0, 0.6, 0.2], [0.1, 0.7, 0.3]]), True)


def rollout(policy: ClosedLoopPolicy, hand, steps: int, moves: bool = True):
    hand = np.asarray(hand, np.float64)
    hands, actions = [], []
    for _ in range(steps):
        a = policy.act(np.concatenate([hand, np.zeros(36)]))
        if moves:
            hand = hand + 0.01 * a[:3]
        hands.append(hand.copy())
        actions.append(a)
    return np.array(hands), np.array(actions)


def test_push_goes_above_then_down_then_through_the_waypoints():
    # No replans: a finished plan stalls on its last waypoint, which would replan.
    policy = ClosedLoopPolicy(lambda: push_plan(), ControlConfig(max_replans=0))
    hands, actions = rollout(policy, [0.0, 0.5, 0.2], 300)
    # First it climbs to 20 cm above the pre-contact point, reaching its xy before descending.
    above = np.argmax(np.linalg.norm(hands[:, :2] - [0.1, 0.62], axis=1) <= 0.02)
    assert hands[above, 2] > 0.2
    down = np.argmax(policy_grasped_at := (np.abs(hands[:, 2] - 0.05) <= 0.04))
    assert policy_grasped_at.any() and down > above
    # A push keeps the gripper closed from the start; the hand ends on the last waypoint.
    assert np.all(actions[:, 3] == GRIP_CLOSE)
    np.testing.assert_allclose(hands[-1], [0.1, 0.9, 0.02], atol=0.01)
    assert policy.replans == 0 and len(policy.waypoints) == 1


def test_grasp_opens_on_the_way_and_closes_at_the_object():
    policy = ClosedLoopPolicy(lambda: grasp_plan(), ControlConfig(max_replans=0))
    hands, actions = rollout(policy, [0.0, 0.4, 0.3], 300)
    assert actions[0, 3] == GRIP_OPEN
    closed = np.argmax(actions[:, 3] == GRIP_CLOSE)
    assert abs(hands[closed - 1, 2] - 0.03) < 0.04 + 0.011  # close_height
    assert np.all(actions[closed:, 3] == GRIP_CLOSE)  # holds on once closed
    np.testing.assert_allclose(hands[-1], [0.1, 0.7, 0.3], atol=0.01)


@pytest.mark.parametrize("config, lowest", [(ControlConfig(max_replans=0), (0.0, 0.045)),
                                            (ControlConfig.avdc(max_replans=0), (0.05, 0.075))])
def test_grasp_settles_at_the_object_before_lifting_unlike_avdc(config, lowest):
    # AVDC lifts as soon as the hand is within 4 cm of the grasp point (z 0.03); flipjax keeps
    # going down to it for 10 more steps while the fingers close.
    policy = ClosedLoopPolicy(lambda: grasp_plan(), config)
    hands, _ = rollout(policy, [0.0, 0.6, 0.3], 120)
    assert lowest[0] < hands[:, 2].min() < lowest[1]
    assert policy.replans == 0 and hands[-1, 2] > 0.15


def test_stall_triggers_replans_up_to_the_limit():
    calls = []

    def planner():
        calls.append(1)
        return push_plan()

    policy = ClosedLoopPolicy(planner, ControlConfig(plan_timeout=15, max_replans=2))
    rollout(policy, [0.0, 0.5, 0.2], 15, moves=False)
    assert len(calls) == 1  # 14 still steps after the first: not yet
    rollout(policy, [0.0, 0.5, 0.2], 2, moves=False)
    assert len(calls) == 2 and policy.replans == 1
    rollout(policy, [0.0, 0.5, 0.2], 200, moves=False)
    assert len(calls) == 3 and policy.replans == 2


def test_moving_hand_never_replans():
    calls = []
    policy = ClosedLoopPolicy(lambda: calls.append(1) or push_plan(),
                              ControlConfig(plan_timeout=15))
    hands, _ = rollout(policy, [0.0, 0.5, 0.2], 60)
    assert len(calls) == 1 and np.all(np.linalg.norm(np.diff(hands, axis=0), axis=1) > 1e-3)


def test_unavailable_replan_keeps_the_plan_and_uses_a_replan():
    state = {"n": 0}

    def planner():
        state["n"] += 1
        if state["n"] > 1:
            raise PlanUnavailable("object hidden")
        return push_plan()

    policy = ClosedLoopPolicy(planner, ControlConfig(plan_timeout=3, max_replans=1))
    rollout(policy, [0.0, 0.5, 0.2], 30, moves=False)
    assert policy.failed_replans == ["object hidden"] and policy.replans == 1
    assert len(policy.plans) == 1 and state["n"] == 2
    with pytest.raises(PlanUnavailable):
        ClosedLoopPolicy(lambda: (_ for _ in ()).throw(PlanUnavailable("none")))


def test_a_held_object_stays_held_through_a_replan():
    policy = ClosedLoopPolicy(lambda: grasp_plan(), ControlConfig(plan_timeout=5))
    rollout(policy, [0.0, 0.4, 0.3], 60)
    assert policy.grasped and policy.replans == 0
    rollout(policy, [0.1, 0.7, 0.3], 10, moves=False)  # stalls at the end: replans
    assert policy.replans >= 1 and policy.grasped


def test_bad_inputs_are_named():
    policy = ClosedLoopPolicy(lambda: push_plan())
    with pytest.raises(ValueError, match="obs"):
        policy.act(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="waypoints"):
        MotionPlan(np.zeros(3), np.zeros(3), np.zeros((3, 2)), False)
    with pytest.raises(ValueError, match="pre_contact"):
        MotionPlan(np.zeros(3), np.zeros(4), np.zeros((3, 3)), False)
    with pytest.raises(ValueError, match="non-finite"):
        MotionPlan(np.zeros(3), np.zeros(3), np.full((2, 3), np.nan), False)


def test_parsers():
    assert ev.parse_seeds("0-2,7,1") == [0, 1, 2, 7]
    for bad in ("", "3-1", "a", "-2"):
        with pytest.raises(ValueError, match="--seeds"):
            ev.parse_seeds(bad)
    assert ev.parse_list("all", ("a", "b"), "tasks") == ["a", "b"]
    assert ev.parse_list("b, a", ("a", "b"), "tasks") == ["b", "a"]
    with pytest.raises(ValueError, match="--tasks: unknown \\['c'\\]"):
        ev.parse_list("a,c", ("a", "b"), "tasks")


def test_summary_and_table_count_correctly():
    records = [{"task": t, "camera": c, "seed": s, "success": ok, "replans": r}
               for t, c, s, ok, r in [("door-open", "corner", 0, True, 0),
                                      ("door-open", "corner2", 0, False, 5),
                                      ("hammer", "corner", 0, False, 1),
                                      ("hammer", "corner", 1, True, 2)]]
    s = ev.summarize(records)
    assert s["overall_success_rate"] == 0.5 and s["episodes"] == 4
    assert s["per_task"]["door-open"] == {"success_rate": 0.5, "successes": 1, "episodes": 2}
    assert s["per_camera"]["corner"]["success_rate"] == pytest.approx(2 / 3)
    assert s["per_task_camera"]["hammer"]["corner2"]["episodes"] == 0
    assert s["mean_replans"] == 2.0
    table = ev.markdown_table({**s, "per_task_camera": {
        "door-open": s["per_task_camera"]["door-open"]}}, "t")
    assert "| door-open | 100% (1/1) | 0% (0/1) | 50% (1/2) |" in table
    assert "**50.0%** (2/4)" in table
