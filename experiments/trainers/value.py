"""Trainer of the FLIP value module (:class:`flipjax.models.value.ValueModel`) with LIV's objective.

Data: ``build_clips`` shards in ``config.data_dir`` (evaluation: ``config.eval_data_dir``,
default the training clips), read episode by episode (:mod:`data_pipelines.episodes`). Each
sample is one episode: its first state, a uniformly drawn consecutive pair (s_t, s_{t+1}) and
its goal, the last state; a state is the clip of ``model.clip_len`` frames ending at a frame
(the first frame repeated before the episode starts). The instruction is the clip's text tokens.
Clip shards carry no success flag, so every episode is assumed to reach its goal (true of
demonstrations and of the toy world's default builds); filter failures out before building.
With ``config.build_toy_data_if_missing`` (on under ``:runlocal``) toy clips are rendered into
empty data dirs (``<workdir>/toy_data/{train,val}``), ``toy_image_size`` pixels square.

Objective (:func:`flipjax.models.value_loss.liv_loss`): VIP with the goal clip as goal, VIP with
the instruction as goal and the goal-clip/instruction InfoNCE, weighted by ``config.loss``;
clips sharing an instruction are InfoNCE positives of each other (``text_id``).

Batch conversion (inside the jitted step, so the host ships uint8): ``states`` uint8[B 4 Tc h w
3] -> float32 in [-1, 1], centre-cropped to a square when h != w and resized (bilinear,
antialiased) to the model's ``image_size`` when the clips' frames have another size (e.g. 128
px clips -> 224 px CLIP input). ``:runlocal`` runs the tiny model at 32 px with 8 px patches,
the clips' own size, so nothing is resized there.

Evaluation (EMA parameters when the state has them) on the first ``config.eval_episodes``
episodes of the evaluation clips: the value curve V(clip_t; instruction) over every
``eval_stride``-th state of each episode, scored by
:func:`flipjax.metrics.value_curve_monotonicity` (``monotonicity``: fraction of steps that do
not decrease; ``spearman``: rank correlation of value with time), the mean value of the first
and last states (``value_first``, ``value_last``), the same scores for the image-goal curve
V(clip_t; last clip) (``image_*``), and a plot of the language curves (``value_curves``,
written to ``workdir/samples``).

Pretrained weights: flipjax has no OpenAI CLIP / LIV converter yet, so every value config
trains from random initialisation; FLIP starts from LIV's CLIP weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding

from data_pipelines.episodes import VipSampler, make_episode_loader
from data_pipelines.loader import ClipDataset
from experiments.training import clips, loop
from flipjax import builders, viz
from flipjax import metrics as value_metrics
from flipjax.models.value import ValueModel, fit_frames
from flipjax.models.value_loss import LivLossWeights, liv_loss, value_from_embeddings
from flipjax.sharding import batch_sharding, replicated

PyTree = Any


# ------------------------------------------------------------------------------------------
# Model and batches
# ------------------------------------------------------------------------------------------


def loss_weights(config: ml_collections.ConfigDict) -> LivLossWeights:
    """``config.loss`` as LivLossWeights, with the model's gamma."""
    lw = config.loss
    return LivLossWeights(vip_image=float(lw.vip_image), vip_text=float(lw.vip_text),
                          infonce=float(lw.infonce), gamma=float(config.model.gamma),
                          temperature=float(lw.temperature),
                          num_negatives=int(lw.num_negatives))


def prepare_frames(frames: jax.Array, image_size: int) -> jax.Array:
    """uint8 frames -> the model's float input.

    Args:
      frames: uint8[... h w 3].
      image_size: the model's square side S.

    Returns:
      float32[... S S 3] in [-1, 1]: centre-cropped to a square, then resized (bilinear with
      antialiasing) when the size differs.
    """
    if frames.ndim < 3 or frames.shape[-1] != 3:
        raise ValueError(f"frames: expected [... h w 3], got shape {list(frames.shape)}")
    return fit_frames(frames.astype(jnp.float32) / 127.5 - 1.0, image_size)


def embed_states(model: ValueModel, params: PyTree, states: jax.Array) -> jax.Array:
    """states uint8[B K Tc h w 3] -> clip embeddings float[B K E] (one tower pass for all)."""
    b, k = states.shape[:2]
    x = prepare_frames(states, model.config.image_size)
    e = model.apply({"params": params}, x.reshape(b * k, *x.shape[2:]),
                    method=ValueModel.embed_clip)
    return e.reshape(b, k, -1)


