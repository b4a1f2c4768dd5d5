"""How well the current frame warped along the true tracks predicts the next frames, no network.

    python -m benchmarks.warp_baseline --clips DIR/toy_data/val --out warp.json [--quick]

The DiT's flow warp (``flipjax.models.flow_tokens.warp_latents``) is the anchor a
``flow_residual`` model starts from, so its figures bound what an untrained model samples. On
held-out clips (2 history frames, 3 future frames, every track of each clip) it scores, beside
copying the current frame, the warp on the pixel codec at factors 4 and 2 with each setting of
its two choices: the weight of a moved track's deposit (``front_gain``; 0 is a plain average)
and whether what moved away is filled from its surroundings (``fill_vacated``; otherwise the
current frame fills every hole). Figures: PSNR (dB) per frame capped and averaged as the DiT
trainer's evaluation does it, and over the pixels that change (``flipjax.metrics.changed_psnr``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from data_pipelines.loader import ClipDataset
from experiments.trainers.dit import frame_psnr
from flipjax import codec as codec_lib
from flipjax import metrics
from flipjax.flow_conditioning import flow_to_model
from flipjax.models.flow_tokens import FRONT_GAIN, unit_to_cells, warp_latents

HISTORY, FUTURE = 2, 3
FACTORS = (4, 2)
SETTINGS = ((0.0, False), (0.0, True), (FRONT_GAIN, True), (10.0, True), (50.0, True))


def _figures(pred: np.ndarray, future: np.ndarray, copy: np.ndarray) -> dict[str, float]:
    pred, future, copy = (jnp.asarray(a) for a in (pred, future, copy))
    return {"psnr": float(frame_psnr(pred, future)),
            "moving_psnr": float(metrics.changed_psnr(pred, future, copy))}


def score(history: np.ndarray, future: np.ndarray, tracks: np.ndarray) -> dict[str, Any]:
    """Copy and warp figures of clips.

    Args:
      history: uint8[B 2 H W 3]; future: uint8[B 3 H W 3]; tracks: float[B N 4 2] pixels.

    Returns:
      {"copy": figures, "warps": [{"factor", "front_gain", "fill_vacated", figures}, ...]}.
    """
    size = tuple(history.shape[2:4])
    copy = np.ascontiguousarray(np.broadcast_to(history[:, -1:], future.shape))
    out: dict[str, Any] = {"copy": _figures(copy, future, copy), "warps": []}
    unit = flow_to_model(jnp.asarray(tracks, jnp.float32), size, "unit")
    current = jnp.asarray(history[:, -1].astype(np.float32) / 127.5 - 1.0)
    for factor in FACTORS:
        codec = codec_lib.pixel_codec(factor)
        latents = codec.encode(current)
        cells = unit_to_cells(unit, tuple(latents.shape[1:3]))
        for gain, fill in SETTINGS:
            warped = warp_latents(latents, cells, 1, front_gain=gain,
                                  fill_vacated=fill)[..., :latents.shape[-1]]
            frames = jnp.clip(codec.decode_video(warped), -1.0, 1.0)
            pred = np.asarray(jnp.round((frames + 1.0) * 127.5)).astype(np.uint8)
            out["warps"].append({"factor": factor, "front_gain": gain, "fill_vacated": fill,
                                 **_figures(pred, future, copy)})
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Scores the clips in ``--clips``; writes and returns the JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", required=True, help="A build_clips directory.")
    p.add_argument("--out", required=True, help="JSON file to write.")
    p.add_argument("--clip_count", type=int, default=256,
                   help="Clips scored, evenly spaced over the directory.")
    p.add_argument("--quick", action="store_true", help="32 clips.")
    a = p.parse_args(argv)
    if not Path(a.clips).is_dir():
        raise SystemExit(f"--clips {a.clips}: no such directory")
    try:
        ds = ClipDataset(a.clips, history=HISTORY, future=FUTURE)
    except ValueError as e:   # not a build_clips output: one line, not a traceback
        raise SystemExit(f"--clips {a.clips}: {e}") from None
    count = min(32 if a.quick else int(a.clip_count), len(ds))
    if count < 1:
        raise SystemExit(f"--clips {a.clips}: no clips of {HISTORY} + {FUTURE} frames")
    clips = [ds[int(i)] for i in np.linspace(0, len(ds) - 1, count).astype(int)]
    result = {"clips": count, **score(*(np.stack([c[k] for c in clips])
                                        for k in ("history", "future", "tracks")))}
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"copy {result['copy']['psnr']:.2f} dB, moving {result['copy']['moving_psnr']:.2f}")
    for w in result["warps"]:
        print(f"factor {w['factor']} gain {w['front_gain']:g} fill {w['fill_vacated']}: "
              f"{w['psnr']:.2f} dB, moving {w['moving_psnr']:.2f}")
    return result


if __name__ == "__main__":
    main()
