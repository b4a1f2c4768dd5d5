"""Trainer of the FLIP value module (:class:`flipjax.models.value.ValueModel`) with LIV's objective.

Data: ``build_clips`` shards in ``config.data_dir`` (evaluation: ``config.eval_data_dir``,
default the training clips), read episode by episode (:mod:`data_pipelines.episodes`). Each
sample is one episode: its first state, a uniformly drawn consecutive pair (s_t, s_{t+1}) and
its goal, the last state; a state is the clip of ``model.clip_len`` frames ending at a frame
(the first frame repeated before the episode starts). The instruction is the clip's text tokens.
Clip shards carry no success flag, so every episode is assumed to reach its goal (true of
demonstrations and of the toy world's default builds); filter failures out before building.
Same-scene negatives come from the toy world instead (``loss.success_ranking`` > 0, toy clips
only): ``toy_ranking_scenes`` scenes of the toy "train" split of ``config.seed`` are rendered
once with their faithful and a deliberately failed script from the same start
(:func:`data_pipelines.toy.endings.ending_pairs`; kept in ``toy_pairs_cache_dir``, default
``<workdir>/toy_data``, so a resumed run does not re-render), and every step adds
``ranking_batch`` of those pairs to the batch, each ending translated by up to ``ranking_shift``
pixels (0: none). With every LIV weight 0 the episode states are not embedded at all (the
ranking loss alone; the episode batch is still read).
With ``config.build_toy_data_if_missing`` (on under ``:runlocal``) toy clips are rendered into
empty data dirs (``<workdir>/toy_data/{train,val}``), ``toy_image_size`` pixels square.

Objective (:func:`flipjax.models.value_loss.liv_loss`): VIP with the goal clip as goal, VIP with
the instruction as goal and the goal-clip/instruction InfoNCE, weighted by ``config.loss``;
clips sharing an instruction are InfoNCE positives of each other (``text_id``). With
``loss.success_ranking`` > 0 (a departure, off by default) it adds
:func:`flipjax.models.value_loss.success_ranking_loss`: the instruction's two-way InfoNCE over
its scene's faithful and failed ending.

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
written to ``workdir/samples``). With ``eval_preference_problems`` > 0 (toy runs) it also scores
how often V(faithful ending; instruction) > V(failed ending; instruction) on that many held-out
toy planning problems (the "plan" split of ``config.seed``, exactly the endings that
``experiments.plan``'s ``value_prefers_success`` scores) beside chance
(``value_prefers_success``, ``value_prefers_success_chance`` = 0.5, ``value_success_margin``)
and on as many training scenes (``value_prefers_success_train``).

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
from data_pipelines.toy.endings import EndingPairs, cached_ending_pairs, shift_clips
from data_pipelines.toy.world import ToyConfig
from experiments.training import clips, loop
from flipjax import builders, viz
from flipjax import metrics as value_metrics
from flipjax.models.value import ValueModel, fit_frames
from flipjax.models.value_loss import (
    LivLossWeights,
    liv_loss,
    success_ranking_loss,
    value_from_embeddings,
)
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
                          num_negatives=int(lw.num_negatives),
                          success_ranking=float(lw.success_ranking),
                          ranking_temperature=float(lw.ranking_temperature))


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


def embed_states(model: ValueModel, params: PyTree, states: jax.Array,
                 condition: jax.Array | None = None) -> jax.Array:
    """states uint8[B K Tc h w 3] (condition float[B Dt], the instruction's text features, with
    ``model.config.text_conditioning``) -> clip embeddings float[B K E] (one tower pass)."""
    b, k = states.shape[:2]
    x = prepare_frames(states, model.config.image_size)
    if condition is not None:
        condition = jnp.repeat(condition, k, axis=0)
    e = model.apply({"params": params}, x.reshape(b * k, *x.shape[2:]), condition,
                    method=ValueModel.embed_clip)
    return e.reshape(b, k, -1)


def embed_instructions(model: ValueModel, params: PyTree, tokens: jax.Array,
                       mask: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """tokens float[B Lt D], mask bool[B Lt] -> (text embeddings float[B E], the condition
    float[B Dt] for :func:`embed_states`, None without ``text_conditioning``)."""
    feats = model.apply({"params": params}, tokens.astype(jnp.float32), mask.astype(bool),
                        method=ValueModel.text_features)
    text = model.apply({"params": params}, feats, method=ValueModel.project_text)
    return text, (None if model.config.text_conditioning == "none" else feats)


def make_loss_fn(model: ValueModel, weights: LivLossWeights) -> Any:
    """``(params, batch, rng) -> (loss, terms)`` with the LIV objective.

    ``batch``: states uint8[B 4 Tc h w 3] (init, s_t, s_{t+1}, goal), text_tokens float[B Lt
    D], text_mask bool[B Lt], text_id int[B]; with ``weights.success_ranking`` > 0 also the
    ending pairs (:class:`PairedLoader`): pair_success, pair_failure uint8[Bp Tc h w 3],
    pair_tokens float[Bp Lt D], pair_mask bool[Bp Lt]. Besides the unweighted loss terms, the
    metrics hold the mean language-goal values of the initial and goal states and the mean
    one-step change V(s_{t+1}) - V(s_t), which training should make positive, and with pairs
    the fraction of them ranked right (``pair_accuracy``). With every LIV weight 0 and
    ``success_ranking`` > 0 the episode states are skipped (the ranking loss alone).
    """
    ranking_only = weights.vip_image == weights.vip_text == weights.infonce == 0
    def loss_fn(params: PyTree, batch: dict[str, jax.Array],
                rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        total, metrics = jnp.zeros((), jnp.float32), {}
        if not (ranking_only and weights.success_ranking > 0):
            text, cond = embed_instructions(model, params, batch["text_tokens"],
                                            batch["text_mask"])
            emb = embed_states(model, params, batch["states"], cond)
            total, terms = liv_loss(emb[:, 0], emb[:, 1], emb[:, 2], emb[:, 3], text, weights,
                                    text_ids=batch["text_id"], key=rng)
            v = value_from_embeddings(emb, text[:, None], weights.gamma)  # [B 4]
            metrics = {k: t for k, t in terms.items() if k != "total"}
            metrics.update(value_init=jnp.mean(v[:, 0]), value_goal=jnp.mean(v[:, 3]),
                           value_step=jnp.mean(v[:, 2] - v[:, 1]))
        if weights.success_ranking > 0:
            pair_text, pair_cond = embed_instructions(model, params, batch["pair_tokens"],
                                                      batch["pair_mask"])
            ends = embed_states(model, params, jnp.stack(
                [batch["pair_success"], batch["pair_failure"]], axis=1), pair_cond)  # [Bp 2 E]
            rank = success_ranking_loss(pair_text, ends[:, 0], ends[:, 1],
                                        temperature=weights.ranking_temperature)
            pv = value_from_embeddings(ends, pair_text[:, None], weights.gamma)  # [Bp 2]
            total = total + weights.success_ranking * rank
            metrics.update(success_ranking=rank,
                           pair_accuracy=jnp.mean((pv[:, 0] > pv[:, 1]).astype(jnp.float32)))
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


def _toy_world(config: ml_collections.ConfigDict) -> ToyConfig:
    return ToyConfig(image_size=int(config.toy_image_size),
                     speed=float(config.get("toy_speed", 0.015)))


def toy_ending_pairs(config: ml_collections.ConfigDict, split: str, num: int,
                     cache_dir: str | Path) -> EndingPairs:
    """Faithful and failed endings of ``num`` toy scenes of ``split`` (seed ``config.seed``),
    ``model.clip_len`` frames each, at the toy clips' size, speed and text settings; kept in
    ``config.toy_pairs_cache_dir`` (when set) or ``cache_dir``."""
    return cached_ending_pairs(config.get("toy_pairs_cache_dir") or cache_dir,
                               int(num), int(config.seed), split,
                        frames=builders.value_config(config).clip_len,
                        text_dim=int(config.model.language_dim),
                        text_max_tokens=int(config.toy_text_max_tokens),
                        toy_config=_toy_world(config))


def ranking_pairs(config: ml_collections.ConfigDict, ds: ClipDataset,
                  cache_dir: str | Path) -> EndingPairs | None:
    """The training ending pairs when ``loss.success_ranking`` > 0 (else None).

    Pairs whose faithful script fails or whose failed script succeeds are dropped.

    Raises:
      ValueError: when the training clips are not toy clips, or for a bad scene count.
    """
    if float(config.loss.success_ranking) <= 0:
        return None
    schema = ds.manifest.get("schema")
    schema = schema.get("name") if isinstance(schema, dict) else schema
    if schema != "toy":
        raise ValueError(f"loss.success_ranking={config.loss.success_ranking} needs same-scene "
                         f"failed endings, which only the toy world renders; the training "
                         f"clips have schema {schema!r}")
    num = int(config.toy_ranking_scenes)
    if num < 1:
        raise ValueError(f"toy_ranking_scenes must be >= 1 with success_ranking, got {num}")
    pairs = toy_ending_pairs(config, "train", num, cache_dir)
    keep = np.flatnonzero(pairs.valid)
    logging.info("success ranking: %d of %d toy training scenes have a faithful and a failed "
                 "ending", len(keep), num)
    return EndingPairs(pairs.success[keep], pairs.failure[keep], pairs.text_tokens[keep],
                       pairs.text_mask[keep], [pairs.instructions[i] for i in keep],
                       [pairs.failures[i] for i in keep], pairs.valid[keep])


class PairedLoader:
    """The episode loader's batches plus ``count`` ending pairs per step (:class:`EndingPairs`).

    Draw ``n`` (counted from 0) takes pairs ``default_rng([seed, n]).integers(N, size=count)``,
    so the draws depend on the step only and the saved position (the inner loader's state and
    the draw count) resumes exactly; the same generator then translates each ending by up to
    ``shift`` pixels (:func:`data_pipelines.toy.endings.shift_clips`).
    """

    def __init__(self, inner: Any, pairs: EndingPairs, count: int, seed: int, mesh: Mesh,
                 shift: int = 0):
        self.inner, self.pairs, self.count, self.seed = inner, pairs, int(count), int(seed)
        self.shift = int(shift)
        self.sharding = batch_sharding(mesh)
        self.drawn = 0

    def __iter__(self) -> PairedLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        batch = dict(next(self.inner))
        rng = np.random.default_rng([self.seed, self.drawn])
        idx = rng.integers(len(self.pairs), size=self.count)
        self.drawn += 1
        p = self.pairs
        for key, x in (("pair_success", p.success), ("pair_failure", p.failure),
                       ("pair_tokens", p.text_tokens), ("pair_mask", p.text_mask)):
            x = x[idx]
            if key in ("pair_success", "pair_failure"):
                x = shift_clips(x, rng, self.shift)
            batch[key] = _global(np.ascontiguousarray(x), self.sharding)
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"inner": self.inner.get_state(), "drawn": self.drawn}

    def set_state(self, state: dict[str, Any]) -> None:
        self.inner.set_state(state["inner"])
        self.drawn = int(state["drawn"])


def _loader(config: ml_collections.ConfigDict, ds: ClipDataset, mesh: Mesh,
            pairs: EndingPairs | None = None) -> Any:
    inner = make_episode_loader(
        ds, int(config.batch_size), mesh=mesh, seed=int(config.seed), shuffle=True,
        min_length=int(config.min_episode_length), worker_count=int(config.data_workers),
        num_threads=int(config.data_threads))
    if pairs is None:
        return inner
    count = int(config.ranking_batch) or int(config.batch_size)
    return PairedLoader(inner, pairs, count, int(config.seed), mesh,
                        int(config.get("ranking_shift", 0)))


# ------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------


def _global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    # Every process holds the whole array (all read the same episodes), so each device
    # takes its slice directly; also right on multi-host meshes.
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def make_preference_fn(model: ValueModel, mesh: Mesh, chunk: int, gamma: float) -> Any:
    """``(params, pairs) -> {"accuracy", "margin"}``: how often V(success; text) exceeds
    V(failure; text) row by row (as ``flipjax.planning.diagnostics.value_preference``), and
    the mean V(success) - V(failure); rows go through the towers ``chunk`` at a time."""
    rows = batch_sharding(mesh)

    @jax.jit
    def values(params: PyTree, ends: jax.Array, tokens: jax.Array,
               mask: jax.Array) -> jax.Array:
        text, cond = embed_instructions(model, params, tokens, mask)
        clip = embed_states(model, params, ends, cond)  # [n 2 E]
        return value_from_embeddings(clip, text[:, None], gamma)  # [n 2]

    def preference(params: PyTree, pairs: EndingPairs) -> dict[str, float]:
        n = len(pairs)
        pad = (-n) % chunk
        take = np.concatenate([np.arange(n), np.full(pad, n - 1)]).astype(int)
        ends = np.stack([pairs.success, pairs.failure], axis=1)[take]
        tokens, mask = pairs.text_tokens[take], pairs.text_mask[take]
        out = [np.asarray(jax.device_get(values(
            params, _global(ends[i:i + chunk], rows), _global(tokens[i:i + chunk], rows),
            _global(mask[i:i + chunk], rows)))) for i in range(0, len(take), chunk)]
        v = np.concatenate(out)[:n]
        return {"accuracy": float(np.mean(v[:, 0] > v[:, 1])),
                "margin": float(np.mean(v[:, 0] - v[:, 1]))}

    return preference


def make_eval_factory(config: ml_collections.ConfigDict, model: ValueModel,
                      ds: ClipDataset, cache_dir: str | Path) -> Any:
    """``mesh -> eval_fn(state, step)`` over ``config.eval_episodes`` held-out episodes and
    ``config.eval_preference_problems`` toy planning problems (module docstring), or None when
    both are 0."""
    num = int(config.eval_episodes)
    stride = int(config.eval_stride)
    problems = int(config.eval_preference_problems)
    if num < 0:
        raise ValueError(f"eval_episodes must be >= 0 (0 disables evaluation), got {num}")
    if problems < 0:
        raise ValueError(f"eval_preference_problems must be >= 0, got {problems}")
    if stride < 1:
        raise ValueError(f"eval_stride must be >= 1, got {stride}")
    if num == 0 and problems == 0:
        return None
    held_out = train_pairs = None
    if problems:
        # Held out: the planner's problems ("plan" split); beside them as many training scenes.
        held_out = toy_ending_pairs(config, "plan", problems, cache_dir)
        train_pairs = toy_ending_pairs(config, "train", problems, cache_dir)
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
            text, cond = embed_instructions(model, params, tokens, mask)
            if cond is not None:
                cond = jnp.broadcast_to(cond, (states.shape[0], cond.shape[-1]))
            clip = embed_states(model, params, states[:, None], cond)[:, 0]
            return (jax.lax.with_sharding_constraint(clip, rep),
                    jax.lax.with_sharding_constraint(text, rep))

        preference = make_preference_fn(model, mesh, chunk, gamma) if problems else None

        def eval_fn(state: Any, step: int) -> dict[str, Any]:
            params = state.ema if state.ema is not None else state.params
            results: dict[str, Any] = {}
            if preference is not None:
                held, train = preference(params, held_out), preference(params, train_pairs)
                results.update(value_prefers_success=held["accuracy"],
                               value_prefers_success_chance=0.5,
                               value_success_margin=held["margin"],
                               value_prefers_success_train=train["accuracy"])
            if not episodes:
                return results
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
            results.update({k: float(np.mean(v)) for k, v in scores.items()})
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
    cache_dir = Path(workdir) / "toy_data"
    pairs = ranking_pairs(config, train_ds, cache_dir)
    logging.info("ValueModel %s (clip_len %d, %d px): %d training clips in %s, %d eval clips "
                 "in %s", config.model.name, model.config.clip_len, model.config.image_size,
                 len(train_ds), train_dir, len(eval_ds), eval_dir)
    return loop.train(
        config, workdir,
        init_fn=make_init_fn(model, train_ds.text_tokens, train_ds.text_dim),
        loss_fn=make_loss_fn(model, loss_weights(config)),
        make_loader=lambda mesh: _loader(config, train_ds, mesh, pairs),
        make_eval=make_eval_factory(config, model, eval_ds, cache_dir))
