"""Official FLIP and diffusers weights in flipjax, and adapters in the official tensor layouts.

One import for parity checks and for starting from released checkpoints. State dicts are
``name -> numpy array`` (load the ``.pth`` / ``.safetensors`` file yourself; nothing here
downloads or needs torch)::

    cvae, variables = official.flip_cvae_from_torch(state_dict, config)
    official.flip_cvae_encode(cvae, variables, gt_flow, obs_history_nchw, sentence)
    official.flip_cvae_decode(cvae, variables, query_points, obs_history_nchw, sentence, z)
    dit, variables = official.flip_dit_from_torch(state_dict, config)
    official.flip_dit_apply(dit, variables, x_btchw, t, flow, sentence)
    official.flip_dit_loss(dit, variables, x_btchw, t, flow, sentence, noise, history_len)
    vae, variables = official.sd_vae_from_diffusers(state_dict, config)
    official.sd_vae_encode(vae, variables, x_nchw)
    official.sd_vae_decode(vae, variables, z_nchw)

Where flipjax deliberately differs from the official code (the CVAE's doubled exponential on
the posterior std, the sampler's timestep labels, replicated flow tokens), the converted
modules compute what the official *architecture* computes; the official defects are reachable
only through explicit arguments (``official_std=True`` when sampling the CVAE latent or
computing its KL) for parity checks.
"""

from flipjax.models.convert_flip_cvae import (
    flip_cvae_decode,
    flip_cvae_encode,
    flip_cvae_from_torch,
    official_text_mask,
)
from flipjax.models.convert_flip_dit import flip_dit_apply, flip_dit_from_torch, flip_dit_loss
from flipjax.models.convert_sd_vae import (
    sd_vae_decode,
    sd_vae_encode,
    sd_vae_from_diffusers,
    sd_vae_to_diffusers,
)

__all__ = [
    "flip_cvae_decode",
    "flip_cvae_encode",
    "flip_cvae_from_torch",
    "flip_dit_apply",
    "flip_dit_from_torch",
    "flip_dit_loss",
    "official_text_mask",
    "sd_vae_decode",
    "sd_vae_encode",
    "sd_vae_from_diffusers",
    "sd_vae_to_diffusers",
]
