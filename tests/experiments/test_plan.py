"""``python -m experiments.plan`` on toy problems with random-init runs: files, summary, the
search's invariants in the written plans, resumption, and errors."""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("matplotlib")

from data_pipelines.toy import problems as tp
from experiments import plan as plan_cli
from experiments.configs import plan as plan_config_file
from flipjax import builders
from tests.experiments.helpers import cvae_small, dit_small

ROOT = pathlib.Path(__file__).resolve().parents[2]
TEXT_TOKENS, TEXT_DIM = 16, 32
# The :runlocal search: 2 beams, 2 candidates, 2 planning steps of L - 1 = 3 frames.
BEAMS, HORIZON, FRAMES, HISTORY = 2, 2, 3, 3


@pytest.fixture(scope="module")
def runs(planning_runs):
    """A quickstart-like workdir of random-init :runlocal cvae/, dit/ (pixel codec), value/."""
    return planning_runs[0]


def _cli(workdir, runs, *extra):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "experiments.plan",
         "--config=experiments/configs/plan.py:runlocal", f"--workdir={workdir}",
         f"--config.runs={runs}", "--config.compare_no_value=True", "--config.mesh.data=2",
         "--config.write_media=1", *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def planned(runs, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("plan_out") / "plans"
    res = _cli(workdir, runs)
    assert res.returncode == 0, res.stderr[-4000:]
    return workdir, res


def _local_config(runs, **fields):
    c = plan_config_file.get_config("runlocal")
    c.runs, c.compare_no_value, c.write_media = str(runs), True, 1
    c.mesh.data = 2
    for k, v in fields.items():
        c[k] = v
    return c


def _rigid(m):
    m = np.asarray(m)
    return (np.allclose(m[:3, :3] @ m[:3, :3].T, np.eye(3), atol=1e-4)
            and np.isclose(np.linalg.det(m[:3, :3]), 1.0, atol=1e-4)
            and np.allclose(m[3], [0, 0, 0, 1]))


def test_cli_writes_plans_media_and_summary(planned):
    workdir, res = planned
    assert "problem 2/2 planned" in res.stderr and "plans/s" in res.stderr
    assert "value-guided success rate" in res.stderr and "FLIP-NV success rate" in res.stderr
    gif = Image.open(workdir / "problems" / "0" / "plan.gif")
    assert gif.n_frames == HISTORY + HORIZON * FRAMES
    for name in ("values.png", "plan_no_value.gif", "values_no_value.png"):
        assert (workdir / "problems" / "0" / name).stat().st_size > 1000, name
    # write_media=1: only the first problem gets media.
    assert sorted(p.name for p in (workdir / "problems" / "1").iterdir()) == ["plan.json"]

    summary = json.loads((workdir / plan_cli.SUMMARY_FILE).read_text())
    assert summary["num_problems"] == summary["planned"] == 2
    for suffix in ("", "_no_value"):
        assert 0.0 <= summary[f"success_rate{suffix}"] <= 1.0
        assert summary[f"evaluated{suffix}"] == 2
        assert summary[f"success_count{suffix}"] == summary[f"success_rate{suffix}"] * 2
    assert summary["devices"] == 2 and summary["plans_per_second_with_compile"] > 0
    assert summary["scripted_success_rate"] == 1.0
    assert 0.0 <= summary["success_rate_scripted_plan"] <= 1.0
    assert summary["settings"]["beams"] == BEAMS
    # Random-init CVAE: its latent moves the flows, so its candidates differ.
    assert summary["candidate_spread_px"] > 0 and summary["candidate_displacement_px"] > 0
    # Two problems: the value prefers 0, 1 or 2 faithful endings to the failed ones.
    assert summary["value_prefers_success"] in (0.0, 0.5, 1.0)
    assert np.isfinite(summary["value_success_margin"])
    # The dynamics precondition: copying the current frame is a finite reference, the two
    # generations are finite and the truth moves (the problems start at contact).
    for key in ("psnr_true_flow", "psnr_still_flow", "psnr_copy", "change"):
        assert np.isfinite(summary[f"dynamics_{key}"]), key
    assert summary["dynamics_future_change"] > 0


def test_written_plans_keep_the_search_invariants(planned, runs):
    workdir, _ = planned
    toy = tp.make_problems(2, 0, image_size=32, history=HISTORY, text_dim=TEXT_DIM,
                           text_max_tokens=TEXT_TOKENS)
    for i in range(2):
        rec = json.loads((workdir / "problems" / str(i) / "plan.json").read_text())
        assert rec["instruction"] == toy.instructions[i]
        assert rec["source"]["task"] == toy.tasks[i].kind
        for name in ("value_guided", "no_value"):
            entry = rec[name]
            values, returns = np.asarray(entry["values"]), np.asarray(entry["returns"])
            assert values.shape == (BEAMS, HORIZON) and returns.shape == (BEAMS,)
            # Returns are the discounted sums of the kept values (discount 0.99).
            np.testing.assert_allclose(returns, values @ 0.99 ** np.arange(HORIZON),
                                       rtol=1e-4, atol=1e-5)
            out = entry["outcome"]
            assert _rigid(out["motion_world"])
            # The recorded success is the predicate of the recorded motion.
            assert out["success"] == tp.success_after(toy, i, np.asarray(out["motion_world"]))
        oracle = rec["scripted_plan"]["outcome"]
        assert _rigid(oracle["motion_world"])
        assert oracle["success"] == tp.success_after(toy, i, np.asarray(oracle["motion_world"]))
        # :runlocal adds a 5 x 5 window of queries around the block to the 8 x 8 grid.
        assert rec["source"]["object_queries"] >= 3
        assert rec["value_guided"]["best"] == int(np.argmax(rec["value_guided"]["returns"]))
        assert rec["no_value"]["best"] == 0  # FLIP-NV: beams are exchangeable


def test_rerun_skips_finished_problems_and_replans_the_same(planned, runs):
    workdir, _ = planned
    paths = [workdir / "problems" / str(i) / "plan.json" for i in range(2)]
    before = [json.loads(p.read_text()) for p in paths]
    stamp = paths[0].stat().st_mtime_ns
    # Problem 1 is planned again, now alone in its batch; problem 0 is skipped.
    paths[1].unlink()
    summary = plan_cli.run(_local_config(runs), workdir)
    assert summary["planned_this_run"] == 1 and summary["planned"] == 2
    assert paths[0].stat().st_mtime_ns == stamp
    # Its key depends on the seed and its index only, so it gets the same plan.
    again = json.loads(paths[1].read_text())
    for name in ("value_guided", "no_value"):
        np.testing.assert_allclose(again[name]["values"], before[1][name]["values"],
                                   rtol=1e-4, atol=1e-5)
        assert again[name]["best"] == before[1][name]["best"]
        assert again[name]["outcome"]["success"] == before[1][name]["outcome"]["success"]
    # The summary is recomputed from every plan.json, old and new.
    assert summary["success_count"] == sum(r["value_guided"]["outcome"]["success"]
                                           for r in (before[0], again))
    # Other search settings in the same workdir are refused.
    with pytest.raises(ValueError, match="beams"):
        plan_cli.run(_local_config(runs, beams=3), workdir)


def test_missing_run_directory_is_named(runs, tmp_path):
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "nowhere" / "cvae"))):
        plan_cli.run(_local_config(tmp_path / "nowhere"), tmp_path / "out")
    with pytest.raises(ValueError, match=r"missing_value.*config\.value_dir"):
        plan_cli.run(_local_config(runs, value_dir=str(tmp_path / "missing_value")),
                     tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written before the check
    with pytest.raises(ValueError, match=r"config\.runs"):
        plan_cli.run_dirs(plan_config_file.get_config())


def test_cli_names_a_missing_run(tmp_path):
    res = _cli(tmp_path / "out", tmp_path / "nowhere")
    assert res.returncode != 0
    assert f"run directory {tmp_path / 'nowhere' / 'cvae'} does not exist" in res.stderr


def test_config_and_search_settings():
    c = plan_config_file.get_config()
    assert not c.runlocal and c.problems == "toy" and c.num_problems == 50
    with pytest.raises(AttributeError):
        c.not_a_field = 1  # locked
    local = plan_config_file.get_config("runlocal")
    assert local.num_problems == 2 and local.horizon == 2
    with pytest.raises(ValueError, match="runlocal"):
        plan_config_file.get_config("fast")
    schedule = builders.build_schedule(dit_small.get_config("runlocal"))
    search = plan_cli.plan_config(local, schedule)
    assert search.sample_steps == 2 and search.clip_x0 == 4.0 and search.use_value
    local.sample_steps, local.clip_x0 = "ddim25", 0.0
    search = plan_cli.plan_config(local, schedule, use_value=False)
    assert search.sample_steps == "ddim25" and search.clip_x0 is None and not search.use_value


def test_summary_of_written_plans(tmp_path):
    outcomes = [(True, False, "push"), (True, True, "push"), (False, False, "place")]
    for i, (vg, nv, task) in enumerate(outcomes):
        folder = tmp_path / "problems" / str(i)
        folder.mkdir(parents=True)
        rec = {"source": {"task": task, "scripted_success": True}}
        for name, ok in (("value_guided", vg), ("no_value", nv)):
            rec[name] = {"best_return": float(i), "outcome": {
                "success": ok, "target_distance_m": 0.1, "block_displacement_m": 0.0}}
        (folder / "plan.json").write_text(json.dumps(rec))
    s = plan_cli.summarize(tmp_path, 4)  # problem 3 is not planned yet
    assert s["planned"] == 3 and s["num_problems"] == 4
    assert s["success_rate"] == pytest.approx(2 / 3) and s["success_count"] == 2
    assert s["success_rate_no_value"] == pytest.approx(1 / 3)
    assert s["successes_by_task"] == {"push": {"count": 2, "value_guided": 2, "no_value": 1},
                                      "place": {"count": 1, "value_guided": 0, "no_value": 0}}
    assert s["mean_best_return"] == pytest.approx(1.0)


def test_clip_directory_problems(toy_dirs):
    import types

    config = plan_config_file.get_config("runlocal")
    config.problems, config.num_problems = str(toy_dirs[1]), 3
    action_config = cvae_small.get_config("runlocal")
    problems = plan_cli.build_problems(config, types.SimpleNamespace(history_frames=3),
                                       action_config)
    assert problems.history.shape == (3, 3, 32, 32, 3) and problems.history.dtype == np.uint8
    assert problems.text_tokens.shape == (3, TEXT_TOKENS, TEXT_DIM)
    # The instruction looked up for each clip is the one its token states encode.
    from data_pipelines.text import make_text_encoder

    tokens, mask = make_text_encoder("hash", dim=TEXT_DIM, max_tokens=TEXT_TOKENS).encode(
        problems.instructions)
    np.testing.assert_array_equal(problems.text_tokens, tokens.astype(np.float16))
    np.testing.assert_array_equal(problems.text_mask, mask)
    assert all(s["kind"] == "clip" for s in problems.sources)
    action_config.model.language_dim = 16
    with pytest.raises(ValueError, match="text_dim 32"):
        plan_cli.build_problems(config, types.SimpleNamespace(history_frames=3), action_config)
    config.problems = str(toy_dirs[1] / "nope")
    with pytest.raises(ValueError, match="neither 'toy' nor a build_clips directory"):
        plan_cli.build_problems(config, types.SimpleNamespace(history_frames=3),
                                cvae_small.get_config("runlocal"))


def test_plan_drawings():
    from flipjax import viz

    history = np.full((2, 16, 16, 3), 100, np.uint8)
    videos = np.zeros((2, 3, 16, 16, 3), np.float32)
    start = np.stack(np.meshgrid(np.arange(2, 16, 4), np.arange(2, 16, 4)), -1).reshape(-1, 2)
    still = np.broadcast_to(start.astype(np.float32), (2, 4, 16, 2))
    moving = still + np.arange(4)[None, :, None, None] * np.array([2.0, 0.0], np.float32)
    frames = viz.plan_video_frames(history, videos, moving, values=np.zeros(2), title="t",
                                   size=96)
    assert frames.shape == (2 + 2 * 3, 96, 96, 3) and frames.dtype == np.uint8
    calm = viz.plan_video_frames(history, videos, still, size=96)
    # The history is drawn without tracks; generated frames carry their step's tracks.
    colour = lambda im: int((np.ptp(im.astype(int), axis=-1) > 60).sum())
    assert colour(frames[4]) > colour(calm[4]) + 20
    # Frame k of a step shows the tracks up to that frame: later frames draw more.
    assert colour(frames[4]) > colour(frames[2])
    with pytest.raises(ValueError, match=r"flows: expected \[2 4 N 2\]"):
        viz.plan_video_frames(history, videos, moving[:, :3])
    image = viz.beam_values_image(np.array([[0.1, 0.2], [0.3, 0.1], [0.0, 0.5]]), 2,
                                  returns=np.zeros(3), size=(160, 240))
    red = (image[..., 0] > 180) & (image[..., 1] < 90) & (image[..., 2] < 90)
    assert image.shape == (160, 240, 3) and red.sum() > 20  # the chosen beam, highlighted
    with pytest.raises(ValueError, match="best=3"):
        viz.beam_values_image(np.zeros((3, 2)), 3)


def test_object_window_queries():
    mask = np.zeros((32, 32), bool)
    mask[10:13, 20:24] = True  # centroid (u, v) = (21.5, 11) -> rounds to (22, 11)
    q = plan_cli.object_window(mask, 2)
    assert q.shape == (25, 2)
    np.testing.assert_array_equal(q.mean(0), [22, 11])
    assert mask[q[:, 1].astype(int), q[:, 0].astype(int)].sum() == 12  # all of it
    corner = np.zeros((32, 32), bool)
    corner[0, 31] = True  # the window slides inward and keeps its size
    q = plan_cli.object_window(corner, 3)
    assert q.shape == (49, 2) and q[:, 0].max() == 31 and q[:, 1].min() == 0
    np.testing.assert_array_equal(plan_cli.object_window(np.zeros((32, 32), bool), 1).mean(0),
                                  [16, 16])
    with pytest.raises(ValueError, match="does not fit a 32x32 frame"):
        plan_cli.object_window(mask, 16)
