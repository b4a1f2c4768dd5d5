"""FLIP action module: a conditional VAE that proposes flows (point trajectories) as actions.

A JAX/Linen port of the official ``ScaleDirectionCVAE``. Both halves are post-LN transformer
encoders (torch ``nn.TransformerEncoderLayer`` semantics, ReLU, feed-forward width = D) over
a token sequence that ends with the shared observation context:

  encoder: [cls | Linear(2L->D)(whole ground-truth trajectories) | image patches | language]
           -> z_mu, z_logvar (from cls), image / flow reconstructions (auxiliary heads)
  decoder: [z | Linear(2->D)(query points) | image patches | language]
           -> per-step scale (softplus) and unit direction for the first L-1 steps,
              flow = query point + cumulative sum of scale * direction.

Image patches are a p x p patch embedding of the T history frames stacked on channels in
``(t c)`` order, plus a fixed 2-D sin-cos table; language tokens are Linear(D_lang->D) of
precomputed sentence-model features. The context is embedded once per call and shared by the
encoder and the decoder.

Latent sampling (a deliberate fix): the official code samples the posterior as
``Normal(mu, exp(exp(0.5 * logvar)))`` and the prior at evaluation as
``Normal(0, exp(exp(0)))`` = N(0, e^2) -- the standard deviation is exponentiated twice, so it
never matches the KL term the model is trained with. Here the posterior std is
``exp(0.5 * logvar)`` and the prior is N(0, I). ``official_std=True`` reproduces the official
double exponential for parity checks only.

Shapes (einops, see ``flipjax.typing``): B batch, N query points, L flow horizon (points per
trajectory, including the query point), T history frames, H W image size, Lt language tokens,
Dl language feature width, D model width, P = (H/p)(W/p) image patches.
"""

from __future__ import annotations

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from flipjax import shapes
from flipjax.geometry.camera import bilinear_sample
from flipjax.models.cvae_config import VARIANTS, CVAEConfig  # noqa: F401 (re-exported)
from flipjax.models.cvae_latent import (  # noqa: F401 (latent_std re-exported)
    code_draw,
    gaussian_draw,
    latent_std,
    mixture_draw,
)
from flipjax.models.layers import (
    Dtype,
    PatchEmbed,
    PostLNEncoderLayer,
    dense,
    padding_mask,
    sincos_2d,
)
from flipjax.models.point_features import PointFeatureMap
from flipjax.typing import Array


def reconstruct_flow(query_points: Array, scale: Array, direction: Array) -> Array:
    """Integrates per-step moves into trajectories.

    Args:
      query_points: float[B N 2] start points.
      scale: float[B N S 1] step lengths (S = L-1 steps).
      direction: float[B N S 2] step directions.

    Returns:
      float[B N (S+1) 2]: the query point followed by query + cumsum(scale * direction).
    """
    dims = shapes.check(query_points, "query_points", "B N 2")
    dims = shapes.check(scale, "scale", "B N S 1", dims)
    shapes.check(direction, "direction", "B N S 2", dims)
    steps = jnp.cumsum(scale * direction, axis=2)
    return jnp.concatenate([query_points[:, :, None], query_points[:, :, None] + steps], axis=2)


