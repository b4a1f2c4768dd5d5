"""The README's pod table: ``benchmarks.pod`` over models, slices and layouts, one compile per
process, resumable, and the largest per-chip batch that fits.

    python -m benchmarks.pod_sweep --out_dir DIR [--quick] [--batch_search]

Cases (each written to ``DIR/<case>.json`` by ``python -m benchmarks.pod``; a case whose JSON
exists is not compiled again, so an interrupted sweep resumes): the CVAE and the DiT at sizes
S, B, L on v5e-16, v5p-128 and v5e-256, bf16 compute, FSDP over all chips, 8 samples per chip;
DiT-L on v5p-128 also data-parallel and with remat; the planner (DiT-B, beams 2 x candidates
2 x horizon 30) for 1024 and 8192 problems on v5p-128. ``--batch_search`` doubles (or halves)
the per-chip batch of every FSDP training case until the compile stops (or starts) fitting.
``--quick``: the tiny runlocal models on v5e:2x2 only. Writes ``DIR/table.md`` and
``DIR/sweep.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CONFIGS = {"cvae": "experiments/configs/cvae.py", "dit": "experiments/configs/dit.py"}
SLICES = ("v5e-16", "v5p-128", "v5e-256")
SIZES = ("S", "B", "L")
CHIPS = {"v5e-16": 16, "v5p-128": 64, "v5e-256": 256, "v5e:2x2": 4}
# FSDP over at most 64 chips, data parallelism across the groups: the models' widths (384,
# 768) do not divide by 256 ("array axis 0 is partitioned 256 times, but the dimension size is
# 384"), and 64 keeps every row below 256 chips pure FSDP as before.
FSDP = {name: min(chips, 64) for name, chips in CHIPS.items()}
MAX_PER_CHIP = 512


def cases(quick: bool) -> list[dict[str, Any]]:
    """The sweep's cases: name, flags for ``benchmarks.pod``."""
    bf16 = "--config.compute_dtype=bfloat16"
    if quick:
        return [{"name": f"{m}_tiny_v5e-2x2_fsdp", "kind": "train", "model": m, "size": "tiny",
                 "slice": "v5e:2x2", "layout": "fsdp", "per_chip": 2,
                 "flags": [f"--config={CONFIGS[m]}:S,runlocal", "--topology=v5e:2x2",
                           "--mesh=1,4,1", bf16]} for m in CONFIGS]
    out = []
    for m in CONFIGS:
        for size in SIZES:
            for sl in SLICES:
                out.append({"name": f"{m}_{size}_{sl}_fsdp", "kind": "train", "model": m,
                            "size": size, "slice": sl, "layout": "fsdp", "per_chip": 8,
                            "flags": [f"--config={CONFIGS[m]}:{size}", f"--topology={sl}",
                                      f"--mesh={CHIPS[sl] // FSDP[sl]},{FSDP[sl]},1", bf16]})
    for layout, mesh, remat in (("data", "-1,1,1", "false"), ("fsdp_remat", "1,64,1", "true")):
        out.append({"name": f"dit_L_v5p-128_{layout}", "kind": "train", "model": "dit",
                    "size": "L", "slice": "v5p-128", "layout": layout, "per_chip": 8,
                    "flags": [f"--config={CONFIGS['dit']}:L", "--topology=v5p-128",
                              f"--mesh={mesh}", f"--remat={remat}", bf16]})
    for problems in (1024, 8192):
        out.append({"name": f"planner_B_v5p-128_{problems}", "kind": "planner", "model": "dit",
                    "size": "B", "slice": "v5p-128", "layout": "data", "per_chip": 0,
                    "flags": [f"--config={CONFIGS['dit']}:B", "--topology=v5p-128", "--planner",
                              f"--problems={problems}", "--beams=2", "--candidates=2",
                              "--horizon=30", "--mesh=-1,1,1", bf16]})
    return out


def compile_case(case: dict[str, Any], per_chip: int, out_dir: Path) -> dict[str, Any]:
    """Runs one ``benchmarks.pod`` compile in its own process (or reads its earlier JSON)."""
    name = case["name"] if per_chip == case["per_chip"] else f"{case['name']}_b{per_chip}"
    path = out_dir / f"{name}.json"
    if not path.exists():
        flags = [*case["flags"]] + ([f"--per_chip_batch={per_chip}"] if per_chip else [])
        env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
        t0 = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "benchmarks.pod", *flags, f"--out={path}"],
                             env=env, capture_output=True, text=True)
        if run.returncode != 0:
            tail = [ln for ln in run.stderr.strip().splitlines() if ln.strip()][-1:]
            raise RuntimeError(f"{name}: benchmarks.pod failed: {' '.join(tail)}")
        print(f"pod_sweep: {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads(path.read_text())


def largest_batch(case: dict[str, Any], first: dict[str, Any], out_dir: Path) -> int | None:
    """The largest power-of-two per-chip batch that fits (None: not even 1)."""
    b = case["per_chip"]
    if first.get("fits"):
        while b * 2 <= MAX_PER_CHIP and compile_case(case, b * 2, out_dir).get("fits"):
            b *= 2
        return b
    while b > 1:
        b //= 2
        if compile_case(case, b, out_dir).get("fits"):
            return b
    return None


def _gib(x: Any) -> str:
    return f"{x / 2**30:.1f}" if isinstance(x, (int, float)) else "-"


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of the sweep's figures."""
    lines = ["| case | chips | per chip | fits | HBM/chip GiB (of) | TFLOPs/chip/step | "
             "est. step s | est. MFU | largest per-chip batch | compile s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        f = r["figures"]
        flops, est, mfu = (f.get(k) for k in ("flops_per_chip", "estimated_step_s",
                                             "estimated_mfu"))
        cells = [r["name"], f.get("chips"), f.get("per_chip_batch"),
                 "yes" if f.get("fits") else "no",
                 f"{_gib(f.get('hbm_per_chip_bytes'))} ({_gib(f.get('hbm_capacity_bytes'))})",
                 f"{flops / 1e12:.2f}" if flops is not None and not f.get("flops_note")
                 else "-",
                 f"{est:.3g}" if est else "-", f"{mfu:.0%}" if mfu is not None else "-",
                 r.get("largest_per_chip", "-"), f.get("compile_s")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Runs the sweep (module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out_dir", required=True, help="Folder of the per-case JSON and table.")
    p.add_argument("--quick", action="store_true", help="Tiny models on v5e:2x2 only.")
    p.add_argument("--batch_search", action="store_true",
                   help="Also find the largest per-chip batch of each FSDP training case.")
    p.add_argument("--only", default="", help="Comma-separated substrings of case names.")
    a = p.parse_args(argv)
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in cases(a.quick):
        if a.only and not any(s in case["name"] for s in a.only.split(",")):
            continue
        figures = compile_case(case, case["per_chip"], out_dir)
        row = {"name": case["name"], "figures": figures}
        if a.batch_search and case["kind"] == "train" and case["layout"] == "fsdp":
            row["largest_per_chip"] = largest_batch(case, figures, out_dir)
        rows.append(row)
        (out_dir / "table.md").write_text(table(rows))
        (out_dir / "sweep.json").write_text(json.dumps(rows, indent=1, default=str))
    print(table(rows), flush=True)


if __name__ == "__main__":
    main()
