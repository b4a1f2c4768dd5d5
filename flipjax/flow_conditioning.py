"""The dynamics module's flow conditioning: point tracks <-> the DiT's flow units, and the null
condition of classifier-free guidance.

Tracks ``float[B N L 2]`` are pixel positions (u, v), pixel centres at integers, starting at the
current (last history) frame. The official FLIP feeds the DiT raw pixel positions
(``"pixels"``, the default); ``"unit"`` maps the image extent [-0.5, W - 0.5] x
[-0.5, H - 0.5] onto [-1, 1]^2, which makes one model usable at several frame sizes.
:func:`drop_conditions` is the null condition (zero flow, no text tokens). The DiT trainer and
the planner's world model both use these, so the planner feeds the DiT what it trained on.
"""

from __future__ import annotations

import jax.numpy as jnp

from flipjax.typing import Array

FLOW_NORMALIZATIONS = ("pixels", "unit")


def _check_flow(tracks: Array, image_size: tuple[int, int], normalization: str) -> None:
    if normalization not in FLOW_NORMALIZATIONS:
        raise ValueError(f"flow normalization must be one of {FLOW_NORMALIZATIONS}, got "
                         f"{normalization!r}")
    if tracks.ndim != 4 or tracks.shape[-1] != 2:
        raise ValueError(f"tracks must be [B N L 2], got shape {list(tracks.shape)}")
    if len(image_size) != 2 or min(image_size) < 1:
        raise ValueError(f"image_size must be (H, W) > 0, got {image_size}")


def flow_to_model(tracks: Array, image_size: tuple[int, int],
                  normalization: str = "pixels") -> Array:
    """The DiT's flow input from point tracks.

    Args:
      tracks: float[B N L 2] pixel positions (u, v) starting at the current frame.
      image_size: (H, W) of the frames the tracks live in.
      normalization: "pixels" (as the official FLIP: unchanged) or "unit" (the image extent
        mapped onto [-1, 1]: x = (2u + 1) / W - 1, y = (2v + 1) / H - 1).

    Returns:
      float32[B N L 2].
    """
    _check_flow(tracks, image_size, normalization)
    tracks = jnp.asarray(tracks, jnp.float32)
    if normalization == "pixels":
        return tracks
    size = jnp.asarray([image_size[1], image_size[0]], jnp.float32)  # (W, H) for (u, v)
    return (2.0 * tracks + 1.0) / size - 1.0


def flow_from_model(flow: Array, image_size: tuple[int, int],
                    normalization: str = "pixels") -> Array:
    """Inverse of :func:`flow_to_model`: float[B N L 2] model units -> float32 pixels."""
    _check_flow(flow, image_size, normalization)
    flow = jnp.asarray(flow, jnp.float32)
    if normalization == "pixels":
        return flow
    size = jnp.asarray([image_size[1], image_size[0]], jnp.float32)
    return ((flow + 1.0) * size - 1.0) / 2.0


def drop_conditions(flow: Array, text_tokens: Array, text_mask: Array,
                    drop: Array) -> tuple[Array, Array, Array]:
    """Replaces the conditions of the ``drop`` samples by the null condition.

    The null condition (for classifier-free guidance) is an all-zero flow and no text tokens
    (the DiT's sentence encoder then sees only its learned cls token).

    Args:
      flow: float[B N L 2] model flow.
      text_tokens: float[B Lt D].
      text_mask: bool[B Lt].
      drop: bool[B] samples to make unconditional.

    Returns:
      (flow, text_tokens, text_mask) with the dropped samples nulled.
    """
    b = flow.shape[0]
    if drop.shape != (b,) or text_tokens.shape[0] != b or text_mask.shape != \
            text_tokens.shape[:2]:
        raise ValueError(f"drop {list(drop.shape)} must be [B] for flow {list(flow.shape)}, "
                         f"text_tokens {list(text_tokens.shape)}, text_mask "
                         f"{list(text_mask.shape)}")
    return (jnp.where(drop[:, None, None, None], 0.0, flow),
            jnp.where(drop[:, None, None], 0.0, text_tokens),
            text_mask & ~drop[:, None])


__all__ = ["FLOW_NORMALIZATIONS", "drop_conditions", "flow_from_model", "flow_to_model"]
