"""Model figures: parameters, forward FLOPs per sample, CPU forward and train-step times.

    python -m benchmarks.models --out models.json [--quick]

- Parameters of the CVAE, DiT (S/B/L), SD-VAE and value models from ``jax.eval_shape`` (no
  allocation; fixed sin-cos tables are not parameters).
- Forward FLOPs per sample from XLA's cost analysis of the compiled programs, at FLIP's shapes:
  batch 2, 529 points, 24 language tokens of width 4096, 128x128 frames (16x16x4 latents),
  CVAE history 16, DiT 4 history + 15 future frames, flow horizon 16. For the DiT the same run
  compiles ``flow_attention="concat"``, the official computation that copies the 529 flow
  tokens into every frame and patch group, and reports the ratio.
  Target: DiT-S forward <= 80 GFLOP per sample (the official costs about 414).
- CPU wall time of the jitted forward and of a full AdamW train step (loss, gradients,
  update) for the S models at batch 2, compile time apart. Absolute times are from this CPU
  only; accelerator figures need a GPU run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.report import write_result
from flipjax.models import diffusion
from flipjax.models.autoencoder import AutoencoderConfig, AutoencoderKL, num_parameters
from flipjax.models.cvae_loss import cvae_loss
from flipjax.models.flow_cvae import CVAEConfig, FlowCVAE
from flipjax.models.value import ValueConfig, ValueModel
from flipjax.models.video_dit import VideoDiT

TARGETS = {"dit_s_forward_gflop_per_sample_max": 80.0}
B, N, LT, DL = 2, 529, 24, 4096


def _count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _random_params(abstract, seed: int = 0):
    """Parameters of the right shapes without compiling init (which is slow on CPU)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.02, s.shape).astype(s.dtype)),
                        nn.meta.unbox(abstract))


def _flops(fn, *args) -> tuple[float, float, object]:
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    secs = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", float("nan"))), secs, compiled


def _time(compiled, *args, repeats: int = 3) -> float:
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _dit_inputs(key, m):
    ks = jax.random.split(key, 4)
    x = jax.random.normal(ks[0], (B, m.num_frames, *m.latent_size, m.in_channels))
    t = jax.random.randint(ks[1], (B,), 0, 1000)
    flow = jax.random.uniform(ks[2], (B, N, m.flow_horizon, 2)) * 128
    text = jax.random.normal(ks[3], (B, LT, DL))
    return x, t, flow, text, jnp.ones((B, LT), bool)


def _dit(size: str, timing: bool, key) -> dict:
    out = {}
    for mode in ("shared", "concat"):
        m = VideoDiT.variant(size, flow_attention=mode)
        args = _dit_inputs(key, m)
        abstract = jax.eval_shape(m.init, key, *args)
        params = _random_params(abstract)
        flops, compile_s, fwd = _flops(lambda p, *a, m=m: m.apply(p, *a), params, *args)
        rec = {"params": _count(nn.meta.unbox(abstract)["params"]),
               "forward_gflop_per_sample": flops / B / 1e9, "compile_s": compile_s}
        if timing:
            rec["forward_s_batch2"] = _time(fwd, params, *args)
        if timing and mode == "shared":
            sched = diffusion.linear_schedule(1000)
            opt = optax.adamw(1e-4, weight_decay=0.0)

            def step(p, o, x, t, flow, text, mask, noise, m=m, opt=opt, sched=sched):
                def loss_fn(p):
                    cond = m.apply(p, flow, text, mask, method=type(m).encode_conditions)
                    fn = lambda xt, tt: m.apply(p, xt, tt, cond, method=type(m).denoise)
                    return diffusion.model_losses(fn, sched, x, t, noise,
                                                  history=m.history)["loss"].mean()
                loss, g = jax.value_and_grad(loss_fn)(p)
                upd, o = opt.update(g, o, p)
                return optax.apply_updates(p, upd), o, loss

            o = opt.init(params)
            noise = jax.random.normal(key, args[0].shape)
            _, c_s, compiled = _flops(step, params, o, *args, noise)
            rec["train_step_compile_s"] = c_s
            rec["train_step_s_batch2"] = _time(compiled, params, o, *args, noise)
        out[mode] = rec
    out["concat_over_shared_flops"] = (out["concat"]["forward_gflop_per_sample"]
                                       / out["shared"]["forward_gflop_per_sample"])
    if timing:
        out["concat_over_shared_cpu_forward_time"] = (out["concat"]["forward_s_batch2"]
                                                      / out["shared"]["forward_s_batch2"])
    return out


