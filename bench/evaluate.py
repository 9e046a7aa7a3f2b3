"""Benchmark of ``python -m hpc_calo.evaluate``: wall time and peak RSS on synthetic files.

python -m bench.evaluate [--quick] [--epochs N] [--out bench_evaluate.json]
python -m bench.evaluate --figures [--ds2 2000] [--repeats 3] [--out bench_figures.json]

Runs the CLI in child processes (peak RSS = the child's ru_maxrss): DS2 N vs N with every metric, and DS3 at
two sizes with the low-level classifier to show that memory does not grow with N. ``--figures`` times only the
report's figures (``--metrics hist``), drawn in one process (``--threads 1``) and in one per owned CPU,
interleaved; it prints the medians and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from data_prep.synth import write_synthetic
from hpc_calo.cpus import owned_cpus


def run_case(gen: Path, ref: Path, dataset: str, out: Path, extra: list[str]) -> dict[str, object]:
    cmd = [sys.executable, "-m", "hpc_calo.evaluate", str(gen), str(ref), "--dataset", dataset, "--out", str(out)]
    cmd += extra
    t = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak RSS, not the max over children
        child.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t
        if child.returncode != 0:
            err.seek(0)
            raise RuntimeError(err.read()[-2000:].decode(errors="replace"))
    report = json.loads((out / "report.json").read_text())
    return {
        "cmd": " ".join(cmd[1:]),
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "user_cpu_s": round(usage.ru_utime, 1),
        "timings": report["timings"],
        "auc_low": report.get("cls_low", {}).get("auc"),
        "auc_high": report.get("cls_high", {}).get("auc"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (DS2 2k, DS3 500/1000), 1 epoch")
    p.add_argument("--epochs", type=int, default=None, help="classifier epochs for the DS2 run (default 50)")
    p.add_argument("--ds2", type=int, default=None, help="showers per file for DS2 (default 10000; 0: skip DS2)")
    p.add_argument("--ds3", default=None, help="comma-separated DS3 sizes (default 2000,5000)")
    p.add_argument("--ds3-hidden", type=int, default=256, help="classifier width for the DS3 memory runs")
    p.add_argument("--figures", action="store_true", help="time the figures: 1 process vs one per owned CPU")
    p.add_argument("--repeats", type=int, default=3, help="--figures: interleaved repetitions of each")
    p.add_argument("--work", type=Path, default=Path("bench_evaluate_work"), help="scratch directory")
    p.add_argument("--out", type=Path, default=Path("bench_evaluate.json"), help="results JSON")
    a = p.parse_args(argv)
    n2 = a.ds2 if a.ds2 is not None else (2000 if a.quick else 10_000)
    ds3 = [int(x) for x in (a.ds3 or ("500,1000" if a.quick else "2000,5000")).split(",") if x]
    epochs = a.epochs or (1 if a.quick else 50)
    a.work.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {"machine": "2-core shared CPU box, no GPU", "date": time.strftime("%Y-%m-%d")}

    def files(dataset: str, n: int) -> tuple[Path, Path]:
        out = []
        for seed in (1, 2):
            path = a.work / f"{dataset}_{n}_s{seed}.h5"
            if not path.exists():
                write_synthetic(path, dataset, n, seed)
            out.append(path)
        return out[0], out[1]

    if a.figures:
        gen, ref = files("ds2", a.ds2 or 2000)
        cpus = owned_cpus()
        runs: dict[int, list[float]] = {1: [], cpus: []}
        for _ in range(a.repeats):
            for threads in runs:
                extra = ["--metrics", "hist", "--threads", str(threads)]
                case = run_case(gen, ref, "ds2", a.work / "rep_figures", extra)
                runs[threads].append(case["timings"]["plots_s"])
        medians = {n: statistics.median(t) for n, t in runs.items()}
        results["figures"] = {"showers": a.ds2 or 2000, "plots_s": runs, "median_s": medians,
                              "speedup": medians[1] / medians[cpus]}
        print(json.dumps(results, indent=1), flush=True)
        a.out.write_text(json.dumps(results, indent=1) + "\n")
        return 0
    if n2 > 0:
        gen, ref = files("ds2", n2)
        results[f"ds2_{n2}_all_metrics_{epochs}ep"] = run_case(
            gen, ref, "ds2", a.work / "rep_ds2", ["--epochs", str(epochs)]
        )
        print(json.dumps(results, indent=1), flush=True)
    for n in ds3:
        gen, ref = files("ds3", n)
        extra = ["--metrics", "hist,cls-low", "--epochs", "1", "--cls-hidden", str(a.ds3_hidden), "--no-plots"]
        results[f"ds3_{n}_hist_cls_low"] = run_case(gen, ref, "ds3", a.work / f"rep_ds3_{n}", extra)
        print(json.dumps(results, indent=1), flush=True)
    a.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
