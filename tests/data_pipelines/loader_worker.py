"""One process of a two-process loader run (see test_multiprocess.py); not a test itself.

    python -m tests.data_pipelines.loader_worker PROCESS_ID PORT CLIPS_DIR OUT_JSON
"""

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.pop("XLA_FLAGS", None)  # one CPU device per process: two processes, two devices

import jax


def main() -> None:
    pid, port, clips, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                               process_id=pid)
    from data_pipelines.loader import make_loader
    from flipjax.sharding import create_mesh

    mesh = create_mesh()  # spans both processes' devices
    loader = make_loader(clips, 4, mesh=mesh, seed=0, num_epochs=1)
    clips_seen, shapes = [], set()
    for _ in range(loader.steps_per_epoch):
        batch = next(loader)
        shapes.add(tuple(batch["history"].shape))
        (ep,) = [s.data for s in batch["episode_id"].addressable_shards]
        (fr,) = [s.data for s in batch["frame_index"].addressable_shards]
        clips_seen += [[int(e), int(f)] for e, f in zip(ep, fr, strict=True)]
    with open(out, "w") as f:
        json.dump({"process_index": jax.process_index(), "process_count": jax.process_count(),
                   "devices": len(jax.devices()), "steps": loader.steps_per_epoch,
                   "global_shapes": sorted(shapes), "clips": clips_seen}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
