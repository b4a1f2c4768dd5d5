"""The official-structure planner (benchmarks/planning_official.py) and the planning benchmark.

Fast tests run on a small analytic world model (no networks: a pixel codec and closed-form
functions), so eager op-by-op dispatch and every compile take seconds; the benchmark's real
``--quick`` run on the tiny trained-architecture models is marked slow.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import planning as bench
from benchmarks.planning_official import batch_minmax, plan_official, sample_loop
from flipjax.codec import pixel_codec
from flipjax.models import diffusion
from flipjax.models.sampling import ddim_sample, ddpm_sample
from flipjax.planning import PlanConfig, WorldModel

SIZE, L, TH = 8, 3, 3  # frame side, flow steps (2 generated frames per step), history frames
N_ENC = 2  # history frames re-encoded at every step (the DiT's history)
CODEC = pixel_codec(4)  # 8x8x3 frames <-> 2x2x48 latents
TRAIN = diffusion.linear_schedule(1000)


def _propose(p, frames, queries, text, mask, key):
    drift = jax.random.normal(key, (frames.shape[0], 1, 1, 2)) + frames[:, -1].mean()
    return queries[:, :, None, :] + jnp.arange(L, dtype=jnp.float32)[:, None] * drift


def _conditions(p, flows, text, mask):
    return {"d": (flows[:, 0, -1] - flows[:, 0, 0]) * p["scale"]}


def _denoise(p, x, t, cond, history):
    # The exact eps of a bounded clip that depends on the history, flow and x, so the sampler
    # lands on a finite result that every input moves.
    x0 = jnp.tanh(0.5 * history[:, -1:] + cond["d"][:, :1, None, None, None] + p["w"] * x)
    ab = p["alphas_cumprod"][t][:, None, None, None, None]
    return (x - jnp.sqrt(ab) * x0) / jnp.sqrt(1.0 - ab)


def _value(p, frames, text, mask):
    return frames[:, -1].mean(axis=(1, 2, 3)) - 0.3 * frames[:, 0].std(axis=(1, 2, 3))


WORLD = WorldModel(
    propose=_propose, encode_conditions=_conditions, denoise=_denoise,
    encode=lambda p, x: CODEC.encode(x), decode=lambda p, z: jnp.clip(CODEC.decode(z), -1, 1),
    value=_value, action_params={},
    dynamics_params={"w": jnp.float32(0.3), "scale": jnp.float32(0.2),
                     "alphas_cumprod": jnp.asarray(TRAIN.alphas_cumprod, jnp.float32)},
    learned_range=False, value_frames=2, history_frames=TH)


def _problems(p, seed=0):
    rng = np.random.default_rng(seed)
    history = jnp.asarray(rng.uniform(-1, 1, (p, TH, SIZE, SIZE, 3)), jnp.float32)
    return history, jnp.ones((p, 2, 4), jnp.float32), jnp.ones((p, 2), bool)


def _config(**kw):
    # The benchmark's --quick settings, so that every test shares the eager per-op caches.
    q = bench.SETTINGS["quick"]["tiny"]
    base = dict(beams=q.beams, candidates=q.candidates, horizon=3, replace_every=2,
                sampler="ddpm", sample_steps=q.sample_steps, query_grid=q.query_grid,
                schedule=TRAIN)
    return PlanConfig(**{**base, **kw})


def _plan(history, text, mask, key, config, **kw):
    return plan_official(WORLD, history, text, mask, jax.random.key(key), config,
                         encode_frames=N_ENC, **kw)


# ------------------------------------------------------------------------------------------
# The per-step sampler loop equals the lax.scan samplers
# ------------------------------------------------------------------------------------------


def _model(x, t):
    # learned-range output: eps guess and variance values in [-1, 1], both depending on t
    tt = t.astype(jnp.float32).reshape(-1, *(1,) * (x.ndim - 1)) / 1000.0
    return jnp.concatenate([0.5 * jnp.sin(x + tt), jnp.tanh(x * tt)], axis=-1)


@pytest.mark.parametrize("sampler,eta,jit_step", [("ddim", 0.0, False), ("ddim", 0.7, True),
                                                  ("ddpm", 0.0, False), ("ddpm", 0.0, True)])
def test_sample_loop_equals_scan_samplers(sampler, eta, jit_step):
    schedule = diffusion.respace(TRAIN, 6)
    k_init, k = jax.random.split(jax.random.key(3))
    x_init = jax.random.normal(k_init, (3, 2, 4, 4, 2))
    got = sample_loop(_model, schedule, x_init, k, sampler=sampler, eta=eta, jit_step=jit_step,
                      clip_x0=3.0)
    if sampler == "ddim":
        want = ddim_sample(_model, schedule, k, x_init, eta=eta, clip_x0=3.0)
    else:
        want = ddpm_sample(_model, schedule, k, x_init, clip_x0=3.0)
    assert isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-4)
    # the update does something: the sample moved away from the initial noise
    assert np.abs(got - np.asarray(x_init)).max() > 0.1


# ------------------------------------------------------------------------------------------
# The official-structure planner
# ------------------------------------------------------------------------------------------


def test_official_plan_shapes_and_call_counts():
    config = _config()
    p, b, a, hz, k = 2, config.beams, config.candidates, config.horizon, config.sample_steps
    history, text, mask = _problems(p)
    plan, counts = _plan(history, text, mask, 0, config)
    f, n = L - 1, config.query_grid ** 2
    assert plan.flows.shape == (p, b, hz, L, n, 2)
    assert plan.latents.shape == (p, b, hz, f, 2, 2, 48)
    assert plan.videos.shape == (p, b, hz, f, SIZE, SIZE, 3)
    assert plan.values.shape == (p, b, hz) and plan.returns.shape == (p, b)
    assert np.isfinite(plan.latents).all() and np.abs(plan.latents).max() <= 1.0 + 1e-5
    np.testing.assert_allclose(plan.returns, plan.values.sum(axis=2), rtol=1e-6)  # undiscounted
    np.testing.assert_array_equal(plan.best, np.argmax(plan.returns, axis=1))
    videos = CODEC.decode_video(jnp.asarray(plan.latents.reshape(p * b, hz * f, 2, 2, 48)))
    np.testing.assert_allclose(plan.videos, np.asarray(videos).reshape(plan.videos.shape),
                               atol=1e-6)
    rows = b * a
    assert counts == {
        "propose": p * hz, "encode": p * hz, "encode_frames": p * hz * rows * N_ENC,
        "encode_conditions": p * hz * k, "denoise": p * hz * k, "denoise_rows": p * hz * k * rows,
        "decode": p * hz, "decode_frames": p * hz * rows * (N_ENC + f), "value": p * hz,
        "host_copies": p * hz * k}


def test_beam_loop_calls_per_beam_and_plans_alike():
    history, text, mask = _problems(1, seed=4)
    config = _config(horizon=2)
    batched, counts = _plan(history, text, mask, 1, config, mode="per_call_jit")
    looped, loop_counts = _plan(history, text, mask, 1, config, mode="per_call_jit",
                                beam_loop=True)
    assert loop_counts["denoise"] == config.beams * counts["denoise"]
    assert loop_counts["denoise_rows"] == counts["denoise_rows"]
    assert looped.flows.shape == batched.flows.shape
    assert np.isfinite(looped.values).all()


def test_eager_and_per_call_jit_plan_alike():
    history, text, mask = _problems(2, seed=1)
    eager, _ = _plan(history, text, mask, 4, _config())
    jitted, _ = _plan(history, text, mask, 4, _config(), mode="per_call_jit")
    for name, x, y in zip(eager._fields, eager, jitted, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5, err_msg=name)


def test_replacement_copies_the_record_but_not_the_state():
    """The official defect: the worst beam's recorded plan becomes the best's at step 1, but it
    goes on planning from its own history, so its step 2 is its own continuation."""
    history, text, mask = _problems(1, seed=2)
    free, _ = _plan(history, text, mask, 5, _config(replace_every=0))
    swap, _ = _plan(history, text, mask, 5, _config(replace_every=2))
    totals = free.values[0, :, :2].sum(axis=1)
    worst, best = int(np.argmin(totals)), int(np.argmax(totals))
    assert worst != best
    for name in ("flows", "latents", "videos", "values"):
        x, y = getattr(swap, name)[0], getattr(free, name)[0]
        np.testing.assert_array_equal(x[worst, :2], y[best, :2], err_msg=name)
        np.testing.assert_array_equal(x[worst, 2], y[worst, 2], err_msg=name)
        np.testing.assert_array_equal(x[best], y[best], err_msg=name)
    # the spliced plan: step 2 does not continue from the recorded step 1
    assert not np.allclose(swap.videos[0, worst, 2], free.videos[0, best, 2])


def test_batch_minmax_couples_the_candidates():
    x = jnp.asarray(np.random.default_rng(0).uniform(-0.5, 0.5, (2, 2, SIZE, SIZE, 3)))
    y = batch_minmax(x)
    assert float(y.min()) == pytest.approx(-1) and float(y.max()) == pytest.approx(1)
    # candidate 0's rescaled frames change when only candidate 1 changes
    z = batch_minmax(x.at[1].multiply(1.5))
    assert not np.allclose(y[0], z[0])


def test_official_value_scores_the_rescaled_last_frames():
    # Candidates made identical (flows ignore the key, the clip ignores the noise), so the
    # batch min-max equals each candidate's own and the value can be recomputed from the plan.
    def same_flows(p, frames, queries, text, mask, key):
        return _propose(p, frames[:1], queries[:1], text, mask, jax.random.key(0)
                        ) + 0 * queries[:, :, None, :]

    world = dataclasses.replace(WORLD, propose=same_flows, dynamics_params={
        **WORLD.dynamics_params, "w": jnp.float32(0.0)})
    history, text, mask = _problems(1, seed=3)
    plan, _ = plan_official(world, history, text, mask, jax.random.key(6), _config(horizon=1),
                            encode_frames=N_ENC)
    last = jnp.asarray(plan.videos[0, :, 0, -world.value_frames:])  # [B Tv H W 3]
    want = _value(None, batch_minmax(last), text, mask)
    np.testing.assert_allclose(plan.values[0, :, 0], np.asarray(want), rtol=1e-4, atol=1e-5)
    assert not np.allclose(plan.values[0, :, 0], np.asarray(_value(None, last, text, mask)))


@pytest.mark.parametrize("bad,match", [
    (dict(history=jnp.zeros((1, TH, SIZE, SIZE))), "history"),
    (dict(history=jnp.zeros((1, 1, SIZE, SIZE, 3))), "history frames"),
    (dict(encode_frames=TH + 1), "encode_frames"),
    (dict(mode="graph"), "mode"),
    (dict(config=_config(use_value=False)), "use_value"),
])
def test_official_rejects_bad_input(bad, match):
    history, text, mask = _problems(1)
    kw = dict(history=history, config=_config())
    kw.update(bad)
    h, config = kw.pop("history"), kw.pop("config")
    with pytest.raises(ValueError, match=match):
        plan_official(WORLD, h, text, mask, jax.random.key(0), config, **kw)


# ------------------------------------------------------------------------------------------
# The benchmark's JSON
# ------------------------------------------------------------------------------------------


def _analytic_world(size, seed=0):
    info = {"image_size": (SIZE, SIZE), "text_tokens": 2, "text_dim": 4, "history_frames": TH,
            "dit_history": 2, "value_frames": 2, "latent_shape": (2, 2, 48),
            "future_frames": L - 1, "params": {}, "codec": "pixels"}
    return WORLD, TRAIN, info


def test_benchmark_json_on_an_analytic_world(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "build_world", _analytic_world)
    out = tmp_path / "planning.json"
    bench.main(["--quick", "--out", str(out)])
    res = json.loads(out.read_text())
    s = bench.SETTINGS["quick"]["tiny"]
    assert res["quick"] and "S" not in res and res["S_speedup_vs_eager"] is None
    assert res["machine"]["device"] and res["targets_met"]
    tiny = res["tiny"]
    assert res["speedup_vs_eager"] == tiny["speedup_vs_eager"] > 1
    assert res["speedup_vs_per_call_jit"] == tiny["speedup_vs_per_call_jit"] > 0
    assert tiny["speedup_vs_eager"] == pytest.approx(
        tiny["official_eager"]["seconds_per_plan"] / tiny["hill_climb"]["seconds_per_plan"])
    k = s.sample_steps
    rows = s.candidates * k * s.horizon * s.beams
    assert tiny["dit_row_forwards_per_plan"] == rows
    hc, off = tiny["hill_climb"]["calls_per_plan"], tiny["official_eager"]["calls_per_plan"]
    assert hc["denoise_rows"] == off["denoise_rows"] == rows
    assert hc["denoise"] == s.horizon * k / s.problems  # one batched call per sampler step
    assert off["denoise"] == s.horizon * k  # one per sampler step of every problem
    assert off["encode"] == s.horizon and hc["encode"] == 1 / s.problems
    for name in ("hill_climb", "official_per_call_jit", "official_eager"):
        rec = tiny[name]
        assert len(rec["repeat_s"]) == s.repeats
        assert rec["plans_per_s"] == pytest.approx(1 / rec["seconds_per_plan"])
    gain = res["ddim_fewer_steps_gain"]
    assert (gain["ddpm_steps"], gain["ddim_steps"]) == (k, k // 5)
    assert gain["ratio"] == pytest.approx(gain["ddpm_seconds_per_plan"]
                                          / gain["ddim_seconds_per_plan"])


def test_benchmark_rejects_unknown_size(tmp_path):
    with pytest.raises(ValueError, match="S"):
        bench.main(["--quick", "--sizes", "S", "--out", str(tmp_path / "x.json")])


@pytest.mark.slow  # the tiny flax models: four compiles and eager runs, ~3 minutes on 2 cores
def test_benchmark_quick_on_tiny_models(tmp_path):
    out = tmp_path / "planning.json"
    res = bench.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text())["speedup_vs_eager"] == res["speedup_vs_eager"] > 1
    assert res["tiny"]["models"]["params"]["dit"] > 0
