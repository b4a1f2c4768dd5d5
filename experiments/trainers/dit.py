"""Trainer of FLIP's dynamics module (:class:`flipjax.models.video_dit.VideoDiT`).

Data: ``build_clips`` shards in ``config.data_dir`` (evaluation: ``config.eval_data_dir``,
default the training clips), read as ``model.history`` frames up to the current one plus
``model.flow_horizon - 1`` future frames, with tracks of ``flow_horizon`` points starting at
the current frame. ``:runlocal`` builds toy clips in ``<workdir>/toy_data`` when the data dirs
are empty (see ``experiments/training/clips.py``).

Frames -> latents: the frozen codec of ``config.codec`` (:mod:`flipjax.codec`; the SD-VAE,
a flipjax autoencoder run, or the pixel stand-in for smoke runs) encodes every clip in a
jitted wrapper around the data loader (:class:`LatentLoader`) whose arguments are the codec's
parameters (replicated) and the uint8 batch (sharded over ``data`` x ``fsdp``), so the host
still ships uint8 and the batch never leaves the devices. The encoding is deterministic (the
posterior mean), so the loader's ``get_state``/``set_state`` alone make a resumed run exact.

Training batch: ``latents`` float32[B T h w C] (T = history + flow_horizon - 1), ``tracks``
float32[B N L 2] (pixels), ``text_tokens`` float32[B Lt D], ``text_mask`` bool[B Lt]. Inside the
jitted step the tracks become the model's flow with :func:`flipjax.flow_conditioning.flow_to_model`
(``config.flow_normalization``; the official units are pixels). The objective is the official
IDDPM loss (:func:`flipjax.models.diffusion.model_losses`): t uniform over the
``diffusion_steps``-step schedule, history frames clean and excluded from the loss, MSE on eps
plus the VB term training the learned-range variance. ``config.cond_dropout`` > 0 trains that
fraction of samples with the null condition (:func:`flipjax.flow_conditioning.drop_conditions`) for
classifier-free guidance; the official recipe does not, so it defaults to 0.

Evaluation (``config.eval_batches`` unshuffled held-out batches, EMA parameters when the run
keeps an EMA): DDIM (``eval_sample_steps`` respaced steps, ``eval_ddim_eta``, predicted
latents clipped as :func:`sampling_clip` says) samples the future latents from the clean
history latents, ground-truth flows and text. Reported: ``latent_l2`` (MSE to the true future
latents), ``psnr`` of the decoded samples against the true uint8 future frames, ``codec_psnr``
(the same for the decoded true latents: the codec's ceiling), two references:
``copy_psnr`` (the current frame repeated: a model must beat it to have learned any motion) and
``still_flow_psnr`` (sampled with the same noise but every track held still: equal to ``psnr``
when the model ignores its flow condition), the same three over only the pixels that change
(``moving_psnr``, ``moving_still_flow_psnr``, ``moving_copy_psnr``: a model that follows its flow
scores higher with the true one), with flows in unit coordinates ``warp_psnr`` and
``moving_warp_psnr`` (the current latents warped along the true tracks, no network: what the
flow alone predicts), the diffusion ``loss``/``mse``/``vb`` on the eval clips, and one network
call's x0 error at fixed noise levels (``x0_mse_t<t>`` for t in :data:`PROBE_TIMESTEPS`)
beside ``copy_x0_mse`` and, with unit flows, ``warp_x0_mse`` (a network that has learned
anything beats them at small t, where its noisy input nearly shows the answer).
PSNR is per frame, capped at :data:`PSNR_CAP` dB (identical frames) and averaged; the moving
figures pool the changed pixels of a batch. One sample video uint8[T H 2W 3] (ground truth | decoded
prediction, history and future) is written to ``workdir/samples/video_<step>.gif``.
"""

from __future__ import annotations

from collections.abc import Callable
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
from flipjax import builders, flow_conditioning, metrics
from flipjax.codec import LatentCodec
from flipjax.models import diffusion, sampling
from flipjax.models.flow_tokens import unit_to_cells, warp_latents
from flipjax.models.video_dit import VideoDiT
from flipjax.sharding import batch_sharding, replicated

PyTree = Any
PSNR_CAP = 100.0
# Training timesteps of the x0 probe: nearly clean, half-way, nearly pure noise (of 1000).
PROBE_TIMESTEPS = (5, 200, 900)


# ------------------------------------------------------------------------------------------
# Codec and model
# ------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------


