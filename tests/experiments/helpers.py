"""Config helpers for the trainer tests."""

# conftest gives 8 CPU devices; the batch must split over the data axis.
BATCH = 8


def runlocal_config(module, toy_dirs, total_steps, **fields):
    """``module``'s :runlocal config on prebuilt toy clips: global batch 8, a log line per
    step, no periodic evaluation or intermediate checkpoint, then ``fields`` set."""
    c = module.get_config("runlocal")
    c.data_dir, c.eval_data_dir = map(str, toy_dirs)
    c.total_steps = total_steps
    c.batch_size = BATCH
    c.log_every = 1
    c.checkpoint_every = 100
    c.eval_every = 0
    for k, v in fields.items():
        c[k] = v
    return c
