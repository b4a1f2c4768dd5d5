"""Hyper-parameters of the FLIP action module (:class:`~flipjax.models.flow_cvae.FlowCVAE`):
the official CVAE-S/B/L sizes and the flipjax departures, each off by default."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from flipjax.models import variants


def _size(hidden: int, encoder_layers: int, decoder_layers: int, num_heads: int
          ) -> dict[str, int]:
    return dict(hidden=hidden, encoder_layers=encoder_layers, decoder_layers=decoder_layers,
                num_heads=num_heads)


# The official CVAE-S/B/L factories, and the golden-fixture configuration for tests.
VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": {**_size(64, 2, 3, 4), "flow_horizon": 4, "history": 2, "img_size": (32, 32)},
    "S": _size(384, 4, 8, 4),
    "B": _size(768, 4, 10, 4),
    "L": _size(768, 6, 12, 8),
}


@dataclasses.dataclass(frozen=True)
class CVAEConfig:
    """Hyper-parameters of :class:`FlowCVAE` (defaults: official CVAE-S, LIBERO-10 recipe).

    Attributes:
      hidden: model width D (also the latent width and the feed-forward width).
      encoder_layers: transformer layers of the posterior encoder.
      decoder_layers: transformer layers of the flow decoder.
      num_heads: attention heads.
      flow_horizon: L, points per trajectory including the query point.
      history: T, observation frames stacked on channels.
      img_size: (H, W) of the history frames.
      patch: patch size p of the image embedding.
      language_dim: Dl, width of the precomputed sentence features.
      point_features: F, width of a learned full-resolution feature map of the history
        frames, bilinearly sampled at each query point and added to its token (ATM /
        Track2Act style); 0 = official (a query token sees only its coordinates).
      point_feature_layers, point_feature_dilation: the feature map's 3x3 convolutions and
        their dilation growth (layer i dilated by dilation**i): 3 layers at dilation 2 see 15
        pixels, enough for a point to see motion of a few pixels per frame in the history.
      unit_coords: query coordinates mapped to [-1, 1] before their Linear (official: raw
        pixels).
      latent_to_queries: Linear(z) added to every query token besides the z token (official:
        the z token only).
      relative_flow: the posterior encoder reads each trajectory as its start in [-1, 1] and
        its displacements from the start in pixels (official: absolute pixels, where a motion
        of a few pixels is a small change on coordinates of tens to hundreds).
      learned_prior: the prior is p(z | observation, language), the posterior encoder's
        layers run over [prior token | image | language] (no flow) with their own mean and
        log-variance heads, and the KL is taken against it (the conditional VAE of Sohn et
        al. 2015); official: N(0, I). Sampling then draws from it.
      latent_dim: Z, the latent's width, entering the decoder through a Linear(Z -> D); 0 =
        official, Z = D with no projection. A few dimensions suffice for the choice between a
        scene's motions, and 8 prior samples cover a low-dimensional prior far better.
      context_point_features: the point feature map, averaged over each patch, is added to the
        image tokens (through a Linear), so the encoder, the learned prior and the decoder's
        context see the motion features the query points see (needs ``point_features``).
      point_feature_language, point_feature_coords: the point feature map also reads the
        instruction (FiLM) and the pixel coordinates (:class:`PointFeatureMap`; needs
        ``point_features``).
      latent_codes: K > 0 makes the latent discrete: the posterior and the learned prior are
        categoricals over K learned Z-wide codes (the posterior drawn by straight-through
        Gumbel-softmax, the KL exact), so every prior draw is a code the decoder was trained
        on; 0 = official (Gaussian). A Gaussian prior wider than the posteriors put most of
        its samples where the decoder had learned no motion (docs/LEARNING.md). Needs
        ``learned_prior``.
      prior_components: K > 0 makes the learned prior a mixture of K diagonal Gaussians
        (weights, means and variances from the context); the posterior stays Gaussian and the
        KL is estimated at its draw. 0 = one Gaussian. A single Gaussian has to be as wide as
        the scene's alternative motions together; a mixture can sit on each. Needs
        ``learned_prior`` and ``latent_codes`` = 0.
      prior_layers: > 0 gives the learned prior its own transformer layers over
        [prior token | image | language]; 0 = it runs the posterior encoder's layers (whose
        weights are trained mostly to read the flow) with its own token and heads.
      prior_queries: the learned prior also reads the query points' tokens (coordinates and
        sampled point features, no latent): p(z | observation, language, query points). The
        patch tokens average a few-pixel motion away; the points' features keep it.
    """

    hidden: int = 384
    encoder_layers: int = 4
    decoder_layers: int = 8
    num_heads: int = 4
    flow_horizon: int = 16
    history: int = 16
    img_size: tuple[int, int] = (128, 128)
    patch: int = 8
    language_dim: int = 4096
    point_features: int = 0
    point_feature_layers: int = 2
    point_feature_dilation: int = 1
    unit_coords: bool = False
    latent_to_queries: bool = False
    relative_flow: bool = False
    learned_prior: bool = False
    latent_dim: int = 0
    context_point_features: bool = False
    point_feature_language: bool = False
    point_feature_coords: bool = False
    latent_codes: int = 0
    prior_components: int = 0
    prior_layers: int = 0
    prior_queries: bool = False

    @classmethod
    def variant(cls, name: str, **overrides: Any) -> CVAEConfig:
        """The :data:`VARIANTS` entry ``name`` ("tiny", "S", "B", "L") with field overrides.

        ``"tiny"`` is the golden-fixture configuration: D=64, 2/3 layers, 4 heads, L=4, T=2,
        32x32 images.

        Raises:
          ValueError: an unknown name.
        """
        return cls(**variants.resolve("CVAE", VARIANTS, name, overrides))

    @property
    def z_dim(self) -> int:
        """Z, the latent width (``latent_dim``, or D when it is 0)."""
        return self.latent_dim or self.hidden

    @property
    def grid(self) -> tuple[int, int]:
        """(H/p, W/p) patches."""
        return self.img_size[0] // self.patch, self.img_size[1] // self.patch

    @property
    def num_patches(self) -> int:
        """P, image tokens per example."""
        return math.prod(self.grid)

    def validate(self) -> None:
        """Raises ValueError on inconsistent sizes."""
        if self.hidden % self.num_heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by {self.num_heads} heads")
        if self.hidden % 4:
            raise ValueError(f"hidden {self.hidden} must be divisible by 4 (2-D sin-cos table)")
        if any(s % self.patch for s in self.img_size):
            raise ValueError(f"img_size {self.img_size} is not divisible by patch {self.patch}")
        if self.flow_horizon < 2:
            raise ValueError(f"flow_horizon must be >= 2, got {self.flow_horizon}")
        if self.latent_dim < 0:
            raise ValueError(f"latent_dim must be >= 0 (0: the model width), got {self.latent_dim}")
        if self.latent_codes < 0 or (self.latent_codes and not self.learned_prior):
            raise ValueError(f"latent_codes must be 0 or > 0 with learned_prior=True, got "
                             f"{self.latent_codes} (learned_prior={self.learned_prior})")
        if self.prior_components < 0 or (self.prior_components and (
                not self.learned_prior or self.latent_codes)):
            raise ValueError(f"prior_components must be 0 or > 0 with learned_prior=True and "
                             f"latent_codes=0, got {self.prior_components}")
        if self.prior_queries and not self.learned_prior:
            raise ValueError("prior_queries needs learned_prior=True")
        if self.prior_layers < 0 or (self.prior_layers and not self.learned_prior):
            raise ValueError(f"prior_layers must be 0 or > 0 with learned_prior=True, got "
                             f"{self.prior_layers}")
        for flag in ("context_point_features", "point_feature_language",
                     "point_feature_coords"):
            if getattr(self, flag) and not self.point_features:
                raise ValueError(f"{flag} needs point_features > 0")
        if self.point_feature_layers < 1 or self.point_feature_dilation < 1:
            raise ValueError(f"point_feature_layers and point_feature_dilation must be >= 1, "
                             f"got {self.point_feature_layers}, {self.point_feature_dilation}")
