"""Trainer of the frame codec (:class:`flipjax.models.autoencoder.AutoencoderKL`, SD-VAE).

Two modes (``config.mode``):

* ``"full"``: every parameter trains, from random init or from ``config.init_from``.
* ``"decoder"``: the way ``sd-vae-ft-ema`` / ``sd-vae-ft-mse`` were made from the original
  kl-f8 VAE. The encoder and ``quant_conv`` are frozen, so the latent space the dynamics DiT
  was trained on does not move, and only ``post_quant_conv`` and the decoder learn.
  Initialised from ``config.init_from`` (required unless ``:runlocal``, whose smoke run
  starts from random weights when it is empty).

``config.init_from`` is one of: a local diffusers ``AutoencoderKL`` directory
(``config.json`` + ``diffusion_pytorch_model.safetensors``, or a pipeline directory with a
``vae/`` folder), a ``.safetensors`` file with diffusers parameter names (architecture from
``config.model``), or a flipjax autoencoder workdir (its EMA params when it has them and
``config.init_from_ema``). Torch ``.bin`` files and the original CompVis checkpoint names are
not read (no torch here): convert them to diffusers safetensors first. The architecture of
``init_from`` must equal ``config.model``; the run fails at start otherwise.

Data: frames of clips (``build_clips`` shards in ``config.data_dir``; toy clips under
``:runlocal``). Each clip contributes its last ``frames_per_clip`` history frames, so a batch
of B clips is B * frames_per_clip images; uint8 is shipped and converted to [-1, 1] inside
the jitted step.

Objective, per the LDM recipe without its perceptual and adversarial parts: reconstruction
(``recon_loss``: L1 as LDM, or L2) of a decoded posterior *sample* plus ``kl_weight`` (1e-6,
LDM's kl-f8 value) times the KL of the diagonal Gaussian posterior to N(0, I). LDM sums both
terms over elements and averages over images; this trainer divides both by the pixel values
per image (H W 3), which keeps LDM's balance (so ``kl_weight`` means the same) and makes
``rec_loss`` a per-pixel error. Logged: ``rec_loss`` (per pixel) and ``kl`` (per image,
summed over latent elements, LDM's ``kl_loss``).

What the full SD recipe (``LPIPSWithDiscriminator``) adds and this trainer omits:

* an LPIPS perceptual term (weight 1.0; sd-vae-ft-mse used 0.1 with an MSE term), which needs
  pretrained VGG16 + LPIPS linear weights;
* a PatchGAN discriminator with hinge loss (weight 0.5, adaptively balanced against the
  reconstruction gradient at the decoder's last layer), switched on after a step threshold,
  with its own optimizer;
* a learned scalar log-variance dividing the reconstruction term.

Expect blurrier reconstructions than SD's; PSNR is what this objective optimises and what
evaluation reports.

Evaluation (EMA params when present; in decoder mode the frozen encoder always comes from
the live params, which are exactly the pretrained ones) over ``eval_batches`` unshuffled
batches of ``config.eval_data_dir``: ``psnr`` of the posterior-mean reconstruction (as uint8
frames) against the input frames, ``loss`` / ``rec_loss`` / ``kl`` of the training objective
with a fixed key, and the statistics of the diffusion latents ``(mean - shift) * scale``:
``latent_mean``, ``latent_std`` (near 1 when ``scaling_factor`` fits the data; SD's 0.18215
is 1/std of its own training images' latents) and ``scale_for_unit_std`` (the scaling
factor that would give unit std). The sample image ``reconstruction`` is uint8[k*H 2W 3]:
k rows of input | reconstruction.

The workdir gets ``autoencoder_config.json`` at start (:mod:`flipjax.models.autoencoder_json`):
the ``dataclasses.asdict`` of the run's :class:`AutoencoderConfig` with ``dtype`` as its name
(e.g. "float32"; the training compute dtype, as is ``remat``: readers may override both).
``autoencoder_json.read`` rebuilds the config; ``flipjax.codec`` reads it with the
checkpoint's params.
"""

from __future__ import annotations

