"""Every model family names its sizes the same way: ``Config.variant(name, **overrides)``."""

import dataclasses

import pytest

from flipjax.models import autoencoder, flow_cvae, value, variants, video_dit

FAMILIES = [
    (flow_cvae.CVAEConfig, flow_cvae.VARIANTS, "CVAE", ("language_dim", 7)),
    (video_dit.VideoDiT, video_dit.VARIANTS, "DiT", ("history", 3)),
    (value.ValueConfig, value.VARIANTS, "value", ("clip_len", 1)),
    (autoencoder.AutoencoderConfig, autoencoder.VARIANTS, "autoencoder", ("latent_channels", 8)),
]
IDS = [f[2] for f in FAMILIES]


def _fields(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)
            if f.name not in ("parent", "name")}


@pytest.mark.parametrize("cls,table,family,override", FAMILIES, ids=IDS)
def test_every_variant_builds_with_its_fields(cls, table, family, override):
    assert "tiny" in table
    for name, fields in table.items():
        built = _fields(cls.variant(name))
        for k, v in fields.items():
            assert built[k] == v, (family, name, k)
        # Names fold case, so "s" and "TINY" are the same variants as "S" and "tiny".
        assert _fields(cls.variant(name.swapcase())) == built


@pytest.mark.parametrize("cls,table,family,override", FAMILIES, ids=IDS)
def test_overrides_win_and_unknown_names_are_refused(cls, table, family, override):
    field, value_ = override
    tiny, other = cls.variant("tiny"), cls.variant("tiny", **{field: value_})
    assert getattr(tiny, field) != value_ and getattr(other, field) == value_
    assert _fields(other) == {**_fields(tiny), field: value_}
    with pytest.raises(ValueError, match=f"unknown {family} variant 'XL'.*tiny"):
        cls.variant("XL")


def test_resolve_does_not_mutate_the_table():
    table = {"S": {"a": 1}}
    assert variants.resolve("x", table, "s", {"a": 2, "b": 3}) == {"a": 2, "b": 3}
    assert table == {"S": {"a": 1}}
