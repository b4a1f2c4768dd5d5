"""What the two learnability-ladder benchmarks share: their command line and optimiser."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from data_pipelines.toy import ladder


def parse_set(items: list[str]) -> dict[str, Any]:
    """``--set FIELD=VALUE`` items as a dict; values are JSON (``true``, ``1e-2``, ``[1, 2]``)
    or, when not JSON, the plain string."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE")
        try:
            out[name] = json.loads(value.lower() if value in ("True", "False") else value)
        except json.JSONDecodeError:
            out[name] = value
    return out


def parser(doc: str, presets: dict[str, Any], *, rungs: str, batch: int, eval_scenes: int,
           set_help: str) -> argparse.ArgumentParser:
    """The ladder command line (``--out --quick --rungs --model --set --steps --batch --lr
    --train_scenes --eval_scenes --seed --block --step``)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="300 steps, fewer rungs")
    p.add_argument("--rungs", default=rungs)
    p.add_argument("--model", default="flipjax", choices=sorted(presets))
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help=set_help)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train_scenes", type=int, default=1024)
    p.add_argument("--eval_scenes", type=int, default=eval_scenes)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block", type=int, default=10, help="block side in pixels")
    p.add_argument("--step", type=float, default=2.0, help="pixels per step of the block")
    return p


def scene_options(args: argparse.Namespace) -> dict[str, Any]:
    """The scene keywords of :func:`ladder.make_batch` chosen on the command line."""
    return {"block": args.block, "step": args.step}


def parse_rungs(text: str) -> list[str]:
    """Comma-separated rung names, checked against :data:`ladder.RUNGS`."""
    rungs = [r for r in text.split(",") if r]
    bad = [r for r in rungs if r not in ladder.RUNGS]
    if bad or not rungs:
        raise ValueError(f"--rungs: unknown {bad or text!r}; expected some of {ladder.RUNGS}")
    return rungs


def optimizer(lr: float, steps: int) -> optax.GradientTransformation:
    """AdamW (no weight decay) at ``lr`` with 5% linear warmup and cosine decay, clipped at 1."""
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 20, 1), steps)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.0))


def report(rung: str, figures: dict[str, float]) -> None:
    """One line per rung on stdout."""
    print(f"{rung:15s} " + " ".join(f"{k.replace('held_out_', 'ho_')}={v:.2f}"
                                    for k, v in figures.items()), flush=True)


def scenes(rung: str, seed: int, n_train: int, n_eval: int, **kw: Any
           ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(training, held-out) scenes of ``rung``, from disjoint seeds, without the answers."""
    train = ladder.make_batch(rung, np.random.default_rng(seed), n_train, **kw)
    held = ladder.make_batch(rung, np.random.default_rng(seed + 10_000), n_eval, **kw)
    drop = ("direction",)
    return ({k: v for k, v in train.items() if k not in drop},
            {k: v for k, v in held.items() if k not in drop})


def fit_and_score(step: Any, score: Any, params: Any, opt: Any, train: dict[str, np.ndarray],
                  held: dict[str, np.ndarray], *, steps: int, batch: int, n_eval: int,
                  seed: int) -> dict[str, float]:
    """``steps`` of ``step(params, opt, batch, rng)`` on random training scenes, then
    ``score(params, scenes, rng)`` on the first ``n_eval`` training and held-out scenes."""
    key = jax.random.key(seed)
    rng = np.random.default_rng(seed + 1)
    t0 = time.perf_counter()
    loss = jnp.zeros(())
    n_train = len(next(iter(train.values())))
    for i in range(steps):
        if i and i % max(steps // 5, 1) == 0:
            print(f"  step {i}/{steps} loss {float(loss):.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        idx = rng.integers(0, n_train, batch)
        params, opt, loss = step(params, opt, {k: jnp.asarray(v[idx]) for k, v in train.items()},
                                 jax.random.fold_in(key, i))
    out: dict[str, float] = {"final_loss": float(loss),
                             "train_wall_s": time.perf_counter() - t0}
    for split, data in (("train", train), ("held_out", held)):
        x = {k: jnp.asarray(v[:n_eval]) for k, v in data.items()}
        for k, v in score(params, x, jax.random.key(seed + 7)).items():
            out[f"{split}_{k}"] = float(v)
    return out


def run_rungs(args: argparse.Namespace, overrides: dict[str, Any], rungs: list[str],
              train_and_score: Any) -> dict[str, Any]:
    """Runs ``train_and_score(rung)`` for every rung, prints a line each, writes ``args.out``.

    Returns:
      The JSON written: the settings and ``rungs`` (rung -> figures).
    """
    result: dict[str, Any] = {"model": args.model, "overrides": overrides, "steps": args.steps,
                              "batch": args.batch, "lr": args.lr, "seed": args.seed,
                              "scene": scene_options(args), "rungs": {}}
    for rung in rungs:
        result["rungs"][rung] = figures = train_and_score(rung)
        report(rung, figures)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return result


def parse(p: argparse.ArgumentParser, argv: list[str] | None, presets: dict[str, Any],
          quick_rungs: int, check: Any) -> tuple[argparse.Namespace, list[str], dict[str, Any]]:
    """Parses the command line: (args, rungs, overrides). ``--quick`` means 300 steps and the
    first ``quick_rungs`` rungs; ``check(overrides, rungs)`` validates the overrides. Any
    ValueError or TypeError becomes one usage error line."""
    a = p.parse_args(argv)
    try:
        rungs = parse_rungs(a.rungs)
        overrides = {**presets[a.model], **parse_set(a.set)}
        if a.quick:
            a.steps, rungs = 300, rungs[:quick_rungs]
        check(overrides, rungs)
    except (ValueError, TypeError) as e:
        p.error(str(e))
    return a, rungs, overrides