def to_float(frames: jax.Array) -> jax.Array:
    """uint8 frames -> float32 in [-1, 1] (x / 127.5 - 1)."""
    return frames.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(frames: jax.Array) -> jax.Array:
    """float frames in [-1, 1] -> uint8 (clipped, rounded): what a viewer would see."""
    return jnp.round(jnp.clip((frames + 1.0) * 127.5, 0.0, 255.0)).astype(jnp.uint8)


def encode_batch(codec: LatentCodec, batch: dict[str, jax.Array], *,
                 keep_frames: bool = False) -> dict[str, jax.Array]:
    """Loader batch -> training batch (see the module docstring).

    Args:
      codec: the frame codec (its parameters are traced arguments under jit).
      batch: history uint8[B Th H W 3], future uint8[B Tf H W 3], tracks float32[B N L 2],
        text_tokens float32[B Lt D], text_mask bool[B Lt]; other keys are dropped.
      keep_frames: also return ``history`` and ``future`` (evaluation needs the pixels).

    Returns:
      dict with latents float32[B Th+Tf h w C], tracks, text_tokens, text_mask (and frames).
    """
    video = jnp.concatenate([batch["history"], batch["future"]], axis=1)
    out = {"latents": codec.encode_video(to_float(video)),
           "tracks": batch["tracks"].astype(jnp.float32),
           "text_tokens": batch["text_tokens"].astype(jnp.float32),
           "text_mask": batch["text_mask"].astype(bool)}
    if keep_frames:
        out.update(history=batch["history"], future=batch["future"])
    return out


def make_encoder(mesh: Mesh, keep_frames: bool = False) -> Callable[..., dict[str, jax.Array]]:
    """Jitted ``(codec, loader batch) -> training batch`` whose outputs stay batch-sharded."""
    return jax.jit(lambda codec, batch: encode_batch(codec, batch, keep_frames=keep_frames),
                   out_shardings=batch_sharding(mesh))


class LatentLoader:
    """A clip loader whose batches come out encoded by the frozen codec.

    The iterator state is the wrapped loader's: encoding is deterministic, so restoring the
    position restores the batches exactly.
    """

    def __init__(self, loader: loop.Loader, codec: LatentCodec,
                 encoder: Callable[..., dict[str, jax.Array]]):
        """Args: loader: a ClipLoader of global batches; codec: the (placed) codec;
        encoder: from :func:`make_encoder`."""
        self._loader, self._codec, self._encoder = loader, codec, encoder

    def __iter__(self) -> LatentLoader:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        return self._encoder(self._codec, next(self._loader))

    def get_state(self) -> Any:
        """The wrapped loader's position."""
        return self._loader.get_state()

    def set_state(self, state: Any) -> None:
        """Restores a position saved by :meth:`get_state`."""
        self._loader.set_state(state)


