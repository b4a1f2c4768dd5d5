"""Config helpers for the trainer tests."""

import dataclasses
import importlib

# conftest gives 8 CPU devices; the batch must split over the data axis.
BATCH = 8


@dataclasses.dataclass(frozen=True)
class Variant:
    """``experiments/configs/<family>.py:<variant>``: ``get_config("runlocal")`` appends the
    option as ``--config=...:<variant>,runlocal`` does."""

    family: str
    variant: str

    def get_config(self, arg: str | None = None):
        module = importlib.import_module(f"experiments.configs.{self.family}")
        return module.get_config(",".join(p for p in (self.variant, arg) if p))

    @property
    def path(self) -> str:
        """The ``--config`` value of this variant."""
        return f"experiments/configs/{self.family}.py:{self.variant}"


cvae_small, cvae_base, cvae_large = (Variant("cvae", s) for s in "SBL")
dit_small, dit_base, dit_large = (Variant("dit", s) for s in "SBL")
value_clip, value_liv = Variant("value", "clip"), Variant("value", "liv")
autoencoder_sd, autoencoder_finetune = Variant("autoencoder", "sd"), Variant("autoencoder",
                                                                           "finetune")


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