def make_loss_fn(model: ValueModel, weights: LivLossWeights) -> Any:
    """``(params, batch, rng) -> (loss, terms)`` with the LIV objective.

    ``batch``: states uint8[B 4 Tc h w 3] (init, s_t, s_{t+1}, goal), text_tokens float[B Lt
    D], text_mask bool[B Lt], text_id int[B]. Besides the unweighted loss terms, the metrics
    hold the mean language-goal values of the initial and goal states and the mean one-step
    change V(s_{t+1}) - V(s_t), which training should make positive.
    """
    def loss_fn(params: PyTree, batch: dict[str, jax.Array],
                rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        emb = embed_states(model, params, batch["states"])
        text = model.apply({"params": params}, batch["text_tokens"].astype(jnp.float32),
                           batch["text_mask"].astype(bool), method=ValueModel.embed_text)
        total, terms = liv_loss(emb[:, 0], emb[:, 1], emb[:, 2], emb[:, 3], text, weights,
                                text_ids=batch["text_id"], key=rng)
        v = value_from_embeddings(emb, text[:, None], weights.gamma)  # [B 4]
        metrics = {k: t for k, t in terms.items() if k != "total"}
        metrics.update(value_init=jnp.mean(v[:, 0]), value_goal=jnp.mean(v[:, 3]),
                       value_step=jnp.mean(v[:, 2] - v[:, 1]))
        return total, metrics

    return loss_fn


def make_init_fn(model: ValueModel, text_tokens: int, text_dim: int) -> Any:
    """``rng -> params`` from dummy inputs of the model's shapes."""
    c = model.config

    def init_fn(rng: jax.Array) -> PyTree:
        frames = jnp.zeros((1, c.clip_len, c.image_size, c.image_size, 3), jnp.float32)
        tokens = jnp.zeros((1, text_tokens, text_dim), jnp.float32)
        return model.init(rng, frames, tokens, jnp.ones((1, text_tokens), bool))["params"]

    return init_fn


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------


def open_episodes(config: ml_collections.ConfigDict, directory: str | Path,
                  split: str) -> ClipDataset:
    """Opens clips for the value model: ``history = clip_len``, no future, checked text.

    Toy clips are built first (``toy_image_size`` px, ``toy_horizon``-step tracks) when allowed
    and missing. Frames of any size are accepted (they are resized in the step); the token width
    must equal ``model.language_dim`` and the token count fit ``max_text_len``.

    Raises:
      ValueError: missing data or clips that do not fit the model (named).
    """
    directory = Path(directory)
    cfg = builders.value_config(config)
    text_dim = int(config.model.language_dim)
    toy = int(config.toy_image_size)
    if not (directory / "manifest.json").exists() and config.build_toy_data_if_missing:
        clips.build_toy_clips(config, split, directory, clips.ClipSpec(
            image_size=(toy, toy), horizon=int(config.toy_horizon), history=cfg.clip_len,
            future=0, text_dim=text_dim))
    size = (toy, toy)
    if (directory / "manifest.json").exists():
        lay = ClipDataset(directory).layout
        size = (lay.height, lay.width)
    spec = clips.ClipSpec(image_size=size, horizon=None, history=cfg.clip_len, future=0,
                          text_dim=text_dim)
    ds = clips.open_clips(config, directory, split, spec)
    if ds.text_tokens > cfg.max_text_len:
        raise ValueError(f"clips in {directory} have {ds.text_tokens} text tokens, more than the "
                         f"value model's max_text_len={cfg.max_text_len}")
    return ds


def _loader(config: ml_collections.ConfigDict, ds: ClipDataset, mesh: Mesh) -> Any:
    return make_episode_loader(
        ds, int(config.batch_size), mesh=mesh, seed=int(config.seed), shuffle=True,
        min_length=int(config.min_episode_length), worker_count=int(config.data_workers),
        num_threads=int(config.data_threads))


# ------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------


def _global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    # Every process holds the whole array (all read the same episodes), so each device
    # takes its slice directly; also right on multi-host meshes.
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def make_eval_factory(config: ml_collections.ConfigDict, model: ValueModel,
                      ds: ClipDataset) -> Any:
    """``mesh -> eval_fn(state, step)`` over ``config.eval_episodes`` held-out episodes (module
    docstring), or None when ``eval_episodes`` is 0."""
    num = int(config.eval_episodes)
    stride = int(config.eval_stride)
    if num < 0:
        raise ValueError(f"eval_episodes must be >= 0 (0 disables evaluation), got {num}")
    if stride < 1:
        raise ValueError(f"eval_stride must be >= 1, got {stride}")
    if num == 0:
        return None
    sampler = VipSampler(ds, int(config.min_episode_length))
    episodes = list(range(min(num, len(sampler))))
    gamma = float(config.model.gamma)
    # Four clips per training sample: the same activation memory as a training forward pass.
    chunk = 4 * int(config.batch_size)

    def factory(mesh: Mesh) -> Any:
        rep, rows = replicated(mesh), batch_sharding(mesh)

        @jax.jit
        def embed(params: PyTree, states: jax.Array, tokens: jax.Array,
                  mask: jax.Array) -> tuple[jax.Array, jax.Array]:
            clip = embed_states(model, params, states[:, None])[:, 0]
            text = model.apply({"params": params}, tokens, mask, method=ValueModel.embed_text)
            return (jax.lax.with_sharding_constraint(clip, rep),
                    jax.lax.with_sharding_constraint(text, rep))

        def eval_fn(state: Any, step: int) -> dict[str, Any]:
            params = state.ema if state.ema is not None else state.params
            scores: dict[str, list[float]] = {}
            lang_curves, ends_all = [], []
            for e in episodes:
                length = int(sampler.episodes[e, 1])
                states, ends = sampler.states(e, min(stride, length - 1))
                item = ds[int(sampler.episodes[e, 0])]
                tokens = _global(item["text_tokens"][None], rep)
                mask = _global(item["text_mask"][None], rep)
                n = len(states)
                pad = (-n) % chunk
                padded = np.concatenate([states, np.repeat(states[-1:], pad, axis=0)])
                embs = []
                for i in range(0, len(padded), chunk):
                    clip, text = embed(params, _global(padded[i:i + chunk], rows), tokens, mask)
                    embs.append(np.asarray(jax.device_get(clip)))
                clip_emb = np.concatenate(embs)[:n]
                text_emb = np.asarray(jax.device_get(text))
                lang = np.asarray(value_from_embeddings(clip_emb, text_emb, gamma))
                image = np.asarray(value_from_embeddings(clip_emb, clip_emb[-1:], gamma))
                for prefix, curve in (("", lang), ("image_", image)):
                    frac, rho = value_metrics.value_curve_monotonicity(curve[None])
                    scores.setdefault(f"{prefix}monotonicity", []).append(float(frac[0]))
                    scores.setdefault(f"{prefix}spearman", []).append(float(rho[0]))
                scores.setdefault("value_first", []).append(float(lang[0]))
                scores.setdefault("value_last", []).append(float(lang[-1]))
                lang_curves.append(lang)
                ends_all.append(ends)
            results: dict[str, Any] = {k: float(np.mean(v)) for k, v in scores.items()}
            results["value_curves"] = viz.value_curve_image(
                lang_curves, ends_all, f"value curves, step {step} "
                f"(spearman {results['spearman']:.2f})")
            return results

        return eval_fn

    return factory


# ------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Any:
    """Trains the value model as configured (resuming ``workdir`` if it has checkpoints).

    Args:
      config: an ``experiments/configs/value.py`` config.
      workdir: run directory.

    Returns:
      The final TrainState.
    """
    if float(config.get("toy_failure_fraction", 0.0)) > 0:
        raise ValueError(
            f"config.toy_failure_fraction={config.toy_failure_fraction}: the value module "
            "takes each episode's last frame as its goal, so it must train on successful "
            "episodes only; train it on a build with toy_failure_fraction=0")
    model = builders.build_value(config)
    train_dir, eval_dir = clips.data_dirs(config, workdir)
    train_ds = open_episodes(config, train_dir, "train")
    eval_ds = train_ds if eval_dir == train_dir else open_episodes(config, eval_dir, "val")
    logging.info("ValueModel %s (clip_len %d, %d px): %d training clips in %s, %d eval clips "
                 "in %s", config.model.name, model.config.clip_len, model.config.image_size,
                 len(train_ds), train_dir, len(eval_ds), eval_dir)
    return loop.train(
        config, workdir,
        init_fn=make_init_fn(model, train_ds.text_tokens, train_ds.text_dim),
        loss_fn=make_loss_fn(model, loss_weights(config)),
        make_loader=lambda mesh: _loader(config, train_ds, mesh),
        make_eval=make_eval_factory(config, model, eval_ds))