def conditions(batch: dict[str, jax.Array], image_size: tuple[int, int],
               normalization: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(flow float32[B N L 2] in model units, text_tokens, text_mask) of a training batch."""
    return (flow_conditioning.flow_to_model(batch["tracks"], image_size, normalization),
            batch["text_tokens"].astype(jnp.float32), batch["text_mask"].astype(bool))


def diffusion_terms(model: VideoDiT, schedule: diffusion.Schedule, params: PyTree,
                    latents: jax.Array, flow: jax.Array, text_tokens: jax.Array,
                    text_mask: jax.Array, rng: jax.Array,
                    prediction: str = "eps") -> dict[str, jax.Array]:
    """Per-sample IDDPM losses of one noising of ``latents`` float[B T h w C].

    Returns:
      dict of float32[B]: mse, vb, loss.
    """
    t_rng, n_rng = jax.random.split(rng)
    t = jax.random.randint(t_rng, latents.shape[:1], 0, schedule.num_steps)
    noise = jax.random.normal(n_rng, latents.shape, jnp.float32)

    def model_fn(x: jax.Array, timesteps: jax.Array) -> jax.Array:
        return model.apply({"params": params}, x, timesteps, flow, text_tokens, text_mask)

    return diffusion.model_losses(model_fn, schedule, latents, t, noise,
                                  history=model.history, learned_range=model.learn_sigma,
                                  prediction=prediction)


def prediction_of(config: ml_collections.ConfigDict) -> str:
    """``config.prediction``: what the DiT's output predicts, "eps" (official), "x0" or "v".

    Raises:
      ValueError: another value.
    """
    prediction = str(config.get("prediction", "eps"))
    if prediction not in diffusion.PREDICTIONS:
        raise ValueError(f"prediction must be one of {diffusion.PREDICTIONS}, got "
                         f"{prediction!r}")
    if bool(config.get("model", {}).get("flow_residual", False)) and prediction != "x0":
        raise ValueError(f"model.flow_residual offsets an x0 prediction by the warp; it needs "
                         f"prediction='x0', got {prediction!r}")
    return prediction


def make_loss_fn(model: VideoDiT, schedule: diffusion.Schedule,
                 config: ml_collections.ConfigDict) -> Any:
    """``(params, batch, rng) -> (loss, {"mse", "vb"})``, batch means of the IDDPM terms."""
    image_size = tuple(int(s) for s in config.image_size)
    normalization = str(config.flow_normalization)
    p_drop = float(config.cond_dropout)
    prediction = prediction_of(config)
    if not 0.0 <= p_drop < 1.0:
        raise ValueError(f"cond_dropout must be in [0, 1), got {p_drop}")

    def loss_fn(params: PyTree, batch: dict[str, jax.Array],
                rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        flow, text, mask = conditions(batch, image_size, normalization)
        rng, drop_rng = jax.random.split(rng)
        if p_drop > 0:
            drop = jax.random.bernoulli(drop_rng, p_drop, flow.shape[:1])
            flow, text, mask = flow_conditioning.drop_conditions(flow, text, mask, drop)
        terms = diffusion_terms(model, schedule, params, batch["latents"], flow, text, mask,
                                rng, prediction)
        return jnp.mean(terms["loss"]), {"mse": jnp.mean(terms["mse"]),
                                         "vb": jnp.mean(terms["vb"])}

    return loss_fn


def make_init_fn(model: VideoDiT, text_tokens: int) -> Any:
    """``rng -> params`` from dummy inputs of the model's shapes."""
    def init_fn(rng: jax.Array) -> PyTree:
        x = jnp.zeros((1, model.num_frames, *model.latent_size, model.in_channels), jnp.float32)
        flow = jnp.zeros((1, 1, model.flow_horizon, 2), jnp.float32)
        text = jnp.zeros((1, text_tokens, model.text_dim), jnp.float32)
        return model.init(rng, x, jnp.zeros((1,), jnp.int32), flow, text,
                          jnp.ones((1, text_tokens), bool))["params"]

    return init_fn


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------


def clip_spec(config: ml_collections.ConfigDict) -> clips.ClipSpec:
    """The clips the DiT needs: ``history`` + ``flow_horizon - 1`` frames and
    ``flow_horizon``-step tracks."""
    m = config.model
    return clips.ClipSpec(image_size=tuple(int(s) for s in config.image_size),
                          horizon=int(m.flow_horizon), history=int(m.history),
                          future=int(m.flow_horizon) - 1, text_dim=int(m.text_dim))


def build_toy_clips(config: ml_collections.ConfigDict, split: str, out: Path) -> None:
    """Renders the toy world's ``split`` and builds clips matching the model into ``out``."""
    clips.build_toy_clips(config, split, out, clip_spec(config))


# ------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------


def frame_psnr(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean per-frame PSNR (dB) of uint8[B T H W 3] frames, each capped at PSNR_CAP."""
    return jnp.mean(jnp.minimum(metrics.psnr(pred, target), PSNR_CAP))


def sampling_clip(config: ml_collections.ConfigDict, codec: LatentCodec) -> float | None:
    """The bound the DDIM sampler clips predicted latents to, or None.

    ``config.eval_clip_x0`` > 0 is used as given; otherwise only the pixel codec is clipped
    (its latents lie in [-scale, scale]); autoencoder latents are not, as in DiT and FLIP.
    """
    clip = float(config.eval_clip_x0 or 0.0)
    if clip > 0:
        return clip
    return codec.scale if codec.kind == "pixels" else None


def make_eval_step(model: VideoDiT, schedule: diffusion.Schedule,
                   config: ml_collections.ConfigDict, mesh: Mesh,
                   clip_x0: float | None = None) -> Any:
    """Jitted ``(params, codec, batch, rng) -> metrics and a sample video`` (replicated).

    ``batch`` is an :func:`encode_batch` output with the frames kept; ``clip_x0`` bounds the
    sampler's predicted latents (:func:`sampling_clip`).
    """
    image_size = tuple(int(s) for s in config.image_size)
    normalization = str(config.flow_normalization)
    steps = int(config.eval_sample_steps)
    if not 1 <= steps <= schedule.num_steps:
        raise ValueError(f"eval_sample_steps must be in [1, {schedule.num_steps}], got {steps}")
    sample_schedule = diffusion.respace(schedule, steps)
    eta = float(config.eval_ddim_eta)
    n_hist = model.history
    prediction = prediction_of(config)
    grid = tuple(n // model.patch for n in model.latent_size)

    def eval_step(params: PyTree, codec: LatentCodec, batch: dict[str, jax.Array],
                  rng: jax.Array) -> dict[str, jax.Array]:
        x0 = batch["latents"]
        flow, text, mask = conditions(batch, image_size, normalization)
        loss_rng, sample_rng = jax.random.split(rng)
        terms = diffusion_terms(model, schedule, params, x0, flow, text, mask, loss_rng,
                                prediction)
        cond = model.apply({"params": params}, flow, text, mask,
                           method=VideoDiT.encode_conditions)
        history = x0[:, :n_hist]
        future = x0[:, n_hist:]

        def sample(cond: Any) -> jax.Array:
            def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:
                return model.apply({"params": params}, x, t, cond, history,
                                   method=VideoDiT.denoise)

            return sampling.ddim_sample(model_fn, sample_schedule, sample_rng, future.shape,
                                        eta=eta, learned_range=model.learn_sigma,
                                        clip_x0=clip_x0, prediction=prediction)

        pred = sample(cond)
        probe = x0_probe(model, schedule, params, cond, history, future, sample_rng,
                         prediction)
        # Same noise, every track held at its query point: a model that ignores its flow
        # condition scores the same as with the true flow.
        still = jnp.broadcast_to(flow[:, :, :1], flow.shape)
        still_pred = sample(model.apply({"params": params}, still, text, mask,
                                        method=VideoDiT.encode_conditions))
        pred_frames = to_uint8(codec.decode_video(pred))
        still_frames = to_uint8(codec.decode_video(still_pred))
        baselines = {"copy_psnr": jnp.broadcast_to(batch["history"][:, -1:],
                                                   batch["future"].shape)}
        if normalization == "unit":
            # The hand-written predictor the flow allows: the current latents warped along
            # the true tracks, no network (an untrained flow_residual model's sample).
            cells = unit_to_cells(flow.astype(jnp.float32), grid)
            warped = warp_latents(history[:, -1], cells, model.patch)[..., :future.shape[-1]]
            baselines["warp_psnr"] = to_uint8(codec.decode_video(warped))
        copy_frames = baselines["copy_psnr"]
        probe["copy_x0_mse"] = jnp.mean(jnp.square(history[:, -1:] - future))
        if normalization == "unit":
            probe["warp_x0_mse"] = jnp.mean(jnp.square(warped - future))
        recon_frames = to_uint8(codec.decode_video(future))
        truth = jnp.concatenate([batch["history"][0], batch["future"][0]], axis=0)
        shown = jnp.concatenate([to_uint8(codec.decode_video(history[:1]))[0],
                                 pred_frames[0]], axis=0)
        return {"loss": jnp.mean(terms["loss"]), "mse": jnp.mean(terms["mse"]),
                "vb": jnp.mean(terms["vb"]),
                "latent_l2": jnp.mean(jnp.square(pred - future)),
                "psnr": frame_psnr(pred_frames, batch["future"]),
                "codec_psnr": frame_psnr(recon_frames, batch["future"]),
                "still_flow_psnr": frame_psnr(still_frames, batch["future"]),
                **{k: frame_psnr(v, batch["future"]) for k, v in baselines.items()},
                # Over the pixels that change: where following the flow shows.
                **{f"moving_{k}": jnp.minimum(metrics.changed_psnr(
                    v, batch["future"], copy_frames), PSNR_CAP)
                   for k, v in (("psnr", pred_frames), ("still_flow_psnr", still_frames),
                                *baselines.items())},
                **probe, "video": jnp.concatenate([truth, shown], axis=2)}

    return jax.jit(eval_step, out_shardings=replicated(mesh))


def x0_probe(model: VideoDiT, schedule: diffusion.Schedule, params: PyTree, cond: Any,
             history: jax.Array, future: jax.Array, rng: jax.Array,
             prediction: str) -> dict[str, jax.Array]:
    """``{"x0_mse_t<t>": float[]}``: one network call's x0 error on ``future`` float[B F h w
    C] noised to each of :data:`PROBE_TIMESTEPS` (the training schedule's indices)."""
    out = {}
    for i, step in enumerate(PROBE_TIMESTEPS):
        t = jnp.full(future.shape[:1], min(step, schedule.num_steps - 1), jnp.int32)
        x_t = diffusion.q_sample(schedule, future, t, jax.random.normal(
            jax.random.fold_in(rng, i), future.shape, jnp.float32))
        y = model.apply({"params": params}, x_t, diffusion.model_timesteps(schedule, t), cond,
                        history, method=VideoDiT.denoise)
        x0 = diffusion.p_mean_variance(schedule, y, x_t, t, learned_range=model.learn_sigma,
                                       prediction=prediction)["pred_x0"]
        out[f"x0_mse_t{step}"] = jnp.mean(jnp.square(x0 - future))
    return out


def make_eval_factory(config: ml_collections.ConfigDict, model: VideoDiT,
                      schedule: diffusion.Schedule, ds: ClipDataset,
                      place: Callable[[Mesh], LatentCodec], clip_x0: float | None) -> Any:
    """``mesh -> eval_fn(state, step)`` over ``config.eval_batches`` batches, or None when
    ``eval_batches`` is 0.

    Args:
      config, model, schedule: as trained.
      ds: the held-out clips.
      place: ``mesh -> codec`` with its parameters on the mesh.
      clip_x0: see :func:`sampling_clip`.
    """
    num_batches = int(config.eval_batches)
    if num_batches < 0:
        raise ValueError(f"eval_batches must be >= 0 (0 disables evaluation), got {num_batches}")
    if num_batches == 0:
        return None

    def factory(mesh: Mesh) -> Any:
        eval_step = make_eval_step(model, schedule, config, mesh, clip_x0)
        encoder = make_encoder(mesh, keep_frames=True)

        def eval_fn(state: Any, step: int) -> dict[str, Any]:
            del step  # a fixed key: every evaluation sees the same clips and noise
            codec = place(mesh)
            loader = LatentLoader(clips.clip_loader(config, ds, mesh, shuffle=False,
                                                    augment=False), codec, encoder)
            params = state.ema if state.ema is not None else state.params
            key = jax.random.key(int(config.seed) + 1)
            sums: dict[str, float] = {}
            video = None
            for i in range(num_batches):
                out = jax.device_get(eval_step(params, codec, next(loader),
                                               jax.random.fold_in(key, i)))
                clip_video = out.pop("video")
                video = clip_video if video is None else video
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
            return {**{k: v / num_batches for k, v in sums.items()},
                    "video": np.asarray(video)}

        return eval_fn

    return factory


# ------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Any:
    """Trains the VideoDiT as configured (resuming ``workdir`` if it has checkpoints).

    Args:
      config: an ``experiments/configs/dit.py`` config.
      workdir: run directory.

    Returns:
      The final TrainState.
    """
    codec = builders.build_codec(config)
    model = builders.build_dit(config, codec)
    schedule = builders.build_schedule(config)
    train_dir, eval_dir = clips.data_dirs(config, workdir)
    spec = clip_spec(config)
    train_ds = clips.open_clips(config, train_dir, "train", spec)
    eval_ds = (train_ds if eval_dir == train_dir
               else clips.open_clips(config, eval_dir, "val", spec))
    logging.info("VideoDiT %s on %s latents %s (codec factor %d, scale %g): %d training clips "
                 "in %s, %d eval clips in %s", config.model.size, codec.kind,
                 (*model.latent_size, model.in_channels), codec.factor, codec.scale,
                 len(train_ds), train_dir, len(eval_ds), eval_dir)

    placed: dict[Mesh, LatentCodec] = {}

    def place(mesh: Mesh) -> LatentCodec:
        # One replicated copy per mesh, shared by the training and evaluation loaders; host
        # numpy first so that multi-host placement needs no cross-process transfer.
        if mesh not in placed:
            placed[mesh] = jax.device_put(jax.tree.map(np.asarray, codec), replicated(mesh))
        return placed[mesh]

    def make_loader(mesh: Mesh) -> LatentLoader:
        return LatentLoader(clips.clip_loader(config, train_ds, mesh, shuffle=True,
                                              augment=True), place(mesh), make_encoder(mesh))

    return loop.train(
        config, workdir,
        init_fn=make_init_fn(model, train_ds.text_tokens),
        loss_fn=make_loss_fn(model, schedule, config),
        make_loader=make_loader,
        make_eval=make_eval_factory(config, model, schedule, eval_ds, place,
                                    sampling_clip(config, codec)))
