"""Bodies of the Meta-World evaluation tests. They render, so ``test_eval_metaworld`` runs each
in a fresh interpreter (``tests.sim_support.in_fresh_process``); pytest does not collect this
file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_pipelines.metaworld import sim as ms
from experiments.metaworld import evaluation as ev
from experiments.metaworld import planners as mp


def oracle_factory(method="flipjax"):
    return lambda scene: mp.oracle_planner(scene, method=method)


def oracle_solves_button_press():
    record, frames = ev.run_episode("button-press", "corner", 0, oracle_factory(),
                                    video_every=10)
    assert record["success"] and record["replans"] == 0
    assert 0 < record["first_success_step"] < 200 and record["is_grasp"] is False
    # The exact tracks of a button press: it moves about 8 cm and the fit explains all of them.
    plan = record["plans"][0]
    assert plan["inlier_fraction"] > 0.95 and 0.05 < plan["object_motion_m"] < 0.12
    assert len(frames) == record["steps"] // 10 + 2 and frames[0].shape == (128, 128, 3)


def oracle_tracks_follow_the_object_in_later_renders():
    """The oracle's tracks at the last instant land on the object as the simulator renders it
    there: poses, K, extrinsics and the frames' 180-degree turn agree."""
    task, camera = "door-close", "corner2"
    env, twin = ms.make_env(task, 1), ms.make_env(task, 1)
    renderer = ms.Renderer(env.model, 128, 128)
    try:
        scene = mp.Scene(task, camera, 1, env, renderer, twin)
        obs = scene.observe()
        assert renderer.view(env.data, camera).rolled
        rng = np.random.default_rng(0)
        pixels, points = mp.sample_object_points(obs["mask"], obs["depth"], obs["K"], rng, 200)
        tracks, visible = mp.oracle_tracks(scene, obs, points, frames=8)
        assert tracks.shape == (8, 200, 2) and visible.all()
        np.testing.assert_allclose(tracks[0], pixels, atol=1e-3)
        assert np.linalg.norm(tracks[-1] - tracks[0], axis=-1).mean() > 5  # the door moved
        # Render the twin where the expert left it (the last instant of the tracks) and
        # compare with where the points should be, independently of oracle_tracks' code.
        body = ms.target_body(env.model, task)
        world = obs["world_from_camera"]
        move = ms.body_poses(twin.data)[body] @ np.linalg.inv(ms.body_poses(env.data)[body])
        X = np.linalg.inv(world) @ move @ world @ np.c_[points, np.ones(len(points))].T
        uv = (obs["K"] @ X[:3]).T
        np.testing.assert_allclose(tracks[-1], uv[:, :2] / uv[:, 2:], atol=1e-3)
        later = renderer.render(twin.data, camera)
        px = np.round(tracks[-1]).astype(int)
        assert ((px >= 0) & (px < 128)).all()
        # Every moved point is either what the render sees there or hidden behind something
        # nearer (the arm, the lock, the door's own far side once it has turned): never is
        # the render looking past where the door should be. Most land on the door itself.
        # (3x3 neighbourhood: a point on the silhouette may round to a background pixel.)
        padded = np.pad(later["depth"], 1, mode="edge")
        depth = np.min([padded[px[:, 1] + dy, px[:, 0] + dx]
                        for dy in range(3) for dx in range(3)], axis=0)
        assert np.all(depth < X[2] + 0.02), np.max(depth - X[2])
        on_body = ms.body_segmentation(env.model, later["geoms"])[px[:, 1], px[:, 0]] == body
        assert on_body.mean() > 0.5
    finally:
        renderer.close()


def cli_writes_results_and_resumes(tmp_path: str):
    tmp_path = Path(tmp_path)
    out = tmp_path / "r.json"
    result = ev.evaluate("oracle", ["button-press"], ["corner3"], [1], out, videos=1,
                         progress=False)
    assert result["overall_success_rate"] == 1.0 and result["episodes"] == 1
    assert result["per_task_camera"]["button-press"]["corner3"]["successes"] == 1
    saved = json.loads(out.read_text())
    assert saved["per_task"]["button-press"]["success_rate"] == 1.0
    assert "| button-press | 100% (1/1) | 100% (1/1) |" in out.with_suffix(".md").read_text()
    assert (tmp_path / "r_videos" / "button-press_corner3_1.gif").stat().st_size > 0
    log = out.with_suffix(".episodes.jsonl").read_text()
    # A rerun reads the finished episode back instead of running it again.
    again = ev.evaluate("oracle", ["button-press"], ["corner3"], [1], out, progress=False)
    assert out.with_suffix(".episodes.jsonl").read_text() == log
    assert again["episode_seconds_total"] == result["episode_seconds_total"]
    # A record cut short by an interruption is run again; a damaged earlier line is named.
    log_path = out.with_suffix(".episodes.jsonl")
    log_path.write_text(log + '{"task": "button-pr')
    assert ev.evaluate("oracle", ["button-press"], ["corner3"], [1], out,
                       progress=False)["episodes"] == 1
    assert [json.loads(x)["seed"] for x in log_path.read_text().splitlines()[1:]] == [1]
    lines = log.splitlines()
    log_path.write_text("\n".join([lines[0], "{oops", lines[1]]) + "\n")
    with pytest.raises(ValueError, match="line 2: not an episode record"):
        ev.evaluate("oracle", ["button-press"], ["corner3"], [1], out, progress=False)
    log_path.write_text(log)
    with pytest.raises(ValueError, match=r"other settings.*frames"):
        ev.evaluate("oracle", ["button-press"], ["corner3"], [1], out, frames=4, progress=False)
    with pytest.raises(ValueError, match="mode must be one of"):
        ev.evaluate("video", ["button-press"], ["corner3"], [1], tmp_path / "x.json")


def avdc_mode_solves_button_press():
    record, _ = ev.run_episode("button-press", "corner", 0, oracle_factory("avdc"))
    assert record["success"]


def model_mode_runs_with_tiny_random_models(root: str, tmp_path: str):
    tmp_path = Path(tmp_path)
    result = ev.evaluate("model", ["button-press"], ["corner"], [0], tmp_path / "m.json",
                         videos=0, max_replans=1, progress=False,
                         model_options={"runs": str(root), "plan_overrides":
                                        "beams=1,candidates=2,horizon=1,sample_steps=2"})
    record = json.loads((tmp_path / "m.episodes.jsonl").read_text().splitlines()[1])
    assert result["settings"]["image_size"] == 32  # the models' frame size, not the default
    assert record["steps"] > 0 and 1 <= len(record["plans"]) <= 2
    assert all(np.isfinite(p["best_return"]) for p in record["plans"])
