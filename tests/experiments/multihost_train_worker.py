"""The single-process reference of the two-process training test (test_multihost_train.py);
not a test itself.

    python -m tests.experiments.multihost_train_worker WORKDIR CLIPS_DIR STEPS

One process with 2 CPU devices trains the ``cvae.py:S,runlocal`` FlowCVAE exactly as two
processes with one device each do: its loader reads the two processes' data shards
(``make_loader(process_index=p, process_count=2)``) and places shard p on device p, which is
where ``jax.make_array_from_process_local_data`` puts process p's batch in the two-process
run. The model, loss and loop are the CVAE trainer's.
"""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax
import numpy as np
from absl import logging

from experiments.trainers import cvae
from experiments.training import clips, loop
from flipjax import builders
from flipjax.sharding import shard_batch
from tests.experiments.helpers import cvae_small

PROCESSES = 2


class ShardedAsProcesses:
    """Global batches assembled from ``PROCESSES`` per-process loaders, in process order."""

    def __init__(self, parts, mesh):
        self.parts, self.mesh = parts, mesh

    def __next__(self):
        local = [next(p) for p in self.parts]
        batch = {k: np.concatenate([b[k] for b in local]) for k in local[0]}
        return shard_batch(self.mesh, batch)

    def get_state(self):
        return {"parts": [p.get_state() for p in self.parts]}

    def set_state(self, state):
        for p, s in zip(self.parts, state["parts"], strict=True):
            p.set_state(s)


def config_for(clips_dir: str, steps: int):
    """The config both runs use (the test passes the same values as CLI overrides)."""
    c = cvae_small.get_config("runlocal")
    c.data_dir = clips_dir
    c.total_steps = steps
    c.batch_size = 4
    c.log_every = 1
    c.checkpoint_every = 1000
    c.eval_batches = 0
    return c


def main() -> None:
    workdir, clips_dir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    logging.set_verbosity(logging.INFO)  # the loop's console lines, shown when the test fails
    assert jax.device_count() == PROCESSES, jax.devices()
    config = config_for(clips_dir, steps)
    model = builders.build_cvae(config)
    ds = clips.open_clips(config, clips_dir, "train", cvae.clip_spec(config))

    def make_loader(mesh):
        return ShardedAsProcesses(
            [clips.clip_loader(config, ds, None, shuffle=True, augment=True, process_index=p,
                               process_count=PROCESSES) for p in range(PROCESSES)], mesh)

    loop.train(config, workdir, init_fn=cvae.make_init_fn(model, ds.text_tokens),
               loss_fn=cvae.make_loss_fn(model), make_loader=make_loader)


if __name__ == "__main__":
    main()
