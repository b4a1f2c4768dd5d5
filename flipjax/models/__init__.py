"""Linen modules of FLIP, with the official weights' converters.

``layers`` (shared blocks), ``flow_cvae`` + ``cvae_loss`` (action module), ``video_dit``
(dynamics module), ``diffusion`` + ``sampling`` (pure functions), ``autoencoder`` (SD-VAE frame
codec), ``value`` + ``value_loss`` (LIV-style value module), ``official`` (official FLIP and
diffusers state dicts in, official tensor layouts out).
"""
