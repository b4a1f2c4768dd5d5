"""benchmarks.action_ceiling: the action module planned with true frames, read out like plans."""

import json

import jax
import numpy as np
import pytest

from benchmarks import action_ceiling


@pytest.fixture(scope="module", params=[0, 1], ids=["fixed", "follow"])
def ceiling(request, planning_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("ceiling") / "ceiling.json"
    action_ceiling.main(["--runs", str(planning_runs[0]), "--out", str(out), "--quick",
                         "--problems", "2", "--candidates", "2", "--query_grid", "4",
                         "--follow_queries", str(request.param)])
    return json.loads(out.read_text()), planning_runs[0]


def test_every_mode_is_scored_on_every_problem(ceiling):
    res, _ = ceiling
    assert res["problems"] == 2 and res["candidates"] == 2 and res["query_grid"] == 4
    assert res["follow_queries"] in (True, False)
    for mode in action_ceiling.MODES:
        assert 0.0 <= res[f"success_{mode}"] <= 1.0
        assert len(res["per_problem"][mode]) == 2
        assert res[f"success_{mode}"] == np.mean(res["per_problem"][mode])
        assert res[f"target_distance_m_{mode}"] >= 0.0
        assert res[f"displacement_ratio_{mode}"] >= 0.0
    # The script's own tracks move the block exactly as far as the script.
    assert res["displacement_ratio_scripted"] == pytest.approx(1.0)
    assert set(res["targets_met"]) == {f"{m}_allows_the_planning_target"
                                       for m in action_ceiling.MODES}


def test_the_scripted_mode_is_the_planners_oracle_readout(ceiling):
    """The script's tracks read out here succeed exactly where ``experiments.plan``'s
    scripted-plan oracle does (same problems, queries, chunks and fit key)."""
    from experiments.configs import plan as plan_configs
    from experiments.configs import toy_world_model
    from experiments.plan.problems import build_problems
    from experiments.plan.runner import load_world_model
    from experiments.plan.scoring import oracle_outcome
    from experiments.trainers.quickstart import apply_overrides
    from flipjax.planning import Plan

    res, runs = ceiling
    pc = plan_configs.get_config()
    apply_overrides(pc, toy_world_model.get_config("quick").plan.to_dict(), "config.plan",
                    source="plan.py")
    pc.runs, pc.seed, pc.num_problems, pc.query_grid = str(runs), 0, 2, 4
    world, _, action_config = load_world_model(pc)
    problems = build_problems(pc, world, action_config)
    length = res["flow_horizon"]
    for i in range(2):
        shape = (1, 1, res["horizon"], length, len(problems.queries[i]), 2)
        plan = Plan(flows=np.zeros(shape, np.float32), latents=None, videos=None, values=None,
                    returns=None, best=np.zeros(1, np.int32))
        want = oracle_outcome(problems, i, plan, jax.random.fold_in(jax.random.key(1), i),
                              follow=res["follow_queries"])
        assert res["per_problem"]["scripted"][i] == want["success"]


def test_a_directory_without_runs_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="no cvae/ run"):
        action_ceiling.main(["--runs", str(tmp_path), "--out", str(tmp_path / "a.json")])