import dataclasses
import functools
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
from experiments.training.autoencoder_init import check_init_from, load_pretrained
from flipjax import builders, metrics
from flipjax.models import autoencoder_json
from flipjax.models.autoencoder import AutoencoderConfig, AutoencoderKL
from flipjax.sharding import replicated

PyTree = Any
MODES = ("full", "decoder")
RECON_LOSSES = ("l1", "l2")
# Frozen in decoder mode: everything that produces the latents.
ENCODER_MODULES = ("encoder", "quant_conv")


# ------------------------------------------------------------------------------------------
# Model, config file, batches and loss
# ------------------------------------------------------------------------------------------


def convert_batch(batch: dict[str, jax.Array]) -> jax.Array:
    """Loader batch -> the images the autoencoder sees.

    Args:
      batch: history uint8[B F H W 3] (other keys are ignored).

    Returns:
      float32[B*F H W 3] in [-1, 1].

    Raises:
      ValueError: when ``history`` is not [B F H W 3].
    """
    history = batch["history"]
    if history.ndim != 5 or history.shape[-1] != 3:
        raise ValueError(f"batch['history'] must be [B F H W 3], got {list(history.shape)}")
    b, f, h, w, _ = history.shape
    return history.reshape(b * f, h, w, 3).astype(jnp.float32) / 127.5 - 1.0