def _cvae(size: str, timing: bool, key) -> dict:
    cfg = CVAEConfig.variant(size)
    m = FlowCVAE(cfg)
    ks = jax.random.split(key, 3)
    flow = jax.random.uniform(ks[0], (B, N, cfg.flow_horizon, 2)) * 128
    hist = jax.random.uniform(ks[1], (B, cfg.history, *cfg.img_size, 3)) * 2 - 1
    text = jax.random.normal(ks[2], (B, LT, cfg.language_dim))
    mask = jnp.ones((B, LT), bool)
    abstract = jax.eval_shape(lambda k: m.init({"params": k, "latent": k}, flow, hist, text,
                                               mask), key)
    params = _random_params(abstract)
    fwd = lambda p, *a: m.apply(p, *a, rngs={"latent": key})
    flops, compile_s, compiled = _flops(fwd, params, flow, hist, text, mask)
    rec = {"params": _count(nn.meta.unbox(abstract)["params"]),
           "forward_gflop_per_sample": flops / B / 1e9, "compile_s": compile_s}
    if timing:
        rec["forward_s_batch2"] = _time(compiled, params, flow, hist, text, mask)
        opt = optax.adamw(1e-4, weight_decay=0.0)

        def step(p, o, flow, hist, text, mask):
            def loss_fn(p):
                outs = m.apply(p, flow, hist, text, mask, rngs={"latent": key})
                return cvae_loss(outs, flow, hist, cfg.patch)["loss"]
            loss, g = jax.value_and_grad(loss_fn)(p)
            upd, o = opt.update(g, o, p)
            return optax.apply_updates(p, upd), o, loss

        o = opt.init(params)
        _, c_s, compiled = _flops(step, params, o, flow, hist, text, mask)
        rec["train_step_compile_s"] = c_s
        rec["train_step_s_batch2"] = _time(compiled, params, o, flow, hist, text, mask)
    return rec


def _vae(key) -> dict:
    cfg = AutoencoderConfig.variant("sd-vae-ft-ema")
    m = AutoencoderKL(cfg)
    x = jnp.zeros((1, 128, 128, 3))
    abstract = jax.eval_shape(m.init, key, x)
    params = _random_params(abstract)
    enc, _, _ = _flops(lambda p, x: m.apply(p, x, method=AutoencoderKL.encode), params, x)
    z = jnp.zeros((1, 16, 16, cfg.latent_channels))
    dec, _, _ = _flops(lambda p, z: m.apply(p, z, method=AutoencoderKL.decode), params, z)
    return {"params": num_parameters(cfg), "encode_gflop_per_128px_frame": enc / 1e9,
            "decode_gflop_per_128px_frame": dec / 1e9}


def _value(key) -> dict:
    cfg = ValueConfig.variant("clip-b16")
    m = ValueModel(cfg)
    frames = jnp.zeros((1, cfg.clip_len, cfg.image_size, cfg.image_size, 3))
    abstract = jax.eval_shape(lambda k: m.init(k, frames, method=ValueModel.embed_clip), key)
    return {"config": "clip-b16", "clip_len": cfg.clip_len,
            "image_tower_params": _count(nn.meta.unbox(abstract)["params"])}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true",
                        help="S models' FLOPs and parameter counts only, no timing")
    args = parser.parse_args(argv)
    key = jax.random.PRNGKey(0)
    res: dict = {"quick": args.quick, "shapes": {"batch": B, "points": N, "text_tokens": LT,
                                                 "text_dim": DL, "frames": "128x128",
                                                 "latents": "16x16x4"},
                 "environment": {"jax": jax.__version__, "backend": jax.default_backend(),
                                 "devices": [str(d) for d in jax.devices()],
                                 "cpu_count": os.cpu_count(), "platform": platform.platform()},
                 "targets": TARGETS}
    print("DiT-S ...", flush=True)
    res["dit"] = {"S": _dit("S", not args.quick, key)}
    print(json.dumps(res["dit"]["S"], indent=1), flush=True)
    print("CVAE-S ...", flush=True)
    res["cvae"] = {"S": _cvae("S", not args.quick, key)}
    print(json.dumps(res["cvae"]["S"], indent=1), flush=True)
    res["param_counts"] = {}
    for size in ("S", "B", "L"):
        m = VideoDiT.variant(size)
        a = jax.eval_shape(m.init, key, *_dit_inputs(key, m))
        cfg = CVAEConfig.variant(size)
        c = FlowCVAE(cfg)
        ca = jax.eval_shape(lambda k, c=c, cfg=cfg: c.init(
            {"params": k, "latent": k}, jnp.zeros((1, 1, cfg.flow_horizon, 2)),
            jnp.zeros((1, cfg.history, *cfg.img_size, 3)), jnp.zeros((1, 1, cfg.language_dim)),
            jnp.ones((1, 1), bool)), key)
        res["param_counts"][size] = {"dit": _count(nn.meta.unbox(a)["params"]),
                                     "cvae": _count(nn.meta.unbox(ca)["params"])}
    print(json.dumps(res["param_counts"]), flush=True)
    if not args.quick:
        print("SD-VAE and value model ...", flush=True)
        res["sd_vae"] = _vae(key)
        res["value"] = _value(key)
    gf = res["dit"]["S"]["shared"]["forward_gflop_per_sample"]
    res["targets_met"] = {"dit_s_forward_gflop_per_sample": gf
                          <= TARGETS["dit_s_forward_gflop_per_sample_max"]}
    write_result(args.out, res)
    return res


if __name__ == "__main__":
    from flipjax import console

    with console.user_errors("benchmarks.models"):
        main()
