"""Trainer of the FLIP action module (:class:`flipjax.models.flow_cvae.FlowCVAE`).

Data: ``build_clips`` shards in ``config.data_dir`` (evaluation: ``config.eval_data_dir``,
default the training clips). With ``config.build_toy_data_if_missing`` (on under
``:runlocal``) a small toy world is rendered and turned into clips there when the directory
has none; empty data dirs then mean ``<workdir>/toy_data/{train,val}``.

Batch conversion (inside the jitted step, so the host ships uint8):

* ``history`` uint8[B T H W 3] -> float32 in [-1, 1] (x / 127.5 - 1), channels last as
  FlowCVAE expects. The same array is the image-reconstruction target.
* ``tracks`` float32[B N L 2] pixels of the prepared frame -> the flow, unnormalised: the
  official model works in pixels (its ADE threshold of 1 px and the LTDR deltas of 2/4/8 px
  assume it), so no scaling is applied. The query points are ``tracks[:, :, 0]``.
* ``text_tokens`` / ``text_mask`` pass through; ``visible`` is not used (the official loss
  supervises all points, occluded ones included).

Evaluation: ADE and LTDR of one prior sample per clip (z ~ N(0, I), the planner's setting) and
of the posterior reconstruction (z from the encoder, an upper bound), over
``config.eval_batches`` unshuffled batches; ``*_moving`` variants average only steps whose
ground-truth move exceeds 1 px (the official evaluation mask).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from data_pipelines.loader import ClipDataset
from experiments.training import clips, loop
from flipjax import builders
from flipjax import metrics as flow_metrics
from flipjax.models.cvae_loss import CVAELossConfig, best_of_many_ade, cvae_loss, weighted_ade
from flipjax.models.flow_cvae import FlowCVAE

PyTree = Any


# ------------------------------------------------------------------------------------------
# Model and batches
# ------------------------------------------------------------------------------------------


def convert_batch(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Loader batch -> model inputs (see the module docstring for the conventions).

    Args:
      batch: history uint8[B T H W 3], tracks float32[B N L 2], text_tokens float32[B Lt D],
        text_mask bool[B Lt] (other keys are ignored).

    Returns:
      dict with history float32[B T H W 3] in [-1, 1], flow float32[B N L 2] (pixels),
      text_tokens and text_mask.
    """
    return {
        "history": batch["history"].astype(jnp.float32) / 127.5 - 1.0,
        "flow": batch["tracks"].astype(jnp.float32),
        "text_tokens": batch["text_tokens"].astype(jnp.float32),
        "text_mask": batch["text_mask"].astype(bool),
    }


def loss_config(config: ml_collections.ConfigDict) -> CVAELossConfig:
    """``config.loss`` as a CVAELossConfig (absent fields keep the official values).

    Raises:
      ValueError: naming an unknown field.
    """
    fields = dict(config.get("loss") or {})
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(CVAELossConfig)})
    if unknown:
        raise ValueError(f"config.loss: unknown fields {unknown}; CVAELossConfig has "
                         f"{[f.name for f in dataclasses.fields(CVAELossConfig)]}")
    return CVAELossConfig(**fields)


