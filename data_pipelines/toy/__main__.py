"""``python -m data_pipelines.toy --out DIR [--episodes 64 --val_episodes 8 --seed 0]``.

Produces ``DIR/toy_world/1.0.0`` (read it with ``tfds.builder_from_directory`` or
``--schema=toy`` in ``build_clips``).
"""

from __future__ import annotations

import os

from absl import app, flags

from data_pipelines.toy.rlds import build
from data_pipelines.toy.world import ToyConfig
from flipjax import console

_OUT = flags.DEFINE_string("out", None, "Root directory (writes OUT/toy_world/1.0.0).")
_EPISODES = flags.DEFINE_integer("episodes", 64, "Training episodes.")
_VAL = flags.DEFINE_integer("val_episodes", 8, "Validation episodes.")
_SEED = flags.DEFINE_integer("seed", 0, "Dataset seed.")
_SIZE = flags.DEFINE_integer("image_size", 128, "Rendered image size (square).")
_FAIL = flags.DEFINE_float("failure_fraction", 0.0, "Fraction of deliberately failed scripts.")
_FORMAT = flags.DEFINE_enum("file_format", "tfrecord", ["tfrecord", "array_record"],
                            "RLDS file format.")


def main(argv: list[str]) -> None:
    del argv
    if not _OUT.value:
        raise app.UsageError("--out is required")
    config = ToyConfig(image_size=_SIZE.value, failure_fraction=_FAIL.value)
    path = build(_OUT.value, {"train": _EPISODES.value, "val": _VAL.value}, seed=_SEED.value,
                 config=config, file_format=_FORMAT.value, progress=True)
    print(f"toy world written to {path}")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    console.run(main, "toy", packages=("data_pipelines",))
