"""experiments/configs/toy_world_model.py: one file holds every module's settings, and the
quickstart trainer applies them onto each module's config (unknown keys refused in one line)."""

import os
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from experiments.configs import toy_world_model
from experiments.trainers import quickstart

ROOT = Path(__file__).resolve().parents[2]


def resolved(config, module, tmp_path):
    return quickstart.module_config(config, module, tmp_path, tmp_path / "train",
                                    tmp_path / "val")


@pytest.mark.parametrize("arg", [None, "quick", "runlocal"])
def test_overrides_reach_the_module_configs(arg, tmp_path):
    c = toy_world_model.get_config(arg)
    assert quickstart.selected_modules(c) == ["cvae", "dit", "value"]
    assert (c.dit_codec, c.toy_speed, c.plan.compare_no_value) == ("pixels", 0.045, True)
    cvae = resolved(c, "cvae", tmp_path)
    assert cvae.model.img_size == (32, 32) and cvae.toy_speed == 0.045
    assert (cvae.model.point_features, cvae.model.unit_coords, cvae.model.latent_to_queries) \
        == (32, True, True)
    assert (cvae.loss.up_weight, cvae.loss.kl, cvae.loss.kl_batch_sum, cvae.loss.robust_kl) \
        == (1.0, 0.1, False, False)
    assert (cvae.model.point_feature_layers, cvae.model.point_feature_dilation) == (4, 2)
    assert (cvae.model.relative_flow, cvae.model.learned_prior, cvae.model.latent_dim,
            cvae.model.context_point_features) == (True, True, 4, True)
    assert (cvae.num_points, cvae.moving_fraction, cvae.learning_rate, cvae.schedule,
            cvae.batch_size) == (64, 0.5, 1e-3, "cosine", 16)
    assert cvae.loss.direction == 10.0  # fields the file does not set keep the module's
    dit = resolved(c, "dit", tmp_path)
    assert (dit.codec.kind, dit.flow_normalization, dit.model.flow_warp, dit.schedule,
            dit.batch_size, dit.prediction, dit.model.flow_residual,
            dit.model.residual_gate) == ("pixels", "unit", True, "cosine", 8, "x0", True, True)
    value = resolved(c, "value", tmp_path)
    assert (value.loss.success_ranking, value.loss.infonce, value.model.patch,
            value.model.embed_dim, value.ranking_batch, value.ema_decay) == (
                1.0, 0.0, 4, 128, 32, 0.99)
    for sub in (cvae, dit, value):
        assert sub.data_dir == str(tmp_path / "train") and sub.seed == c.seed
        assert sub.total_steps == c[sub.trainer].total_steps
    if arg is None:
        assert sum(toy_world_model.STEPS.values()) == sum(
            s.total_steps for s in (cvae, dit, value))
        assert (dit.eval_sample_steps, c.plan.num_problems) == (50, 100)
    else:
        assert max(s.total_steps for s in (cvae, dit, value)) <= 5


def test_bad_argument_and_unknown_keys_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="unknown config argument 'full' for toy_world_model"):
        toy_world_model.get_config("full")
    base = toy_world_model.get_config("quick")
    cases = [
        (("cvae", "model", "nonsense"), 1, r"config\.cvae\.model\.nonsense: unknown field "
                                           r"\(not in experiments/configs/cvae\.py:S,runlocal\)"),
        (("dit", "nonsense"), 1, r"config\.dit\.nonsense: unknown field"),
        (("value", "toy_speed"), 0.1, r"config\.value\.toy_speed: every module reads the same "
                                      r"toy clips; set config\.toy_speed instead"),
        (("cvae", "batch_size"), "x", r"config\.cvae\.batch_size='x': "),
        (("dit", "codec"), 4, r"config\.dit\.codec: is a group of fields"),
    ]
    for path, value, match in cases:
        d = base.to_dict()
        group = d[path[0]]
        for name in path[1:-1]:
            group = group[name]
        group[path[-1]] = value
        c = ml_collections.ConfigDict(d)
        with pytest.raises(ValueError, match=match) as e:
            resolved(c, path[0], tmp_path)
        assert "\n" not in str(e.value)


def test_quickstart_without_overrides_is_unchanged(tmp_path):
    from experiments.configs import cvae
    from experiments.configs import quickstart as quickstart_config

    c = quickstart_config.get_config()
    assert "cvae" not in c and quickstart.module_overrides(c, "cvae") == {}
    sub = resolved(c, "cvae", tmp_path)
    ref = cvae.get_config("S,runlocal")
    assert sub.model.to_dict() == ref.model.to_dict() and sub.loss.to_dict() == ref.loss.to_dict()
    assert sub.total_steps == c.total_steps


def test_cli_reports_an_unknown_override_in_one_line(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "experiments.train",
         "--config=experiments/configs/toy_world_model.py:quick", f"--workdir={tmp_path}",
         "--config.cvae.nonsense=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu"})
    assert res.returncode == 1
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert lines[-1].startswith("train: error:") and "nonsense" in lines[-1], res.stderr[-2000:]
