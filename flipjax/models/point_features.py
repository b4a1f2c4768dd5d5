"""The action module's point features: a full-resolution feature map of the history frames
that the query points sample (ATM / Track2Act style, a departure from the official CVAE), and
optionally conditioned on the instruction and the pixel position.

Why the instruction reaches the pixels here (``language``, FiLM: Perez et al. 2018): in the
toy world a query token given the instruction only as tokens beside the image learns to
ignore it (swapping the instructions of the clips left every figure unchanged), so no point
knows which block the task names. Modulating every convolution by the instruction lets a
pixel's features say "this is the named block" and the dilated layers carry that to the
points around it; the pixel coordinates (``coords``) do the same for named places.

Shapes: B batch, H W the frame, C input channels, F features, Lt tokens, Dl token width.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from flipjax.models.layers import Dtype
from flipjax.typing import Array


class PointFeatureMap(nn.Module):
    """3x3 convolutions over the stacked history at full resolution: float[B H W C]
    -> float[B H W F]. Convolution i is dilated by ``dilation**i``.

    Attributes:
      features: F.
      layers: convolutions.
      dilation: dilation growth per layer.
      language: FiLM every convolution's output by the instruction (zero-initialised, so an
        untrained map equals the plain one); needs ``text`` at call time.
      coords: two more input channels, the pixel's column and row in [-1, 1].
    """

    features: int
    dtype: Dtype = jnp.float32
    layers: int = 2
    dilation: int = 1
    language: bool = False
    coords: bool = False

    @nn.compact
    def __call__(self, x: Array, text: Array | None = None,
                 text_mask: Array | None = None) -> Array:
        """float[B H W C] (text float[B Lt Dl], text_mask bool[B Lt]) -> float[B H W F]."""
        b, h, w, _ = x.shape
        if self.coords:
            v, u = jnp.meshgrid(jnp.linspace(-1, 1, h), jnp.linspace(-1, 1, w), indexing="ij")
            x = jnp.concatenate([x, jnp.broadcast_to(jnp.stack([u, v], -1).astype(x.dtype),
                                                     (b, h, w, 2))], axis=-1)
        film = None
        if self.language:
            if text is None or text.ndim != 3 or text.shape[0] != b:
                raise ValueError(f"language point features need text [{b} Lt Dl], got "
                                 f"{None if text is None else text.shape}")
            # Per token, then a masked mean: the token's own position term keeps which
            # colour is the moved block and which the reference.
            t = nn.gelu(nn.Dense(self.features, dtype=self.dtype, name="text_in")(
                text.astype(self.dtype)))
            t = nn.Dense(self.features, dtype=self.dtype, name="text_mix")(t)
            m = (jnp.ones(text.shape[:2], t.dtype) if text_mask is None
                 else text_mask.astype(t.dtype))[..., None]
            film = jnp.sum(t * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)   # B F
        for i in range(self.layers):
            x = nn.Conv(self.features, (3, 3), padding="SAME", dtype=self.dtype,
                        kernel_dilation=self.dilation**i, name=f"conv_{i}")(x)
            if film is not None:
                gb = nn.Dense(2 * self.features, dtype=self.dtype, name=f"film_{i}",
                              kernel_init=nn.initializers.zeros)(nn.gelu(film))
                x = x * (1.0 + gb[:, None, None, :self.features]) + gb[:, None, None,
                                                                       self.features:]
            x = nn.gelu(x)
        return x
