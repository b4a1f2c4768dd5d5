"""The autoencoder's config file: round trip, and damaged files named in one error."""

import jax.numpy as jnp
import pytest

from flipjax.models import autoencoder_json
from flipjax.models.autoencoder import AutoencoderConfig


def test_round_trip_and_overrides(tmp_path):
    cfg = AutoencoderConfig(block_out_channels=(32, 64), dtype=jnp.bfloat16)
    path = autoencoder_json.write(cfg, tmp_path)
    assert path.name == autoencoder_json.CONFIG_FILE
    assert autoencoder_json.read(tmp_path) == cfg
    assert autoencoder_json.read(path, dtype=jnp.float32).dtype == jnp.float32


@pytest.mark.parametrize("text,match", [
    ("{not json", r"autoencoder_config.json is not valid JSON"),
    ("[1, 2]", r"autoencoder_config.json does not hold a JSON object"),
    ('{"dtype": "int8"}', r"unknown dtype 'int8'"),
    ('{"widths": [1]}', r"autoencoder_config.json has unknown fields \['widths'\]"),
])
def test_damaged_files_are_named(tmp_path, text, match):
    (tmp_path / autoencoder_json.CONFIG_FILE).write_text(text)
    with pytest.raises(ValueError, match=match):
        autoencoder_json.read(tmp_path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="not a flipjax autoencoder workdir"):
        autoencoder_json.read(tmp_path / "nowhere")
