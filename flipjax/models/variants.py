"""Named variants of a model family's config, in big_vision's ``decode_variant`` style.

Every model family has one config dataclass (:class:`~flipjax.models.flow_cvae.CVAEConfig`,
:class:`~flipjax.models.video_dit.VideoDiT` whose Linen fields are its config,
:class:`~flipjax.models.value.ValueConfig`,
:class:`~flipjax.models.autoencoder.AutoencoderConfig`), a ``VARIANTS`` table of field
values per name next to it, and a ``variant(name, **overrides)`` classmethod that goes
through :func:`resolve`. So a size is spelled the same way everywhere: ``"S"``, ``"B"``,
``"L"`` or ``"tiny"`` (tests), plus the family's own names (``"clip-b16"``, ``"sd-vae-ft-ema"``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def resolve(family: str, table: Mapping[str, Mapping[str, Any]], name: str,
            overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of variant ``name`` of ``table`` with ``overrides`` applied on top.

    Names match case-insensitively (``"s"`` is ``"S"``, ``"TINY"`` is ``"tiny"``).

    Args:
      family: what the table configures, for the error message ("CVAE", "DiT", ...).
      table: variant name -> config fields.
      name: the variant asked for.
      overrides: fields that replace the variant's.

    Returns:
      A new dict of config fields.

    Raises:
      ValueError: ``name`` is not a variant of ``table``.
    """
    by_folded = {k.casefold(): k for k in table}
    key = by_folded.get(str(name).casefold())
    if key is None:
        raise ValueError(f"unknown {family} variant {name!r}; expected one of {list(table)}")
    return {**table[key], **overrides}