class FlowCVAE(nn.Module):
    """The FLIP action module (see the module docstring).

    Random streams: ``__call__`` and :meth:`sample` draw the latent from the ``"latent"`` rng
    stream (``apply(..., rngs={"latent": key})``); ``encode`` and ``decode`` are deterministic.
    """

    config: CVAEConfig
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        c = self.config
        c.validate()
        d, lh = c.hidden, c.flow_horizon
        dt = self.dtype
        self.language_encoder = dense(d, (None, "embed"), dtype=dt)
        self.vision_encoder = PatchEmbed(d, c.patch, dtype=dt)
        self.vision_decoder = dense(3 * c.history * c.patch**2, ("embed", "patch"), dtype=dt)
        self.query_point_encoder = dense(d, (None, "embed"), dtype=dt)
        self.flow_encoder = dense(d, (None, "embed"), dtype=dt)
        self.flow_decoder = dense(2 * lh, ("embed", None), dtype=dt)
        # torch.randn init, as the official cls token.
        self.cls_token = self.param(
            "cls_token", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("embed",)),
            (d,))
        self.encoder = [PostLNEncoderLayer(c.num_heads, d, dtype=dt)
                        for _ in range(c.encoder_layers)]
        self.decoder = [PostLNEncoderLayer(c.num_heads, d, dtype=dt)
                        for _ in range(c.decoder_layers)]
        z_axes = ("embed", None) if c.latent_dim else ("embed", "mlp")  # a few columns: unsplit
        if c.latent_codes:
            self.z_logits = dense(c.latent_codes, ("embed", None), dtype=dt)
            self.codebook = self.param("codebook", nn.with_logical_partitioning(
                nn.initializers.normal(1.0), (None, None)), (c.latent_codes, c.z_dim))
        else:
            self.z_mu = dense(c.z_dim, z_axes, dtype=dt)
            self.z_logvar = dense(c.z_dim, z_axes, dtype=dt)
        if c.latent_dim:
            self.latent_in = dense(d, (None, "embed"), dtype=dt)
        self.scale_head = dense(lh, ("embed", None), dtype=dt)
        self.direction_head = dense(2 * lh, ("embed", None), dtype=dt)
        if c.point_features:
            self.point_feature_map = PointFeatureMap(c.point_features, dtype=dt,
                                                     layers=c.point_feature_layers,
                                                     dilation=c.point_feature_dilation,
                                                     language=c.point_feature_language,
                                                     coords=c.point_feature_coords)
            self.point_feature_encoder = dense(d, (None, "embed"), dtype=dt)
        if c.context_point_features:
            self.context_feature_encoder = dense(d, (None, "embed"), dtype=dt)
        if c.latent_to_queries:
            self.latent_to_query = dense(d, ("embed", "mlp"), dtype=dt)
        if c.learned_prior:
            self.prior_token = self.param(
                "prior_token",
                nn.with_logical_partitioning(nn.initializers.normal(1.0), ("embed",)), (d,))
            if c.prior_layers:
                self.prior_encoder = [PostLNEncoderLayer(c.num_heads, d, dtype=dt)
                                      for _ in range(c.prior_layers)]
            if c.latent_codes or c.prior_components:
                self.prior_logits = dense(c.latent_codes or c.prior_components,
                                          ("embed", None), dtype=dt)
            if c.prior_components:
                self.prior_mu = dense(c.prior_components * c.z_dim, z_axes, dtype=dt)
                self.prior_logvar = dense(c.prior_components * c.z_dim, z_axes, dtype=dt)
            elif not c.latent_codes:
                self.prior_mu = dense(c.z_dim, z_axes, dtype=dt)
                self.prior_logvar = dense(c.z_dim, z_axes, dtype=dt)

    # --------------------------------------------------------------------------------------
    # Shared context
    # --------------------------------------------------------------------------------------

    def _check_context(self, history: Array, text_tokens: Array, text_mask: Array | None,
                       dims: dict[str, int]) -> dict[str, int]:
        c = self.config
        dims = shapes.check(history, "history", f"B {c.history} {c.img_size[0]} "
                            f"{c.img_size[1]} 3", dims, dtype="float")
        dims = shapes.check(text_tokens, "text_tokens", f"B Lt {c.language_dim}", dims,
                            dtype="float")
        if text_mask is not None:
            dims = shapes.check(text_mask, "text_mask", "B Lt", dims, dtype="bool")
        return dims

    def embed_context(self, history: Array, text_tokens: Array) -> tuple[Array, Array]:
        """Image and language tokens shared by the encoder and the decoder.

        Args:
          history: float[B T H W 3] observation frames (the official pipeline feeds
            ImageNet-normalised RGB).
          text_tokens: float[B Lt Dl] sentence features.

        Returns:
          (float[B P D] image tokens, float[B Lt D] language tokens).
        """
        self._check_context(history, text_tokens, None, {})
        return self._embed(history, text_tokens)[:2]

    def _feature_map(self, history: Array, text_tokens: Array,
                     text_mask: Array | None) -> Array | None:
        """float32[B H W F] point features of the history, or None without them."""
        if not self.config.point_features:
            return None
        stacked = einops.rearrange(history, "b t h w c -> b h w (t c)").astype(self.dtype)
        return self.point_feature_map(stacked, text_tokens, text_mask).astype(jnp.float32)

    def _embed(self, history: Array, text_tokens: Array, text_mask: Array | None = None
               ) -> tuple[Array, Array, Array | None]:
        """(image, language tokens, point feature map): the map once for context and queries."""
        fmap = self._feature_map(history, text_tokens, text_mask)
        # (t c) channel order: the official model stacks frames with 'b t c h w -> b (t c) h w'.
        stacked = einops.rearrange(history, "b t h w c -> b h w (t c)").astype(self.dtype)
        pos = jnp.asarray(sincos_2d(self.config.hidden, *self.config.grid), self.dtype)
        img = self.vision_encoder(stacked) + pos[None]
        if self.config.context_point_features:
            p = self.config.patch
            pooled = einops.reduce(fmap, "b (h p) (w q) f -> b (h w) f", "mean", p=p, q=p)
            img = img + self.context_feature_encoder(pooled.astype(self.dtype))
        return img, self.language_encoder(text_tokens.astype(self.dtype)), fmap

    def _run(self, layers: list[PostLNEncoderLayer], prefix: Array, img: Array, lang: Array,
             text_mask: Array | None) -> Array:
        b = prefix.shape[0]
        x = jnp.concatenate([prefix, img, lang], axis=1)
        mask = None
        if text_mask is not None:
            valid = jnp.concatenate(
                [jnp.ones((b, prefix.shape[1] + img.shape[1]), bool), text_mask], axis=1)
            mask = padding_mask(valid)
        for layer in layers:
            x = layer(x, mask)
        return x

    # --------------------------------------------------------------------------------------
    # Encoder / decoder on embedded context
    # --------------------------------------------------------------------------------------

    def _unit(self, points: Array) -> Array:  # pixels -> [-1, 1] over the frame
        size = jnp.asarray(self.config.img_size[::-1], jnp.float32) - 1.0  # (W-1, H-1)
        return 2.0 * points.astype(jnp.float32) / size - 1.0

    def _encode(self, flow: Array, img: Array, lang: Array,
                text_mask: Array | None) -> dict[str, Array]:
        b, n, lh, _ = flow.shape
        flow = flow.astype(jnp.float32)
        if self.config.relative_flow:
            flow = jnp.concatenate(
                [self._unit(flow[:, :, :1]), flow[:, :, 1:] - flow[:, :, :1]], axis=2)
        flow_tokens = self.flow_encoder(
            einops.rearrange(flow, "b n l two -> b n (l two)").astype(self.dtype))
        cls = jnp.broadcast_to(self.cls_token.astype(self.dtype), (b, 1, self.config.hidden))
        x = self._run(self.encoder, jnp.concatenate([cls, flow_tokens], axis=1), img, lang,
                      text_mask)
        h = x[:, 0]
        if self.config.latent_codes:
            latent = {"z_logits": self.z_logits(h).astype(jnp.float32)}
        else:
            latent = {"z_mu": self.z_mu(h).astype(jnp.float32),
                      "z_logvar": jnp.clip(self.z_logvar(h).astype(jnp.float32), -10.0, 10.0)}
        return {
            **latent,
            "img_output": self.vision_decoder(x[:, 1 + n:1 + n + img.shape[1]]).astype(
                jnp.float32),
            "flow_output": self.flow_decoder(x[:, 1:1 + n]).astype(jnp.float32).reshape(
                b, n, lh, 2),
        }

    def _prior(self, img: Array, lang: Array, text_mask: Array | None,
               points: Array | None = None) -> dict[str, Array]:
        """The prior: prior_mu, prior_logvar float[B Z] (N(0, I) or the learned
        p(z | context)), or prior_logits float[B K] with ``latent_codes``; ``points``: the
        query points' tokens float[B N D], read with ``prior_queries``."""
        b, z = img.shape[0], self.config.z_dim
        if not self.config.learned_prior:
            return {"prior_mu": jnp.zeros((b, z), jnp.float32),
                    "prior_logvar": jnp.zeros((b, z), jnp.float32)}
        token = jnp.broadcast_to(self.prior_token.astype(self.dtype), (b, 1, self.config.hidden))
        if self.config.prior_queries:
            if points is None:
                raise ValueError("prior_queries: the prior needs the query points' tokens")
            token = jnp.concatenate([token, points], axis=1)
        layers = self.prior_encoder if self.config.prior_layers else self.encoder
        h = self._run(layers, token, img, lang, text_mask)[:, 0]
        if self.config.latent_codes:
            return {"prior_logits": self.prior_logits(h).astype(jnp.float32)}
        if self.config.prior_components:
            k = (b, self.config.prior_components, z)
            return {"prior_logits": self.prior_logits(h).astype(jnp.float32),
                    "prior_mu": self.prior_mu(h).astype(jnp.float32).reshape(k),
                    "prior_logvar": jnp.clip(self.prior_logvar(h).astype(jnp.float32),
                                             -10.0, 10.0).reshape(k)}
        return {"prior_mu": self.prior_mu(h).astype(jnp.float32),
                "prior_logvar": jnp.clip(self.prior_logvar(h).astype(jnp.float32), -10.0, 10.0)}

    def _point_tokens(self, query_points: Array, history: Array,
                      fmap: Array | None = None) -> Array:
        """float[B N D] query tokens without the latent: coordinates and point features."""
        c = self.config
        coords = query_points.astype(jnp.float32)
        if c.unit_coords:
            coords = self._unit(coords)
        q = self.query_point_encoder(coords.astype(self.dtype))
        if c.point_features:
            if fmap is None:   # language point features need _embed's map (the text)
                fmap = self._feature_map(history, None, None)
            sampled = jax.vmap(lambda f, p: bilinear_sample(f, p)[0])(
                fmap, query_points.astype(jnp.float32))
            q = q + self.point_feature_encoder(sampled.astype(self.dtype))
        return q

    def _query_tokens(self, query_points: Array, history: Array, z: Array,
                      fmap: Array | None = None, points: Array | None = None) -> Array:
        # points: the latent-free tokens when the caller already built them for the prior.
        q = self._point_tokens(query_points, history, fmap) if points is None else points
        if self.config.latent_to_queries:
            q = q + self.latent_to_query(z.astype(self.dtype))[:, None]
        return q

    def _decode(self, query_points: Array, img: Array, lang: Array, text_mask: Array | None,
                z: Array, history: Array, fmap: Array | None = None,
                points: Array | None = None) -> dict[str, Array]:
        b, n, _ = query_points.shape
        lh = self.config.flow_horizon
        z = z.astype(self.dtype)
        if self.config.latent_dim:
            z = self.latent_in(z)
        q = self._query_tokens(query_points, history, z, fmap, points)
        prefix = jnp.concatenate([z[:, None], q], axis=1)
        h = self._run(self.decoder, prefix, img, lang, text_mask)[:, 1:1 + n]
        # The heads predict L steps; the last one has no successor and is dropped (official).
        scale = jax.nn.softplus(self.scale_head(h).astype(jnp.float32))
        scale = scale.reshape(b, n, lh, 1)[:, :, :-1]
        direction = self.direction_head(h).astype(jnp.float32).reshape(b, n, lh, 2)[:, :, :-1]
        norm = jnp.linalg.norm(direction, axis=-1, keepdims=True)
        direction = direction / jnp.maximum(norm, 1e-12)  # torch F.normalize's eps
        flow = reconstruct_flow(query_points.astype(jnp.float32), scale, direction)
        return {"scale": scale, "direction": direction, "flow": flow}

    # --------------------------------------------------------------------------------------
    # Public entry points
    # --------------------------------------------------------------------------------------

    def encode(self, flow: Array, history: Array, text_tokens: Array,
               text_mask: Array | None = None) -> dict[str, Array]:
        """Posterior q(z | flow, observation, language) and the auxiliary reconstructions.

        Args:
          flow: float[B N L 2] ground-truth trajectories (pixels).
          history: float[B T H W 3] observation frames.
          text_tokens: float[B Lt Dl] sentence features.
          text_mask: bool[B Lt], True for real tokens; None = all valid.

        Returns:
          dict with z_mu float[B Z], z_logvar float[B Z] (clamped to [-10, 10]) or, with
          ``latent_codes``, z_logits float[B K],
          img_output float[B P (p q T 3)] (patch pixels in (p q t c) order, the official
          ``_patchify`` layout) and flow_output float[B N L 2].
        """
        dims = shapes.check(flow, "flow", f"B N {self.config.flow_horizon} 2", dtype="float")
        self._check_context(history, text_tokens, text_mask, dims)
        img, lang = self.embed_context(history, text_tokens)
        return self._encode(flow, img, lang, text_mask)

    def decode(self, query_points: Array, history: Array, text_tokens: Array,
               text_mask: Array | None, z: Array) -> dict[str, Array]:
        """Flow proposal p(flow | z, query points, observation, language).

        Args:
          query_points: float[B N 2] start points (pixels).
          history: float[B T H W 3] observation frames.
          text_tokens: float[B Lt Dl] sentence features.
          text_mask: bool[B Lt], True for real tokens; None = all valid.
          z: float[B Z] latent (Z = ``config.z_dim``).

        Returns:
          dict with scale float[B N L-1 1] (>= 0), direction float[B N L-1 2] (unit) and
          flow float[B N L 2] = query point followed by query + cumsum(scale * direction).
        """
        dims = shapes.check(query_points, "query_points", "B N 2", dtype="float")
        dims = shapes.check(z, "z", f"B {self.config.z_dim}", dims, dtype="float")
        self._check_context(history, text_tokens, text_mask, dims)
        img, lang, fmap = self._embed(history, text_tokens, text_mask)
        return self._decode(query_points, img, lang, text_mask, z, history, fmap)

    def __call__(self, flow: Array, history: Array, text_tokens: Array,
                 text_mask: Array | None = None, *,
                 official_std: bool = False) -> dict[str, Array]:
        """Training pass: encode, reparameterised posterior sample, decode from the query
        points ``flow[:, :, 0]``.

        Args:
          flow: float[B N L 2] ground-truth trajectories.
          history: float[B T H W 3] observation frames.
          text_tokens: float[B Lt Dl] sentence features.
          text_mask: bool[B Lt], True for real tokens; None = all valid.
          official_std: sample with the official std exp(exp(0.5 logvar)) (parity only).

        Returns:
          The union of :meth:`encode` and :meth:`decode` outputs plus z float[B Z] (and, with
          ``learned_prior``, prior_mu and prior_logvar float[B Z], or prior_logits float[B K]
          with ``latent_codes``).
        """
        dims = shapes.check(flow, "flow", f"B N {self.config.flow_horizon} 2", dtype="float")
        self._check_context(history, text_tokens, text_mask, dims)
        img, lang, fmap = self._embed(history, text_tokens, text_mask)
        post = self._encode(flow, img, lang, text_mask)
        if self.config.latent_codes:
            z = code_draw(self.make_rng("latent"), post["z_logits"], self.codebook,
                          straight_through=True)
        else:
            z = gaussian_draw(self.make_rng("latent"), post["z_mu"], post["z_logvar"],
                              official_std)
        points = self._prior_points(flow[:, :, 0], history, fmap)
        if self.config.learned_prior:
            post.update(self._prior(img, lang, text_mask, points))
        dec = self._decode(flow[:, :, 0], img, lang, text_mask, z, history, fmap, points)
        return {**post, "z": z, **dec}

    def _prior_points(self, query_points: Array, history: Array,
                      fmap: Array | None) -> Array | None:
        if not self.config.prior_queries:
            return None
        return self._point_tokens(query_points, history, fmap)

    def prior(self, query_points: Array, history: Array, text_tokens: Array,
              text_mask: Array | None = None) -> dict[str, Array]:
        """The prior p(z | observation, language[, query points]) (see :meth:`_prior`).

        Args:
          query_points: float[B N 2] start points (read with ``prior_queries``).
          history: float[B T H W 3] observation frames.
          text_tokens: float[B Lt Dl] sentence features.
          text_mask: bool[B Lt], True for real tokens; None = all valid.

        Returns:
          prior_mu, prior_logvar float[B Z] (float[B K Z] with ``prior_components``) and,
          with codes or components, prior_logits float[B K].
        """
        dims = shapes.check(query_points, "query_points", "B N 2", dtype="float")
        self._check_context(history, text_tokens, text_mask, dims)
        img, lang, fmap = self._embed(history, text_tokens, text_mask)
        return self._prior(img, lang, text_mask,
                           self._prior_points(query_points, history, fmap))

    def latent_mode(self, latent: dict[str, Array]) -> Array:
        """The most likely latent of a posterior (:meth:`encode`) or a prior.

        Args:
          latent: a dict with z_mu or prior_mu float[B Z] (Gaussian), or z_logits or
            prior_logits float[B K] (``latent_codes``).

        Returns:
          float[B Z]: the mean, or the most probable code.
        """
        if "prior_logits" in latent and "prior_mu" in latent:   # a mixture: its top mean
            top = jnp.argmax(latent["prior_logits"], axis=-1)
            return jax.vmap(lambda m, i: m[i])(latent["prior_mu"], top)
        for key in ("z_logits", "prior_logits", "z_mu", "prior_mu"):
            if key in latent:
                if key.endswith("logits"):
                    return self.codebook[jnp.argmax(latent[key], axis=-1)]
                return latent[key]
        raise ValueError(f"latent has none of z_logits, prior_logits, z_mu, prior_mu: "
                         f"{sorted(latent)}")

    def sample(self, query_points: Array, history: Array, text_tokens: Array,
               text_mask: Array | None = None, *,
               official_std: bool = False) -> dict[str, Array]:
        """Draws one flow per example from the prior (N(0, I), or the learned prior).

        Args:
          query_points: float[B N 2] start points.
          history: float[B T H W 3] observation frames.
          text_tokens: float[B Lt Dl] sentence features.
          text_mask: bool[B Lt], True for real tokens; None = all valid.
          official_std: use the official evaluation prior N(0, e^2) (parity only).

        Returns:
          :meth:`decode`'s outputs plus z float[B Z].
        """
        dims = shapes.check(query_points, "query_points", "B N 2", dtype="float")
        self._check_context(history, text_tokens, text_mask, dims)
        img, lang, fmap = self._embed(history, text_tokens, text_mask)
        points = self._prior_points(query_points, history, fmap)
        prior = self._prior(img, lang, text_mask, points)
        if self.config.latent_codes:
            z = code_draw(self.make_rng("latent"), prior["prior_logits"], self.codebook,
                          straight_through=False)
        elif self.config.prior_components:
            z = mixture_draw(self.make_rng("latent"), prior["prior_logits"],
                             prior["prior_mu"], prior["prior_logvar"])
        else:
            z = gaussian_draw(self.make_rng("latent"), prior["prior_mu"], prior["prior_logvar"],
                              official_std)
        return {"z": z, **self._decode(query_points, img, lang, text_mask, z, history, fmap,
                                       points)}
