"""What bf16 student GEMMs cost in fidelity and gain in speed, on a trained run (``--dtype bf16`` vs float32).

python -m bench.precision --run RUN --reference REF.h5 [--showers 5000] [--out bench_precision.json]

Generates the same showers (same seed, REF's incident energies) three times through ``python -m
hpc_calo.generate``: float32, bf16, and float32 with another seed (the statistical floor: two independent
samples of the same model). Then ``python -m hpc_calo.evaluate`` compares bf16 with float32 (same seed), the
second float32 sample with the first, and each precision with REF. bf16 keeps fidelity when it moves the
showers less than resampling does and leaves the GEN-vs-REF numbers unchanged within their noise.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from bench.report import emit


def _run(cmd: list[str]) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t


def generate(run: Path, ref: Path, n: int, out: Path, dtype: str, seed: int, threads: int) -> float:
    return _run([sys.executable, "-m", "hpc_calo.generate", "--run", str(run), "--energies", str(ref),
                 "--showers", str(n), "--out", str(out), "--dtype", dtype, "--seed", str(seed),
                 "--threads", str(threads), "--no-progress"])


def evaluate(gen: Path, ref: Path, dataset: str, out: Path, epochs: int) -> dict[str, Any]:
    _run([sys.executable, "-m", "hpc_calo.evaluate", str(gen), str(ref), "--dataset", dataset, "--out", str(out),
          "--metrics", "hist,cls-high,fpd", "--epochs", str(epochs), "--no-plots"])
    rep = json.loads((out / "report.json").read_text())
    groups = rep["histograms"]["groups"]
    return {
        "mean_separation_power": {g: round(v["mean_separation_power"], 5) for g, v in groups.items()},
        "max_separation_power": round(max(v["max_separation_power"] for v in groups.values()), 5),
        "auc_high": rep["cls_high"]["auc"],
        "fpd": [rep["fpd"]["value"], rep["fpd"]["error"]],
        "kpd": [rep["kpd"]["value"], rep["kpd"]["error"]],
    }


def voxel_deviation(a: Path, b: Path, block: int = 2000) -> dict[str, float]:
    """Per-voxel and per-shower differences between two files of the same showers."""
    rel_tot, max_voxel_frac, changed = [], 0.0, 0
    total = 0
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        n = fa["showers"].shape[0]
        for s in range(0, n, block):
            x, y = fa["showers"][s : s + block], fb["showers"][s : s + block]
            tx, ty = x.sum(1), y.sum(1)
            rel_tot.append(np.abs(ty - tx) / np.maximum(tx, 1e-9))
            max_voxel_frac = max(max_voxel_frac, float((np.abs(y - x) / np.maximum(tx, 1e-9)[:, None]).max()))
            changed += int(((x > 0) != (y > 0)).sum())
            total += x.size
    r = np.concatenate(rel_tot)
    return {"e_tot_rel_diff_median": float(np.median(r)), "e_tot_rel_diff_p99": float(np.quantile(r, 0.99)),
            "max_voxel_diff_over_e_tot": max_voxel_frac, "voxels_crossing_threshold_frac": changed / total}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="trained run folder (students for flows 2 and 3)")
    p.add_argument("--reference", type=Path, required=True, help="CaloChallenge file: incident energies and REF")
    p.add_argument("--dataset", default="ds2", help="ds2 or ds3 (default ds2)")
    p.add_argument("--showers", type=int, default=5000, help="showers per sample (default 5000)")
    p.add_argument("--epochs", type=int, default=10, help="high-level classifier epochs (default 10)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for generation (default 1)")
    p.add_argument("--work", type=Path, default=Path("bench_precision_work"), help="scratch directory")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    files = {"float32": args.work / "gen_float32.h5", "bf16": args.work / "gen_bf16.h5",
             "float32_seed1": args.work / "gen_float32_seed1.h5"}
    gen_s = {}
    for name, dtype, seed in (("float32", "float32", 0), ("bf16", "bf16", 0), ("float32_seed1", "float32", 1)):
        gen_s[name] = round(generate(args.run, args.reference, args.showers, files[name], dtype, seed, args.threads), 1)
        print(f"generated {name} in {gen_s[name]} s", file=sys.stderr, flush=True)
    comparisons = {}
    for label, gen, ref in (("bf16_vs_float32", files["bf16"], files["float32"]),
                            ("float32_seed1_vs_float32", files["float32_seed1"], files["float32"]),
                            ("float32_vs_reference", files["float32"], args.reference),
                            ("bf16_vs_reference", files["bf16"], args.reference)):
        comparisons[label] = evaluate(gen, ref, args.dataset, args.work / f"report_{label}", args.epochs)
        print(f"{label}: {json.dumps(comparisons[label])}", file=sys.stderr, flush=True)
    report = {
        "bench": "precision", "run": str(args.run), "reference": str(args.reference), "showers": args.showers,
        "generate_wall_s": gen_s, "voxel_deviation_bf16_vs_float32": voxel_deviation(files["float32"], files["bf16"]),
        "comparisons": comparisons,
    }
    emit(report, args.out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
