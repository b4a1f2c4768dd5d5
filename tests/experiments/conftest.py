"""Shared by the trainer tests: one toy clip build at the :runlocal data settings."""

import pytest


@pytest.fixture(scope="session")
def toy_dirs(tmp_path_factory):
    """(train, val) toy clips at the settings every :runlocal config shares (32x32 frames,
    track horizon 4, 8x8 grid, hash text of width 32), built once for the whole session."""
    pytest.importorskip("tensorflow_datasets")
    from experiments.trainers import cvae
    from tests.experiments.helpers import cvae_small

    root = tmp_path_factory.mktemp("runlocal_toy_data")
    config = cvae_small.get_config("runlocal")
    for split in ("train", "val"):
        cvae.build_toy_clips(config, split, root / split)
    return root / "train", root / "val"
