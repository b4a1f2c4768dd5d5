"""The dynamics module's learnability ladder: train the video DiT on the ladder's scenes
(:mod:`data_pipelines.toy.ladder`) and score its DDIM samples beside copying the current frame.

  python -m benchmarks.dit_ladder --out dit_ladder.json [--quick] [--rungs free_direction]
      [--steps 1500] [--model official|flipjax] [--set flow_gate=true --set residual=true]

Frames are 32x32, encoded by the space-to-depth pixel codec (8x8x48 latents); the DiT is the
``tiny`` variant with 2 clean history frames and 3 future frames. Figures per rung and split
(PSNR in dB over the future frames): ``psnr`` (samples with the true flow), ``copy`` (the
current frame repeated, the baseline to beat), ``moving_true`` / ``moving_still`` (PSNR over
the pixels that change, with the true flow and with every track held still: a model that
follows its flow scores higher with the true one).

Options besides the VideoDiT fields: ``latent_scale`` ("none": pixels in [-1, 1] as the
official smoke codec; "unit": scaled to unit variance over the training clips, as the SD-VAE
scale factor does for its latents), ``residual`` (diffuse the change from the current
frame instead of the future frames themselves, so a model that has learnt nothing copies) and
``prediction`` (what the DiT's output predicts: "eps", official, "x0" or "v") and
``flow_normalization`` (the DiT's flow units, "pixels" or "unit"; ``flow_embedding=
positional`` needs "unit") and ``codec_factor`` (the pixel codec's space-to-depth factor: 4,
the runlocal configs', gives 8x8x48 latents and 2x2 patches of 192 values for the tiny DiT's
64-wide tokens; 2 gives 16x16x12 latents, 48 values per token).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import ladder_common as common
from data_pipelines.toy import ladder
from flipjax import codec as codec_lib
from flipjax.flow_conditioning import flow_to_model
from flipjax.models import diffusion, sampling
from flipjax.models.video_dit import VideoDiT

PRESETS = {
    "official": {},
    "flipjax": dict(latent_scale="unit", residual=True, flow_attention="cross",
                    flow_gate=True),
}
OPTIONS = {"latent_scale": "none", "residual": False, "sample_steps": 50, "codec_factor": 4,
           "flow_normalization": "pixels", "prediction": "eps"}
MODEL_FIELDS = {f.name for f in dataclasses.fields(VideoDiT)} - {"parent", "name"}
HISTORY, HORIZON, SIZE = 2, 4, 32


def _psnr(mse: jax.Array) -> jax.Array:
    # Frames in [-1, 1]: the peak-to-peak range is 2.
    return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10))


def make_programs(model: VideoDiT, codec: codec_lib.LatentCodec, tx: Any, residual: bool,
                  sample_steps: int, units: str = "pixels", prediction: str = "eps"
                  ) -> tuple[Any, Any]:
    """Jitted ``step(params, opt, batch, rng)`` and ``score(params, batch, rng)``."""
    schedule = diffusion.linear_schedule(1000)
    sample_schedule = diffusion.respace(schedule, sample_steps)

    def latents(x: dict[str, jax.Array]) -> jax.Array:
        video = jnp.concatenate([x["history"], x["future"]], axis=1)
        lat = codec.encode_video(video)
        if residual:
            current = lat[:, HISTORY - 1:HISTORY]
            lat = jnp.concatenate([lat[:, :HISTORY], lat[:, HISTORY:] - current], axis=1)
        return lat

    def to_frames(x: dict[str, jax.Array], future_latents: jax.Array) -> jax.Array:
        if residual:
            future_latents = future_latents + codec.encode_video(x["history"][:, -1:])
        return jnp.clip(codec.decode_video(future_latents), -1.0, 1.0)

    def cond(params, x, flow):
        return model.apply({"params": params}, flow, x["text"], x["text_mask"],
                           method=VideoDiT.encode_conditions)

    @jax.jit
    def step(params, opt, x, rng):
        x0 = latents(x)
        flow = flow_to_model(x["flow"], (SIZE, SIZE), units)
        t_rng, n_rng = jax.random.split(rng)
        t = jax.random.randint(t_rng, x0.shape[:1], 0, schedule.num_steps)
        noise = jax.random.normal(n_rng, x0.shape)

        def loss_fn(p):
            def model_fn(xt, ts):
                return model.apply({"params": p}, xt, ts, flow, x["text"], x["text_mask"])
            terms = diffusion.model_losses(model_fn, schedule, x0, t, noise, history=HISTORY,
                                           learned_range=model.learn_sigma,
                                           prediction=prediction)
            return jnp.mean(terms["loss"])
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    @jax.jit
    def score(params, x, rng):
        x0 = latents(x)
        hist, fut = x0[:, :HISTORY], x0[:, HISTORY:]
        flow = flow_to_model(x["flow"], (SIZE, SIZE), units)

        def sample(c):
            def model_fn(xt, ts):
                return model.apply({"params": params}, xt, ts, c, hist,
                                   method=VideoDiT.denoise)
            out = sampling.ddim_sample(model_fn, sample_schedule, rng, fut.shape,
                                       learned_range=model.learn_sigma, prediction=prediction)
            return to_frames(x, out)

        truth = x["future"]
        pred = sample(cond(params, x, flow))
        still = sample(cond(params, x, jnp.broadcast_to(flow[:, :, :1], flow.shape)))
        copy = jnp.broadcast_to(x["history"][:, -1:], truth.shape)
        changed = jnp.any(truth != copy, axis=-1, keepdims=True)
        n = jnp.maximum(jnp.sum(changed) * 3, 1)

        def moving(p):
            return _psnr(jnp.sum(jnp.where(changed, (p - truth) ** 2, 0.0)) / n)

        def frames(p):
            return jnp.mean(_psnr(jnp.mean((p - truth) ** 2, axis=(2, 3, 4))))
        return {"psnr": frames(pred), "copy": frames(copy), "still_flow": frames(still),
                "moving_true": moving(pred), "moving_still": moving(still),
                "moving_copy": moving(copy)}

    return step, score


def build(overrides: dict[str, Any], train: dict[str, np.ndarray]
          ) -> tuple[VideoDiT, codec_lib.LatentCodec, dict[str, Any]]:
    """The tiny ladder DiT, its pixel codec and the options, from ``overrides``."""
    unknown = set(overrides) - MODEL_FIELDS - set(OPTIONS)
    if unknown:
        raise ValueError(f"--set: unknown fields {sorted(unknown)}; VideoDiT fields "
                         f"{sorted(MODEL_FIELDS)}, options {sorted(OPTIONS)}")
    opts = {**OPTIONS, **{k: v for k, v in overrides.items() if k in OPTIONS}}
    if opts["latent_scale"] not in ("none", "unit"):
        raise ValueError(f"latent_scale must be 'none' or 'unit', got {opts['latent_scale']!r}")
    scale = 1.0
    if opts["latent_scale"] == "unit":
        video = np.concatenate([train["history"], train["future"]], axis=1)
        if opts["residual"]:
            video = np.concatenate([train["history"], train["future"]
                                    - train["history"][:, -1:]], axis=1)
        scale = float(1.0 / max(video.std(), 1e-6))
    factor = int(opts["codec_factor"])
    if SIZE % factor:
        raise ValueError(f"codec_factor must divide {SIZE}, got {factor}")
    codec = codec_lib.pixel_codec(factor, scale=scale)
    model_kw = {k: v for k, v in overrides.items() if k in MODEL_FIELDS}
    model = VideoDiT.variant("tiny", latent_size=(SIZE // factor, SIZE // factor),
                             in_channels=codec.channels,
                             flow_horizon=HORIZON, history=HISTORY, text_dim=ladder.TEXT_DIM,
                             text_layers=1, text_heads=2, **model_kw)
    return model, codec, {**opts, "scale": scale}


def train_and_score(rung: str, overrides: dict[str, Any], *, steps: int, batch: int,
                    lr: float, n_train: int, n_eval: int, seed: int,
                    scene: dict[str, Any] | None = None) -> dict[str, float]:
    """Trains on ``n_train`` fixed scenes of ``rung``; figures on them and on held-out ones."""
    train, held = common.scenes(rung, seed, n_train, n_eval, image_size=SIZE, history=HISTORY,
                                flow_horizon=HORIZON, **(scene or {}))
    model, codec, opts = build(overrides, train)
    tx = common.optimizer(lr, steps)
    units = str(opts["flow_normalization"])
    step, score = make_programs(model, codec, tx, bool(opts["residual"]),
                                int(opts["sample_steps"]), units, str(opts["prediction"]))
    x = {k: jnp.asarray(v[:2]) for k, v in train.items()}
    video = codec.encode_video(jnp.concatenate([x["history"], x["future"]], axis=1))
    params = model.init(jax.random.key(seed), video, jnp.zeros((2,), jnp.int32),
                        flow_to_model(x["flow"], (SIZE, SIZE), units), x["text"],
                        x["text_mask"])["params"]
    out = common.fit_and_score(step, score, params, tx.init(params), train, held, steps=steps,
                               batch=batch, n_eval=n_eval, seed=seed)
    return {"latent_scale": opts["scale"], **out}


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__, PRESETS, rungs="free_direction,two_objects", batch=16,
                      eval_scenes=64, set_help="a VideoDiT field or an option of the module "
                      "docstring (repeatable)")

    def check(overrides: dict[str, Any], rungs: list[str]) -> None:
        build(overrides, ladder.make_batch(rungs[0], np.random.default_rng(0), 2,
                                           image_size=SIZE, history=HISTORY,
                                           flow_horizon=HORIZON))

    a, rungs, overrides = common.parse(p, argv, PRESETS, 1, check)
    common.run_rungs(a, overrides, rungs, lambda rung: train_and_score(
        rung, overrides, steps=a.steps, batch=a.batch, lr=a.lr, n_train=a.train_scenes,
        n_eval=a.eval_scenes, seed=a.seed, scene=common.scene_options(a)))


if __name__ == "__main__":
    main()