def to_uint8(images: jax.Array) -> jax.Array:
    """float[... H W 3] in [-1, 1] -> uint8 (clipped, rounded)."""
    return jnp.round((jnp.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) per image.

    Args:
      mean, logvar: float[B h w C] posterior parameters.

    Returns:
      float32[B], summed over h, w and C (LDM's ``DiagonalGaussianDistribution.kl``).
    """
    if mean.ndim != 4 or mean.shape != logvar.shape:
        raise ValueError(f"mean and logvar must be equal [B h w C], got {list(mean.shape)} "
                         f"and {list(logvar.shape)}")
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.sum(kl.astype(jnp.float32), axis=(1, 2, 3))


def autoencoder_loss(recon: jax.Array, target: jax.Array, mean: jax.Array,
                     logvar: jax.Array, *, recon_loss: str = "l1",
                     kl_weight: float = 1e-6) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The objective (see the module docstring for the normalisation).

    Args:
      recon: float[B H W 3] decoded images.
      target: float[B H W 3] input images in [-1, 1].
      mean, logvar: float[B h w C] posterior.
      recon_loss: "l1" or "l2".
      kl_weight: weight of the KL term relative to LDM's summed reconstruction loss.

    Returns:
      (loss float32[], {"rec_loss": per-pixel error, "kl": per-image KL}).
    """
    if recon.shape != target.shape or recon.ndim != 4:
        raise ValueError(f"recon and target must be equal [B H W C], got {list(recon.shape)} "
                         f"and {list(target.shape)}")
    if recon_loss not in RECON_LOSSES:
        raise ValueError(f"recon_loss must be one of {RECON_LOSSES}, got {recon_loss!r}")
    err = recon.astype(jnp.float32) - target.astype(jnp.float32)
    rec = jnp.mean(jnp.abs(err) if recon_loss == "l1" else jnp.square(err))
    kl = jnp.mean(kl_divergence(mean, logvar))
    values_per_image = float(np.prod(target.shape[1:]))
    loss = rec + kl_weight * kl / values_per_image
    return loss, {"rec_loss": rec, "kl": kl}


def make_loss_fn(model: AutoencoderKL, recon_loss: str, kl_weight: float) -> Any:
    """``(params, batch, rng) -> (loss, terms)``, decoding a posterior sample."""
    def loss_fn(params: PyTree, batch: dict[str, jax.Array],
                rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        x = convert_batch(batch)
        recon, mean, logvar = model.apply({"params": params}, x, rng, True)
        return autoencoder_loss(recon, x, mean, logvar, recon_loss=recon_loss,
                                kl_weight=kl_weight)

    return loss_fn


def make_init_fn(model: AutoencoderKL) -> Callable[[jax.Array], PyTree]:
    """``rng -> params``; parameter shapes do not depend on the image size, so the smallest
    valid image is used."""
    f = model.config.downsample_factor

    def init_fn(rng: jax.Array) -> PyTree:
        return model.init(rng, jnp.zeros((1, f, f, model.config.in_channels)))["params"]

    return init_fn


def trainable_fn(mode: str) -> Callable[[tuple[str, ...]], bool] | None:
    """The loop's ``trainable`` predicate: None in "full" mode, the decoder side in
    "decoder" mode."""
    if mode not in MODES:
        raise ValueError(f"config.mode must be one of {MODES}, got {mode!r}")
    if mode == "full":
        return None
    return lambda path: path[0] not in ENCODER_MODULES


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------


def clip_spec(config: ml_collections.ConfigDict) -> clips.ClipSpec:
    """The clips the trainer reads: ``frames_per_clip`` history frames of the model's size;
    any track horizon and text width."""
    return clips.ClipSpec(image_size=tuple(int(s) for s in config.image_size), horizon=None,
                          history=int(config.frames_per_clip), future=0, text_dim=None)


def open_frames(config: ml_collections.ConfigDict, directory: Path, split: str) -> ClipDataset:
    """Opens clips (building toy clips with the shared toy settings when allowed)."""
    spec = clip_spec(config)
    if config.build_toy_data_if_missing and not (directory / "manifest.json").exists():
        toy = dataclasses.replace(spec, horizon=int(config.toy_horizon),
                                  text_dim=int(config.toy_text_dim))
        clips.build_toy_clips(config, split, directory, toy)
    return clips.open_clips(config, directory, split, spec)


def _loader(config: ml_collections.ConfigDict, ds: ClipDataset, mesh: Mesh, *,
            shuffle: bool) -> Any:
    return clips.clip_loader(config, ds, mesh, shuffle=shuffle, augment=False)


# ------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------


def eval_params(state: Any, mode: str) -> PyTree:
    """EMA params when present; in decoder mode the frozen encoder side is taken from the
    live params, which hold the pretrained values exactly (an EMA update rounds them)."""
    if state.ema is None:
        return state.params
    if mode == "decoder":
        return {k: state.params[k] if k in ENCODER_MODULES else v
                for k, v in state.ema.items()}
    return state.ema


def make_eval_step(model: AutoencoderKL, recon_loss: str, kl_weight: float, samples: int,
                   mesh: Mesh) -> Any:
    """Jitted ``(params, batch, rng) -> (metrics, grid)``: per-batch means, the latent sums
    that :func:`make_eval_factory` pools, and the :func:`sample_grid` of the batch's first
    ``samples`` frames, all replicated so that every host can read them."""
    loss_fn = make_loss_fn(model, recon_loss, kl_weight)

    @functools.partial(jax.jit, out_shardings=replicated(mesh))
    def eval_step(params: PyTree, batch: dict[str, jax.Array],
                  rng: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
        x = convert_batch(batch)
        loss, terms = loss_fn(params, batch, rng)
        recon, mean, _ = model.apply({"params": params}, x)
        cfg = model.config
        latents = (mean - cfg.shift_factor) * cfg.scaling_factor
        recon_u8 = to_uint8(recon)
        target_u8 = batch["history"].reshape(x.shape).astype(jnp.uint8)
        out = {"loss": loss, **terms, "psnr": jnp.mean(metrics.psnr(recon_u8, target_u8)),
               "latent_sum": jnp.sum(latents), "latent_sqsum": jnp.sum(jnp.square(latents)),
               "latent_count": jnp.asarray(latents.size, jnp.float32)}
        return out, sample_grid(target_u8[:samples], recon_u8[:samples])

    return eval_step


def sample_grid(inputs: jax.Array, recons: jax.Array) -> jax.Array:
    """uint8[k*H 2W 3]: one row per frame, input on the left, reconstruction on the right.

    Args:
      inputs, recons: uint8[k H W 3].
    """
    if inputs.shape != recons.shape or inputs.ndim != 4:
        raise ValueError(f"inputs and recons must be equal [k H W 3], got {inputs.shape} and "
                         f"{recons.shape}")
    rows = jnp.concatenate([inputs, recons], axis=2)
    return rows.reshape(-1, *rows.shape[2:])


def make_eval_factory(config: ml_collections.ConfigDict, model: AutoencoderKL,
                      ds: ClipDataset) -> Any:
    """``mesh -> eval_fn(state, step)`` over ``config.eval_batches`` unshuffled batches, or
    None when ``eval_batches`` is 0."""
    num_batches = int(config.eval_batches)
    if num_batches < 0:
        raise ValueError(f"eval_batches must be >= 0 (0 disables evaluation), got {num_batches}")
    if num_batches == 0:
        return None
    samples = int(config.eval_samples)
    mode = config.mode

    def factory(mesh: Mesh) -> Any:
        eval_step = make_eval_step(model, config.recon_loss, float(config.kl_weight), samples,
                                   mesh)

        def eval_fn(state: Any, step: int) -> dict[str, Any]:
            del step  # a fixed key and unshuffled clips: evaluations are comparable
            loader = _loader(config, ds, mesh, shuffle=False)
            key = jax.random.key(int(config.seed) + 1)
            params = eval_params(state, mode)
            sums: dict[str, float] = {}
            grid = None
            for i in range(num_batches):
                m, batch_grid = jax.device_get(eval_step(params, next(loader),
                                                         jax.random.fold_in(key, i)))
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                if grid is None:
                    grid = np.asarray(batch_grid)
            count = sums.pop("latent_count")
            mean = sums.pop("latent_sum") / count
            std = float(np.sqrt(max(sums.pop("latent_sqsum") / count - mean**2, 0.0)))
            out: dict[str, Any] = {k: v / num_batches for k, v in sums.items()}
            out.update(latent_mean=mean, latent_std=std,
                       scale_for_unit_std=model.config.scaling_factor / max(std, 1e-12),
                       reconstruction=grid)
            return out

        return eval_fn

    return factory


# ------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------


def validate(config: ml_collections.ConfigDict) -> AutoencoderConfig:
    """Checks the trainer's own fields; returns the model config.

    Raises:
      ValueError: naming the offending field.
    """
    trainable_fn(config.mode)
    if config.recon_loss not in RECON_LOSSES:
        raise ValueError(f"config.recon_loss must be one of {RECON_LOSSES}, got "
                         f"{config.recon_loss!r}")
    if float(config.kl_weight) < 0:
        raise ValueError(f"config.kl_weight must be >= 0, got {config.kl_weight}")
    for name in ("frames_per_clip", "eval_samples"):
        if int(config[name]) < 1:
            raise ValueError(f"config.{name} must be >= 1, got {config[name]}")
    cfg = builders.autoencoder_config(config)
    size = tuple(int(s) for s in config.image_size)
    f = cfg.downsample_factor
    if len(size) != 2 or size[0] % f or size[1] % f:
        raise ValueError(f"config.image_size {size} must be (H, W), multiples of the model's "
                         f"downsample factor {f}")
    return cfg


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Any:
    """Trains the frame autoencoder as configured (resuming ``workdir`` if it has
    checkpoints).

    Args:
      config: an ``experiments/configs/autoencoder.py`` config.
      workdir: run directory; gets ``autoencoder_config.json``, checkpoints, metrics, samples.

    Returns:
      The final TrainState.
    """
    cfg = validate(config)
    check_init_from(config)
    model = AutoencoderKL(cfg)
    autoencoder_json.write(cfg, workdir)
    train_dir, eval_dir = clips.data_dirs(config, workdir)
    train_ds = open_frames(config, train_dir, "train")
    eval_ds = train_ds if eval_dir == train_dir else open_frames(config, eval_dir, "val")
    logging.info("autoencoder (%s mode, levels %s): %d training clips in %s, %d eval clips "
                 "in %s, %d frames per clip", config.mode, cfg.block_out_channels,
                 len(train_ds), train_dir, len(eval_ds), eval_dir, config.frames_per_clip)
    if not config.init_from:
        logging.info("no init_from: starting from random weights")
    return loop.train(
        config, workdir,
        init_fn=make_init_fn(model),
        loss_fn=make_loss_fn(model, config.recon_loss, float(config.kl_weight)),
        make_loader=lambda mesh: _loader(config, train_ds, mesh, shuffle=True),
        make_eval=make_eval_factory(config, model, eval_ds),
        trainable=trainable_fn(config.mode),
        pretrained=(lambda: load_pretrained(config)) if config.init_from else None)
