"""The learnability ladders' benchmarks run end to end and report exact baselines."""

import json

import pytest


def test_cvae_ladder_writes_figures_beside_the_no_motion_baseline(tmp_path):
    from benchmarks import cvae_ladder

    out = tmp_path / "cvae.json"
    cvae_ladder.main(["--out", str(out), "--rungs", "free_direction", "--steps", "2",
                      "--train_scenes", "8", "--eval_scenes", "8", "--batch", "4"])
    r = json.loads(out.read_text())
    assert r["model"] == "flipjax" and r["overrides"]["point_features"] > 0
    fig = r["rungs"]["free_direction"]
    # Still points miss a block moving 2 px per step by 2, 4, 6 px: 4 on average.
    assert fig["held_out_still"] == pytest.approx(4.0) == fig["train_still"]
    for k in ("posterior", "prior", "best_of_8", "prior_all", "still_all"):
        assert fig[f"held_out_{k}"] >= 0.0
    assert fig["held_out_best_of_8"] <= fig["held_out_prior"] + 1e-5
    with pytest.raises(SystemExit):
        cvae_ladder.main(["--out", str(out), "--set", "nonsense=1"])
    with pytest.raises(SystemExit):
        cvae_ladder.main(["--out", str(out), "--rungs", "nope"])


def test_dit_ladder_writes_figures_beside_copying(tmp_path):
    from benchmarks import dit_ladder

    out = tmp_path / "dit.json"
    dit_ladder.main(["--out", str(out), "--rungs", "one_object", "--steps", "2",
                     "--train_scenes", "8", "--eval_scenes", "4", "--batch", "2",
                     "--set", "sample_steps=2"])
    fig = json.loads(out.read_text())["rungs"]["one_object"]
    assert fig["latent_scale"] > 1.0  # "unit": pixels in [-1, 1] have a std below 1
    # Copying is exact off the moving block, so its PSNR is finite and above its moving part.
    assert fig["held_out_copy"] > fig["held_out_moving_copy"] > 0.0
    for k in ("psnr", "still_flow", "moving_true", "moving_still"):
        assert fig[f"held_out_{k}"] > 0.0
