"""The DiT's view of point tracks: flow tokens for its flow attention and the forward splat of
the current frame's tokens along the tracks (:class:`flipjax.models.video_dit.VideoDiT`).

Shapes (einops): B batch, N tracks, Lf points per track, P = hp wp patches, D width.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from flipjax.models.layers import dense

Array = jax.Array
Dtype = Any


class FlowEmbedder(nn.Module):
    """Whole trajectories float[B N Lf 2] -> one token per point float[B N D].

    ``"mlp"`` (official): a 3-layer GELU MLP over the flattened (t xy) trajectory. Attention
    from a video token to such a token has no easy way to prefer tracks near its own patch.

    ``"positional"`` (a departure): the MLP reads the track's displacements from its start, in
    patch units, and the token adds the video tokens' own sin-cos position embedding averaged
    over the track's positions (flows in unit coordinates, [-1, 1] over the image). The dot
    product of two sin-cos embeddings peaks where the positions agree, so a patch's query can
    pick out the tracks that pass through it from the first step.
    """

    hidden: int
    dtype: Dtype = jnp.float32
    embedding: str = "mlp"
    grid: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, flow: Array) -> Array:
        flow = flow.astype(jnp.float32)
        if self.embedding == "positional":
            cells = unit_to_cells(flow, self.grid)
            pos = jnp.mean(sincos_2d_at(self.hidden, cells), axis=2)
            x = rearrange(cells - cells[:, :, :1], "b n t d -> b n (t d)")
        else:
            x = rearrange(flow, "b n t d -> b n (t d)")
        x = x.astype(self.dtype)
        gelu = functools.partial(nn.gelu, approximate=False)  # torch nn.GELU() default
        x = gelu(dense(self.hidden, (None, "embed"), dtype=self.dtype, name="fc1")(x))
        x = gelu(dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, name="fc2")(x))
        x = dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, name="fc3")(x)
        if self.embedding == "positional":
            x = x + pos.astype(self.dtype)
        return x


def unit_to_cells(flow: Array, grid: tuple[int, int]) -> Array:
    """Unit coordinates float[... 2] ([-1, 1] over the image) -> patch-grid (col, row), patch
    centres at integers."""
    hp, wp = grid
    return (flow + 1.0) * 0.5 * jnp.asarray([wp, hp], jnp.float32) - 0.5


def _hat_weights(cells: Array, grid: tuple[int, int]) -> Array:
    """float[B N P] bilinear weights of positions float[B N 2] on the row-major patch grid."""
    hp, wp = grid
    wc = jax.nn.relu(1.0 - jnp.abs(cells[..., 0:1] - jnp.arange(wp, dtype=jnp.float32)))
    wr = jax.nn.relu(1.0 - jnp.abs(cells[..., 1:2] - jnp.arange(hp, dtype=jnp.float32)))
    return (wr[..., :, None] * wc[..., None, :]).reshape(*cells.shape[:-1], hp * wp)


def splat_along_tracks(current: Array, cells: Array, grid: tuple[int, int]
                       ) -> tuple[Array, Array]:
    """Carries the current frame's tokens along the tracks (a forward warp of token features).

    Each track reads the current tokens bilinearly at its start and deposits them bilinearly
    where it is at every later step; a patch's value is the weighted mean of what reaches it.

    Args:
      current: float[B P D] the current frame's tokens, P = hp * wp row-major.
      cells: float[B N Lf 2] tracks in patch-grid coordinates (col, row).
      grid: (hp, wp).

    Returns:
      (moved float[B Lf-1 P D], weight float[B Lf-1 P 1]): per later step, the mean deposited
      tokens and the total bilinear weight that reached each patch (0 where no track lands).
    """
    start = jnp.einsum("bnp,bpd->bnd", _hat_weights(cells[:, :, 0], grid),
                       current.astype(jnp.float32))
    later = _hat_weights(jnp.moveaxis(cells[:, :, 1:], 2, 1), grid)   # B Lf-1 N P
    weight = jnp.sum(later, axis=2)[..., None]
    moved = jnp.einsum("bknp,bnd->bkpd", later, start) / jnp.maximum(weight, 1e-6)
    return moved, weight


# A moved track's deposit weighs 1 + FRONT_GAIN times a still one's (reached at one latent cell
# of motion): what moves is on top (the gripper over the block over the table), so it shows
# where it lands instead of blending half-transparent into the background. Not more: a track
# on an object's edge also carries the background of its cell, which a large gain stamps over
# the destination's surroundings. Toy world, 256 held-out clips, pixel codec factor 2 (copy
# 35.18 dB, moving pixels 16.26): gain 0 / 3 / 10 / 50 give 36.42 / 36.43 / 36.03 / 35.15 dB
# and 18.39 / 18.76 / 18.72 / 18.50 on moving pixels (docs/LEARNING.md).
FRONT_GAIN = 3.0
# Push-pull falls back to the plain mean where no cell keeps any weight (a whole-frame move).
_PLAIN = 1e-4


def _push_pull(values: Array, weight: Array) -> Array:
    """Fills the low-weight cells of float[B h w C] from ever coarser weighted averages.

    Args:
      values: float[B h w C].
      weight: float[B h w 1] in [0, 1]: how much of each cell's value to keep.

    Returns:
      float[B h w C]: ``values * weight + coarse * (1 - weight)``, where ``coarse`` is the
      same fill one level up (2x2 weighted means), down to a single cell.
    """
    b, h, w, c = values.shape
    if h == 1 and w == 1:
        return values
    ph, pw = h % 2, w % 2
    pad = ((0, 0), (0, ph), (0, pw), (0, 0))
    num = jnp.pad(values * weight, pad).reshape(b, (h + ph) // 2, 2, (w + pw) // 2, 2, c)
    den = jnp.pad(weight, pad).reshape(b, (h + ph) // 2, 2, (w + pw) // 2, 2, 1)
    raw = jnp.pad(values, pad).reshape(b, (h + ph) // 2, 2, (w + pw) // 2, 2, c)
    cnt = jnp.pad(jnp.ones_like(weight), pad).reshape(b, (h + ph) // 2, 2, (w + pw) // 2, 2, 1)
    num = num.sum(axis=(2, 4)) + _PLAIN * raw.sum(axis=(2, 4))
    den = den.sum(axis=(2, 4)) + _PLAIN * cnt.sum(axis=(2, 4))
    coarse = _push_pull(num / jnp.maximum(den, 1e-6), jnp.minimum(den, 1.0))
    up = jnp.repeat(jnp.repeat(coarse, 2, axis=1), 2, axis=2)[:, :h, :w]
    return values * weight + up * (1.0 - weight)


def warp_latents(current: Array, cells: Array, patch: int, *, front_gain: float = FRONT_GAIN,
                 fill_vacated: bool = True) -> Array:
    """Forward-warps the current frame's latents along the tracks, one frame per later step.

    Each track reads the current latents bilinearly at its start and deposits them bilinearly
    where it is at every later step; a moving track's deposit outweighs a still one's
    (:data:`FRONT_GAIN`), so what moves covers what it lands on. Where the tracks deposit
    less than a full bilinear weight (disocclusions, sparse tracks) the current frame fills
    in, except for the share of each cell whose content moved away, which is filled from its
    surroundings (:func:`_push_pull`): a moved object leaves background behind, not a copy
    of itself. A warp of still tracks, one at each latent cell's centre, is the current frame
    itself; tracks off the centres read their cells bilinearly, which blurs.

    Args:
      current: float[B h w C] the current frame's latents.
      cells: float[B N Lf 2] tracks on the patch grid (col, row), as
        :func:`unit_to_cells` with the token grid (h / patch, w / patch).
      patch: the DiT's patch size.
      front_gain: how much more a moved track's deposit weighs (0: a plain average).
      fill_vacated: fill what moved away from its surroundings (False: the current frame
        fills every hole, leaving a copy of a moved object behind).

    Returns:
      float[B Lf-1 h w (C+1)]: the warped latents and, last, the deposited weight (<= 1).
    """
    b, h, w, c = current.shape
    fine = (cells + 0.5) * patch - 0.5     # the same positions on the latent grid
    flat = current.reshape(b, h * w, c).astype(jnp.float32)
    start = _hat_weights(fine[:, :, 0], (h, w))                           # B N P
    read = jnp.einsum("bnp,bpd->bnd", start, flat)
    # How far each track has gone, in latent cells, capped at one: 0 still, 1 moved away.
    gone = jnp.minimum(jnp.linalg.norm(fine[:, :, 1:] - fine[:, :, :1], axis=-1), 1.0)
    gone = jnp.moveaxis(gone, 2, 1)                                       # B K N
    later = _hat_weights(jnp.moveaxis(fine[:, :, 1:], 2, 1), (h, w))      # B K N P
    front = later * (1.0 + front_gain * gone)[..., None]
    moved = jnp.einsum("bknp,bnd->bkpd", front, read) / jnp.maximum(
        jnp.sum(front, axis=2)[..., None], 1e-6)
    cover = jnp.minimum(jnp.sum(later, axis=2)[..., None], 1.0)           # B K P 1
    # The share of each cell's current content that has left it by step k.
    vacated = jnp.einsum("bnp,bkn->bkp", start, gone) / jnp.maximum(
        jnp.sum(start, axis=1)[:, None], 1e-6)
    k = moved.shape[1]
    stay = jnp.clip(1.0 - vacated, 0.0, 1.0).reshape(b * k, h, w, 1)
    if not fill_vacated:
        stay = jnp.ones_like(stay)
    background = _push_pull(jnp.broadcast_to(current.astype(jnp.float32)[:, None],
                                             (b, k, h, w, c)).reshape(b * k, h, w, c), stay)
    filled = moved * cover + background.reshape(b, k, h * w, c) * (1.0 - cover)
    out = jnp.concatenate([filled, cover], axis=-1)
    return out.reshape(b, -1, h, w, c + 1)


def motion_mask(cells: Array, patch: int, size: tuple[int, int], radius: int = 1) -> Array:
    """Where the tracks say something changes: the latent cells a moving track leaves or
    reaches, grown by ``radius`` cells (edges, the background a move uncovers).

    Args:
      cells: float[B N Lf 2] tracks on the patch grid (col, row), as for :func:`warp_latents`.
      patch: the DiT's patch size.
      size: (h, w) of the latent grid.
      radius: cells added around every touched cell. Toy world, step 666: 0 scores the
        frames 36.02 dB against 35.93 for 1, but the moving pixels 18.82 against 19.14, below
        the warp's 19.01 (the correction cannot reach the edges of what moves).

    Returns:
      float32[B Lf-1 h w 1] in [0, 1]: 0 where no track moved near the cell by that step (a
      still track weighs 0, one moved a latent cell or more weighs 1).
    """
    h, w = size
    b = cells.shape[0]
    fine = (cells + 0.5) * patch - 0.5
    gone = jnp.minimum(jnp.linalg.norm(fine[:, :, 1:] - fine[:, :, :1], axis=-1), 1.0)
    start = _hat_weights(fine[:, :, 0], (h, w))                           # B N P
    later = _hat_weights(jnp.moveaxis(fine[:, :, 1:], 2, 1), (h, w))      # B K N P
    touched = jnp.einsum("bnp,bnk->bkp", start, gone) + jnp.einsum(
        "bknp,bkn->bkp", later, jnp.moveaxis(gone, 2, 1))
    k = touched.shape[1]
    # A track between four cells gives each a quarter of its weight: x4 so that one track
    # that moved a cell opens all four.
    grown = jax.lax.reduce_window(jnp.minimum(4.0 * touched, 1.0).reshape(b, k, h, w), 0.0,
                                  jax.lax.max, (1, 1, 2 * radius + 1, 2 * radius + 1),
                                  (1, 1, 1, 1), "SAME")
    return grown[..., None]


def sincos_2d_at(dim: int, cells: Array) -> Array:
    """float32[... dim]: :func:`sincos_2d` at continuous (col, row) positions float[... 2]."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (jnp.arange(quarter, dtype=jnp.float32) / quarter)

    def axis(p: Array) -> Array:
        angles = p[..., None] * omega
        return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return jnp.concatenate([axis(cells[..., 0]), axis(cells[..., 1])], axis=-1)
