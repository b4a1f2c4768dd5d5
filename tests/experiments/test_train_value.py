"""The value-module trainer end to end on toy clips: runlocal runs, exact resume, configs, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("grain")

from PIL import Image

from experiments import train as train_cli
from experiments.trainers import value
from experiments.training import clips, loop
from flipjax import builders
from flipjax.checkpoints import Checkpointer, load_params
from flipjax.models.value import ValueConfig
from tests.experiments.helpers import BATCH, runlocal_config, value_clip, value_liv


def local_config(module, toy_dirs, total_steps, eval_episodes=0, **fields):
    fields.setdefault("eval_preference_problems", 0)
    return runlocal_config(module, toy_dirs, total_steps, eval_episodes=eval_episodes, **fields)


def check_run(workdir, config, steps, eval_step):
    """A finished run: finite losses each step, eval scores and plot, checkpoint, params."""
    records = loop.read_metrics(workdir)
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    for r in train:
        assert all(math.isfinite(r[k]) for k in ("loss", "vip_image", "vip_text", "infonce"))
    (ev,) = [r for r in records if r["split"] == "eval"]
    assert ev["step"] == eval_step
    assert 0.0 <= ev["monotonicity"] <= 1.0 and -1.0 <= ev["spearman"] <= 1.0
    assert 0.0 <= ev["image_monotonicity"] <= 1.0 and -1.0 <= ev["image_spearman"] <= 1.0
    bound = 1.0 / (1.0 - config.model.gamma)
    assert abs(ev["value_first"]) <= bound + 1e-4 and abs(ev["value_last"]) <= bound + 1e-4
    image = np.asarray(Image.open(workdir / "samples" / f"value_curves_{eval_step:08d}.png"))
    assert image.shape == (320, 480, 3) and image.std() > 0
    with Checkpointer(workdir) as ckpt:
        assert ckpt.latest_step() == steps
    assert {"vision", "text", "image_proj", "text_proj"} <= set(load_params(workdir))


# Slow: the default run covers the trainer with value.py:clip
# (test_clip_runlocal_runs_and_resumes_exactly) and the one-frame LIV model
# (tests/models/test_value.py::test_single_frame_variant_is_clip_length_one).
@pytest.mark.slow
def test_liv_runlocal_two_steps(toy_dirs, tmp_path):
    config = local_config(value_liv, toy_dirs, 2, eval_episodes=2)
    config.eval_stride = 3  # fewer states per curve: a faster eval, same code path
    state = value.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 2 and int(state.skipped) == 0
    assert builders.value_config(config).clip_len == 1
    check_run(tmp_path, config, 2, 2)


def test_clip_runlocal_runs_and_resumes_exactly(toy_dirs, tmp_path):
    # The uninterrupted run doubles as value_clip's :runlocal check (eval at its last step).
    config = local_config(value_clip, toy_dirs, 6, eval_episodes=2)
    config.eval_stride = 3
    straight = value.train_and_evaluate(config, str(tmp_path / "a"))
    assert builders.value_config(config).clip_len == 4
    check_run(tmp_path / "a", config, 6, 6)
    value.train_and_evaluate(local_config(value_clip, toy_dirs, 3), str(tmp_path / "b"))
    resumed = value.train_and_evaluate(local_config(value_clip, toy_dirs, 6),
                                       str(tmp_path / "b"))
    assert int(resumed.step) == 6
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(straight.params),
                 jax.device_get(resumed.params))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(straight.ema),
                 jax.device_get(resumed.ema))
    losses = [{r["step"]: r["loss"] for r in loop.read_metrics(tmp_path / d)
               if r["split"] == "train"} for d in ("a", "b")]
    assert losses[0] == losses[1] and sorted(losses[0]) == [1, 2, 3, 4, 5, 6]


def test_text_width_mismatch_is_a_clear_error(toy_dirs, tmp_path):
    config = local_config(value_clip, toy_dirs, 1)
    config.model.language_dim = 64
    with pytest.raises(ValueError, match=r"text_dim 32 != the model's language width 64"):
        value.train_and_evaluate(config, str(tmp_path))


def test_failed_scripts_are_refused(tmp_path):
    config = value_clip.get_config("runlocal")
    config.toy_failure_fraction = 0.3
    with pytest.raises(ValueError, match="successful episodes only"):
        value.train_and_evaluate(config, str(tmp_path))
    assert not (tmp_path / "toy_data").exists()


def test_missing_data_is_a_clear_error(tmp_path):
    config = value_clip.get_config()
    with pytest.raises(ValueError, match="data_dir"):
        clips.data_dirs(config, tmp_path)
    config.data_dir = str(tmp_path / "nope")
    with pytest.raises(ValueError, match="does not exist"):
        value.train_and_evaluate(config, str(tmp_path / "run"))


def test_configs_build_without_data():
    full = value_clip.get_config()
    assert full.trainer == "value" and not full.runlocal and not full.build_toy_data_if_missing
    assert full.learning_rate == 1e-5
    cfg = builders.value_config(full)
    assert (cfg.image_size, cfg.patch, cfg.vision_width, cfg.clip_len) == (224, 16, 768, 4)
    assert builders.value_config(value_liv.get_config()).clip_len == 1
    with pytest.raises(AttributeError):
        full.not_a_field = 1  # locked
    for module, clip_len in ((value_clip, 4), (value_liv, 1)):
        local = module.get_config("runlocal")
        cfg = builders.value_config(local)
        assert local.runlocal and local.total_steps == 50 and local.batch_size == 4
        assert (cfg.image_size, cfg.patch, cfg.vision_width, cfg.clip_len) == (32, 8, 32,
                                                                               clip_len)
        assert (local.model.language_dim, local.toy_image_size, local.toy_horizon,
                local.toy_grid, local.toy_text_max_tokens) == (32, 32, 4, 8, 16)
        with pytest.raises(ValueError, match="runlocal"):
            module.get_config("fast")
    assert isinstance(cfg, ValueConfig)
    assert "value" in train_cli.available_trainers()
    assert train_cli.get_trainer("value") is value.train_and_evaluate


def test_prepare_frames_crops_and_resizes():
    # 4x6 frames: a 4x4 centre square of 255 between black side columns.
    frames = np.zeros((2, 4, 6, 3), np.uint8)
    frames[:, :, 1:5] = 255
    out = value.prepare_frames(jnp.asarray(frames), 4)
    np.testing.assert_allclose(out, np.ones((2, 4, 4, 3)))
    ramp = np.broadcast_to(np.arange(0, 256, 8, dtype=np.uint8)[None, :, None], (32, 32, 3))
    small = np.asarray(value.prepare_frames(jnp.asarray(ramp), 16))
    assert small.shape == (16, 16, 3)
    # Antialiased 2x downsampling of a linear ramp averages pixel pairs.
    want = (np.arange(0, 256, 8, dtype=np.float32).reshape(16, 2).mean(1) / 127.5 - 1.0)
    np.testing.assert_allclose(small[5, 1:-1, 0], want[1:-1], atol=1e-5)
    with pytest.raises(ValueError, match="frames"):
        value.prepare_frames(jnp.zeros((4, 4)), 4)



def ranking_config(toy_dirs, total_steps, **fields):
    config = local_config(value_clip, toy_dirs, total_steps, toy_ranking_scenes=6, **fields)
    config.loss.success_ranking = 1.0
    return config


@pytest.mark.slow  # the default run: test_ranking_alone_with_text_token_and_shifts_...
def test_success_ranking_trains_and_reports_preference(toy_dirs, tmp_path):
    # Exact resume of the pair draws is PairedLoader's test below; this is the wiring.
    config = ranking_config(toy_dirs, 2, eval_preference_problems=3)
    value.train_and_evaluate(config, str(tmp_path))
    records = loop.read_metrics(tmp_path)
    train = [r for r in records if r["split"] == "train"]
    assert len(train) == 2
    assert all(math.isfinite(r["success_ranking"]) and 0 <= r["pair_accuracy"] <= 1
               for r in train)
    # log 2 at init: an untrained model scores both endings alike.
    assert abs(train[0]["success_ranking"] - math.log(2)) < 0.3
    (ev,) = [r for r in records if r["split"] == "eval"]
    assert ev["value_prefers_success_chance"] == 0.5
    for k in ("value_prefers_success", "value_prefers_success_train"):
        assert abs(3 * ev[k] - round(3 * ev[k])) < 1e-6  # a share of 3 problems
    assert math.isfinite(ev["value_success_margin"])


def test_paired_loader_draws_by_step_and_restores_its_position():
    from data_pipelines.toy.endings import EndingPairs

    class Inner:
        def __init__(self):
            self.n = 0

        def __next__(self):
            self.n += 1
            return {"x": np.full(BATCH, self.n)}

        def get_state(self):
            return {"n": self.n}

        def set_state(self, state):
            self.n = state["n"]

    n = 5
    pairs = EndingPairs(np.arange(n, dtype=np.uint8)[:, None, None, None, None] * np.ones(
        (n, 1, 2, 2, 3), np.uint8), np.zeros((n, 1, 2, 2, 3), np.uint8),
        np.zeros((n, 3, 4), np.float32), np.ones((n, 3), bool), ["i"] * n, ["short"] * n,
        np.ones(n, bool))
    config = value_clip.get_config("runlocal")
    config.batch_size = BATCH
    mesh = loop.make_mesh(config)
    a = value.PairedLoader(Inner(), pairs, BATCH, 0, mesh)
    first = [next(a) for _ in range(3)]
    assert [int(b["x"][0]) for b in first] == [1, 2, 3]
    assert first[0]["pair_success"].shape == (BATCH, 1, 2, 2, 3)
    state = a.get_state()
    assert state == {"inner": {"n": 3}, "drawn": 3}
    later = next(a)
    b = value.PairedLoader(Inner(), pairs, BATCH, 0, mesh)
    b.set_state(state)
    again = next(b)
    np.testing.assert_array_equal(later["pair_success"], again["pair_success"])
    assert int(again["x"][0]) == 4
    assert not np.array_equal(first[0]["pair_success"], first[1]["pair_success"])


def test_success_ranking_needs_toy_clips(toy_dirs, tmp_path, monkeypatch):
    config = ranking_config(toy_dirs, 1)
    ds = value.open_episodes(config, toy_dirs[0], "train")
    monkeypatch.setitem(ds.manifest, "schema", {"name": "bridge"})
    with pytest.raises(ValueError, match="schema 'bridge'"):
        value.ranking_pairs(config, ds, tmp_path)
    config.loss.success_ranking = 0.0
    assert value.ranking_pairs(config, ds, tmp_path) is None


def test_ranking_alone_with_text_token_and_shifts_trains_and_caches_its_pairs(toy_dirs,
                                                                              tmp_path):
    config = ranking_config(toy_dirs, 2, eval_preference_problems=2, ranking_shift=2)
    config.unlock()
    config.model.text_conditioning = "token"
    config.loss.vip_image = config.loss.vip_text = config.loss.infonce = 0.0
    config.lock()
    value.train_and_evaluate(config, str(tmp_path))
    records = loop.read_metrics(tmp_path)
    train = [r for r in records if r["split"] == "train"]
    assert len(train) == 2
    # The LIV terms are not computed at all; the ranking loss is the whole loss.
    assert all("vip_image" not in r and "infonce" not in r for r in train)
    assert all(abs(r["loss"] - r["success_ranking"]) < 1e-5 for r in train)
    # log 2 at init: an untrained model scores both endings alike.
    assert abs(train[0]["success_ranking"] - math.log(2)) < 0.3
    assert all(0 <= r["pair_accuracy"] <= 1 for r in train)
    (ev,) = [r for r in records if r["split"] == "eval"]
    assert ev["value_prefers_success"] in (0.0, 0.5, 1.0)
    assert ev["value_prefers_success_chance"] == 0.5
    assert ev["value_prefers_success_train"] in (0.0, 0.5, 1.0)
    assert math.isfinite(ev["value_success_margin"])
    # Training pairs and held-out problems are kept for a rerun; the evaluation's 2 training
    # scenes are the first of the 6 rendered for training, not a third file.
    assert sorted(p.name.split("_")[2:4] for p in (tmp_path / "toy_data").glob("*.npz")) == [
        ["plan", "2"], ["train", "6"]]
    assert "text_token" in load_params(tmp_path)["vision"]