def make_loss_fn(model: FlowCVAE, objective: CVAELossConfig = CVAELossConfig()) -> Any:
    """``(params, batch, rng) -> (loss, terms)`` with the CVAE objective ``objective``."""
    def loss_fn(params: PyTree, batch: dict[str, jax.Array], rng: jax.Array,
                step: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        x = convert_batch(batch)
        many = int(objective.best_of_many)
        if many > 0:   # (the default path keeps its random stream)
            rng, many_rng = jax.random.split(rng)
        out = model.apply({"params": params}, x["flow"], x["history"], x["text_tokens"],
                          x["text_mask"], rngs={"latent": rng})
        terms = cvae_loss(out, x["flow"], x["history"], model.config.patch, objective, step)
        if many > 0:
            samples = jax.vmap(lambda key: model.apply(
                {"params": params}, x["flow"][:, :, 0], x["history"], x["text_tokens"],
                x["text_mask"], rngs={"latent": key}, method=FlowCVAE.sample)["flow"])(
                jax.random.split(many_rng, many))
            terms["best_of_many"] = best_of_many_ade(samples, x["flow"])
            terms["loss"] = terms["loss"] + objective.best_of_many_weight * terms["best_of_many"]
        if objective.prior_mean_ade > 0:
            if "prior_mu" not in out or "prior_logits" in out:
                raise ValueError("loss.prior_mean_ade needs model.learned_prior=True and one "
                                 "Gaussian (model.latent_codes=0, model.prior_components=0)")
            mean = model.apply({"params": params}, x["flow"][:, :, 0], x["history"],
                               x["text_tokens"], x["text_mask"], out["prior_mu"],
                               method=FlowCVAE.decode)["flow"]
            terms["prior_mean_ade"] = weighted_ade(mean, x["flow"], up_weight=1.0)
            terms["loss"] = terms["loss"] + objective.prior_mean_ade * terms["prior_mean_ade"]
        return terms["loss"], {k: v for k, v in terms.items() if k != "loss"}

    loss_fn.takes_step = True  # for the KL warm-up (make_train_step passes step=)
    return loss_fn


def make_init_fn(model: FlowCVAE, text_tokens: int) -> Any:
    """``rng -> params`` from dummy inputs of the model's shapes."""
    c = model.config

    def init_fn(rng: jax.Array) -> PyTree:
        flow = jnp.zeros((1, 1, c.flow_horizon, 2), jnp.float32)
        history = jnp.zeros((1, c.history, *c.img_size, 3), jnp.float32)
        text = jnp.zeros((1, text_tokens, c.language_dim), jnp.float32)
        mask = jnp.ones((1, text_tokens), bool)
        params_rng, latent_rng = jax.random.split(rng)
        return model.init({"params": params_rng, "latent": latent_rng}, flow, history, text,
                          mask)["params"]

    return init_fn


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------


def clip_spec(config: ml_collections.ConfigDict) -> clips.ClipSpec:
    """The clips FlowCVAE needs: ``history`` frames, no future, ``flow_horizon``-step tracks."""
    c = builders.cvae_config(config)
    return clips.ClipSpec(image_size=tuple(c.img_size), horizon=c.flow_horizon,
                          history=c.history, future=0, text_dim=c.language_dim)


def build_toy_clips(config: ml_collections.ConfigDict, split: str, out: Path) -> None:
    """Renders the toy world's ``split`` and builds clips matching the model into ``out``."""
    clips.build_toy_clips(config, split, out, clip_spec(config))


def _loader(config: ml_collections.ConfigDict, ds: ClipDataset, mesh: Mesh, *,
            shuffle: bool, augment: bool) -> Any:
    return clips.clip_loader(config, ds, mesh, shuffle=shuffle, augment=augment)


# ------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------


def flow_scores(pred: jax.Array, gt: jax.Array, deltas: tuple[float, ...],
                prefix: str) -> dict[str, jax.Array]:
    """ADE / LTDR over all steps and over moving steps, keys prefixed with ``prefix``."""
    moving = flow_metrics.moving_steps(gt)
    return {
        f"{prefix}_ade": flow_metrics.ade(pred, gt),
        f"{prefix}_ltdr": flow_metrics.less_than_delta_ratio(pred, gt, deltas),
        f"{prefix}_ade_moving": flow_metrics.ade(pred, gt, moving),
        f"{prefix}_ltdr_moving": flow_metrics.less_than_delta_ratio(pred, gt, deltas, moving),
    }


def make_eval_step(model: FlowCVAE, deltas: tuple[float, ...],
                   objective: CVAELossConfig = CVAELossConfig(), best_of: int = 8) -> Any:
    """Jitted ``(params, batch, rng) -> (metrics, prior flows float[B N L 2])`` of prior
    samples and posterior reconstructions.

    Two references come with them: ``still_*``, the scores of predicting no motion at all
    (a model that has not learnt where things move scores worse than it), and
    ``prior_spread``, the mean distance in pixels between two prior samples of the same
    clip (0 when the decoder ignores its latent, so its samples cannot offer a planner
    alternatives). ``best_of_{k}_*`` scores, per clip, the best of ``best_of`` prior samples
    on its moving steps: when a scene admits several motions, one sample may rightly pick
    another one, and a planner choosing among samples sees the best.
    """
    loss_fn = make_loss_fn(model, objective)
    if best_of < 2:
        raise ValueError(f"eval_best_of must be >= 2 (the prior and a second draw), got {best_of}")

    @jax.jit
    def eval_step(params: PyTree, batch: dict[str, jax.Array],
                  rng: jax.Array) -> dict[str, jax.Array]:
        x = convert_batch(batch)
        prior_rng, post_rng, other_rng, best_rng = jax.random.split(rng, 4)

        def sample(key: jax.Array) -> dict[str, jax.Array]:
            return model.apply({"params": params}, x["flow"][:, :, 0], x["history"],
                               x["text_tokens"], x["text_mask"], rngs={"latent": key},
                               method=FlowCVAE.sample)

        # The prior and the other draw are the first two of the best-of-k samples: one decode
        # each, and the best of k is never worse than the prior sample it includes.
        keys = jnp.concatenate([jnp.stack([prior_rng, other_rng]),
                                jax.random.split(best_rng, best_of - 2)])
        samples = jax.vmap(lambda k: sample(k)["flow"])(keys)
        prior, other = {"flow": samples[0]}, {"flow": samples[1]}
        gt = x["flow"]
        best = flow_metrics.best_of_k(samples, gt, flow_metrics.moving_steps(gt))
        loss, _ = loss_fn(params, batch, post_rng)
        post = model.apply({"params": params}, x["flow"], x["history"], x["text_tokens"],
                           x["text_mask"], rngs={"latent": post_rng})
        still = jnp.broadcast_to(x["flow"][:, :, :1], x["flow"].shape)
        spread = jnp.linalg.norm(prior["flow"] - other["flow"], axis=-1)[:, :, 1:].mean()
        metrics = {"loss": loss, **flow_scores(prior["flow"], x["flow"], deltas, "prior"),
                   **flow_scores(post["flow"], x["flow"], deltas, "posterior"),
                   **flow_scores(still, x["flow"], deltas, "still"), "prior_spread": spread,
                   **flow_scores(best, gt, deltas, f"best_of_{best_of}")}
        if "z_logits" in post:   # how many codes the batch's posteriors spread over
            used = jnp.mean(jax.nn.softmax(post["z_logits"], axis=-1), axis=0)
            metrics["code_perplexity"] = jnp.exp(-jnp.sum(used * jnp.log(used + 1e-12)))
        return metrics, prior["flow"]

    return eval_step


def flow_sample_image(batch: dict[str, jax.Array], flows: jax.Array) -> Any:
    """Ground-truth and sampled flows of the batch's most moving clip over its current frame.

    Args:
      batch: a loader batch (history uint8[B T H W 3], tracks float32[B N L 2]).
      flows: float[B N L 2] prior samples for the batch.

    Returns:
      uint8[240 480 3] (truth | sample).
    """
    from flipjax import viz

    # Addressable data only: on a multi-host mesh process 0 draws one of its own clips.
    def local(x: jax.Array) -> np.ndarray:
        return np.asarray(x.addressable_shards[0].data)

    tracks = local(batch["tracks"])
    # The clip whose points move most: most clips of a tabletop episode are nearly still.
    i = int(np.argmax(np.abs(tracks[:, :, -1] - tracks[:, :, 0]).sum(axis=(1, 2))))
    return viz.flow_panels_image(local(batch["history"])[i, -1], {
        "ground truth": tracks[i], "prior sample": local(flows)[i]})


def make_eval_factory(config: ml_collections.ConfigDict, model: FlowCVAE,
                      ds: ClipDataset) -> Any:
    """``mesh -> eval_fn(state, step)`` averaging over ``config.eval_batches`` batches, or
    None when ``eval_batches`` is 0 (no evaluation at all)."""
    num_batches = int(config.eval_batches)
    if num_batches < 0:
        raise ValueError(f"eval_batches must be >= 0 (0 disables evaluation), got {num_batches}")
    if num_batches == 0:
        return None
    eval_step = make_eval_step(model, tuple(float(d) for d in config.ltdr_deltas),
                               loss_config(config), int(config.get("eval_best_of", 8)))

    def factory(mesh: Mesh) -> Any:
        def eval_fn(state: Any, step: int) -> dict[str, float]:
            del step  # a fixed key: every evaluation sees the same clips and latents
            loader = _loader(config, ds, mesh, shuffle=False, augment=False)
            key = jax.random.key(int(config.seed) + 1)
            sums: dict[str, float] = {}
            for i in range(num_batches):
                batch = next(loader)
                m, flows = eval_step(state.params, batch, jax.random.fold_in(key, i))
                for k, v in jax.device_get(m).items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                if i == 0:
                    sample = flow_sample_image(batch, flows)
            return {**{k: v / num_batches for k, v in sums.items()}, "flows": sample}

        return eval_fn

    return factory


# ------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Any:
    """Trains FlowCVAE as configured (resuming ``workdir`` if it has checkpoints).

    Args:
      config: an ``experiments/configs/cvae.py`` config.
      workdir: run directory.

    Returns:
      The final TrainState.
    """
    model = builders.build_cvae(config)
    train_dir, eval_dir = clips.data_dirs(config, workdir)
    spec = clip_spec(config)
    train_ds = clips.open_clips(config, train_dir, "train", spec)
    eval_ds = (train_ds if eval_dir == train_dir
               else clips.open_clips(config, eval_dir, "val", spec))
    logging.info("FlowCVAE %s: %d training clips in %s, %d eval clips in %s",
                 config.model.size, len(train_ds), train_dir, len(eval_ds), eval_dir)
    return loop.train(
        config, workdir,
        init_fn=make_init_fn(model, train_ds.text_tokens),
        loss_fn=make_loss_fn(model, loss_config(config)),
        make_loader=lambda mesh: _loader(config, train_ds, mesh, shuffle=True, augment=True),
        make_eval=make_eval_factory(config, model, eval_ds))
