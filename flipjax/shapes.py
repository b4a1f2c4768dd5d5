"""Shape checks for public boundaries, in einops-style notation.

Every public function states its array shapes as a pattern such as ``"B T N 2"`` and checks
its inputs on entry with :func:`check`, so a wrong shape fails loudly (naming the argument, the
expected pattern and the received shape) instead of broadcasting into a silent wrong answer.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

Dims = dict[str, int]


def check(
    x: Any,
    name: str,
    pattern: str,
    dims: Dims | None = None,
    *,
    dtype: str | None = None,
) -> Dims:
    """Checks ``x`` against an einops-style shape ``pattern`` and binds its axis letters.

    Args:
      x: array-like (anything with ``.shape`` and ``.dtype``).
      name: argument name used in the error message.
      pattern: space-separated axes; a letter binds (and must then agree everywhere it
        appears in ``dims``), an integer must match exactly, ``...`` matches any leading axes.
      dims: axis sizes bound so far; updated copy is returned.
      dtype: ``"float"``, ``"bool"``, ``"int"`` or None to skip the dtype check.

    Returns:
      The axis bindings, ``dims`` extended with the letters bound by ``x``.

    Raises:
      ValueError: naming ``name``, the pattern, the received shape and any conflicting axis.
    """
    dims = dict(dims or {})
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"{name}: expected an array of shape [{pattern}], got {type(x).__name__}")
    shape = tuple(x.shape)
    tokens = pattern.split()
    if tokens and tokens[0] == "...":
        tokens = tokens[1:]
        if len(shape) < len(tokens):
            raise ValueError(f"{name}: expected shape [{pattern}], got {list(shape)}")
        shape = shape[len(shape) - len(tokens):]
    elif len(shape) != len(tokens):
        raise ValueError(
            f"{name}: expected shape [{pattern}] ({len(tokens)} axes), got {list(x.shape)}"
        )
    for tok, size in zip(tokens, shape, strict=True):
        if tok.isdigit():
            if size != int(tok):
                raise ValueError(f"{name}: expected shape [{pattern}], got {list(x.shape)}")
        elif tok in dims and dims[tok] != size:
            raise ValueError(
                f"{name}: expected shape [{pattern}] with {tok}={dims[tok]} from the other "
                f"arguments, got {list(x.shape)}"
            )
        else:
            dims[tok] = size
    if dtype is not None:
        kinds = {
            "float": jnp.issubdtype(x.dtype, jnp.floating),
            "bool": x.dtype == np.bool_,
            "int": jnp.issubdtype(x.dtype, jnp.integer),
        }
        if dtype not in kinds:
            raise ValueError(f"unknown dtype class {dtype!r}")
        if not kinds[dtype]:
            raise ValueError(f"{name}: expected a {dtype} array, got dtype {x.dtype}")
    return dims


def check_images(x: Any, name: str, channels: int, multiple: int = 1) -> None:
    """Checks an NHWC image or latent batch: ``[B H W channels]`` with H and W multiples of
    ``multiple`` (a codec's downsampling factor).

    Raises:
      ValueError: naming ``name``, the expected layout and the received shape.
    """
    shape = list(x.shape)
    if len(shape) != 4 or shape[-1] != channels:
        raise ValueError(f"{name} must be [B H W {channels}] (NHWC), got shape {shape}")
    if shape[1] % multiple or shape[2] % multiple:
        raise ValueError(f"{name} of shape {shape}: {shape[1]}x{shape[2]} height and width "
                         f"must be multiples of {multiple}")


def as_array(x: Any, name: str) -> jnp.ndarray | np.ndarray:
    """Returns ``x`` unchanged if it is an array, else converts it (lists, tuples, scalars)."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return x
    try:
        return np.asarray(x)
    except Exception as e:
        raise ValueError(f"{name}: cannot convert {type(x).__name__} to an array: {e}") from e
