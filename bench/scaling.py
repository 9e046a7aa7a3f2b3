"""Strong scaling and per-shard overhead of bulk production, through the real command line.

``python -m bench.production --scaling [--quick] [--showers N] [--out FILE]``: N DS2 showers with 1 and then 2
workers on each backend (local processes, Ray actors, MPI ranks), 1 torch thread per worker, on a run folder of
the reference DS2 architecture with random weights (``--quick``: the ``tiny`` architecture and few showers, a
smoke run). Per case: the whole command's wall time, the generation time and showers/s (every worker holding its
chain -> last part), the speed-up over 1 worker, and the fixed costs apart: process start (interpreter, imports,
exit: the wall time the sampler does not account for), model load, plan, workers' start (with their own model
load; Ray: with ``ray.init``) and gather (the write of the output). ``--reps R`` interleaves R repetitions of
every case and reports medians; ``--backends`` runs a subset.

``python -m bench.production --overhead [--quick] [--workers W] [--shards S ...]``: the per-shard cost of the
coordination. W = 32 Ray actors and then 32 MPI ranks (oversubscribed on a small box) generate 10^2, 10^3 and
10^4 one-shower shards of a micro model (one 8-wide MADE block per flow: a shard's own compute is small next to
its coordination); generation and gather milliseconds per shard should stay flat as the shard count grows.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.report import emit, machine

PY = sys.executable
BIN = Path(PY).parent
RESULTS = Path(__file__).parent / "results"
BACKENDS = ("local", "ray", "mpi")
# The sampler's summary line (hpc_calo.sample.job.Outcome.line).
LINE = re.compile(
    r"from (?P<shards>\d+) shards \((?P<generated>\d+) generated in (?P<generate_s>[\d.]+) s.*?"
    r"gathered in (?P<gather_s>[\d.]+) s; fixed costs: model load (?P<load_s>[\d.]+) s, plan (?P<plan_s>[\d.]+) s, "
    r"workers ready in (?P<workers_s>[\d.]+) s \(their model load (?P<worker_load_s>[\d.]+) s, "
    r"(?P<torch_threads>\d+) torch threads each\)"
)


def build_run(root: Path, preset: str) -> Path:
    """A DS2 run folder with random weights (flow-1 teacher, flow-2/3 students): for timing only.

    ``preset`` names an architecture, or ``micro``: one 8-wide MADE block per flow, so that a one-shower shard
    costs little more than its coordination.
    """
    import torch

    from hpc_calo import rundir
    from hpc_calo.flows.presets import get_preset
    from hpc_calo.geometry import DS2, E_INC_MAX_MEV, E_INC_MIN_MEV
    from hpc_calo.models import FlowModel

    run = root / f"run-{preset}"
    torch.manual_seed(0)
    for k in (1, 2, 3):
        student = k > 1
        if preset == "micro":
            spec = replace(get_preset("tiny").spec(k, DS2, student), hidden=8, layers=1, blocks=1, bins=2)
            model = FlowModel(k, DS2, spec, student=student, preset="tiny")
        else:
            model = FlowModel.from_preset(k, DS2, preset, student=student)
        path = rundir.weights(run, k, student=student)
        path.parent.mkdir(parents=True)
        model.save(path)
    rundir.write_run(run, {"dataset": "ds2", "preset": preset, "energy_range": [E_INC_MIN_MEV, E_INC_MAX_MEV]})
    return run


def run_case(run: Path, out: Path, backend: str, workers: int, showers: int, shard: int) -> dict[str, Any]:
    """One production through the command line; its wall time and the phases the sampler reports."""
    sampler = [PY, "-m", "hpc_calo.sample"]
    prefix = [str(BIN / "mpiexec"), "-n", str(workers), *sampler] if backend == "mpi" else sampler
    argv = ["--run", str(run), "--showers", str(showers), "--shard-size", str(shard), "--out", str(out),
            "--backend", backend, "--threads", "1", "--no-progress", "--compression", "none"]
    if backend != "mpi":
        argv += ["--workers", str(workers)]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    t0 = time.perf_counter()
    proc = subprocess.run([*prefix, *argv], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    out.unlink(missing_ok=True)
    m = LINE.search(proc.stdout)
    if proc.returncode != 0 or m is None:
        tail = (proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}").splitlines()[-1]
        return {"error": tail}
    f = {k: float(v) for k, v in m.groupdict().items()}
    accounted = f["load_s"] + f["plan_s"] + f["workers_s"] + f["generate_s"] + f["gather_s"]
    return {
        "wall_s": round(wall, 2),
        "generate_s": f["generate_s"],
        "showers_per_s": round(showers / f["generate_s"], 2) if f["generate_s"] else None,
        "fixed_s": {"process_start": round(wall - accounted, 2), "model_load": f["load_s"], "plan": f["plan_s"],
                    "workers_start": f["workers_s"], "workers_model_load": f["worker_load_s"],
                    "gather_write": f["gather_s"]},
        "torch_threads_per_worker": int(f["torch_threads"]),
        "shards": int(f["shards"]),
    }


def _median_case(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Every timing is the median over the repetitions; the repetitions' own figures are kept beside it."""
    if failed := [r for r in runs if "error" in r]:
        return failed[0]

    def med(key: str) -> float:
        return round(statistics.median(r[key] for r in runs), 2)

    case = {**runs[0], "wall_s": med("wall_s"), "generate_s": med("generate_s"), "showers_per_s": med("showers_per_s"),
            "fixed_s": {k: round(statistics.median(r["fixed_s"][k] for r in runs), 2) for k in runs[0]["fixed_s"]}}
    if len(runs) > 1:
        case["repetitions"] = [{"wall_s": r["wall_s"], "generate_s": r["generate_s"]} for r in runs]
    return case


def scaling(quick: bool, showers: int | None, out: Path | None, backends: tuple[str, ...] = BACKENDS,
            reps: int = 1) -> dict[str, Any]:
    """1 vs 2 workers per backend; with ``reps`` > 1 the cases are interleaved (1, 2, 1, 2, ...) so that a drift
    of the machine's speed falls on both, and each timing is the median over the repetitions."""
    preset = "tiny" if quick else "ds2"
    n = showers or (160 if quick else 6400)
    shard = max(1, n // 8)  # 8 equal shards: 4 per worker with 2 workers
    load_before = os.getloadavg()
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {b: {"1": [], "2": []} for b in backends}
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        root = Path(tmp)
        run = build_run(root, preset)
        for rep in range(reps):
            for backend in backends:
                for w in (1, 2):
                    case = run_case(run, root / f"{backend}{w}.h5", backend, w, n, shard)
                    runs[backend][str(w)].append(case)
                    print(f"rep {rep + 1}/{reps}", backend, w, case, file=sys.stderr)
    cases = {b: {w: _median_case(rs) for w, rs in by_w.items()} for b, by_w in runs.items()}  # str keys: as in JSON
    for by_w in cases.values():
        one = by_w["1"]
        for c in by_w.values():
            if "error" not in c and "error" not in one:
                c["speedup_generation"] = round(one["generate_s"] / c["generate_s"], 2)
                c["speedup_wall"] = round(one["wall_s"] / c["wall_s"], 2)
    report = {
        "bench": "production --scaling", "quick": quick, "dataset": "ds2", "showers": n, "shard_size": shard,
        "model": f"{preset} architecture, random weights (flow-1 teacher, flow-2/3 students)",
        "threads_per_worker": 1, "compression": "none", "repetitions": reps, "cases": cases,
        "goal_speedup_2_vs_1": 1.8,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()], "machine": machine(),
    }
    print(table(report), file=sys.stderr)
    emit(report, out or (None if quick else RESULTS / "scaling.json"), indent=1)
    return report


def table(report: dict[str, Any]) -> str:
    rows = ["| backend | workers | wall s | generation s | showers/s | speed-up (generation / wall) | process start s "
            "| model load s | plan s | workers start s (their load) | gather s |", "|" + "---|" * 11]
    for backend, by_w in report["cases"].items():
        for w, c in by_w.items():
            if "error" in c:
                rows.append(f"| {backend} | {w} | error: {c['error']} |")
                continue
            f = c["fixed_s"]
            rows.append(
                f"| {backend} | {w} | {c['wall_s']:.1f} | {c['generate_s']:.1f} | {c['showers_per_s']:.1f} "
                f"| {c.get('speedup_generation', '-')} / {c.get('speedup_wall', '-')} | {f['process_start']:.1f} "
                f"| {f['model_load']:.2f} | {f['plan']:.2f} | {f['workers_start']:.1f} ({f['workers_model_load']:.1f}) "
                f"| {f['gather_write']:.2f} |"
            )
    return "\n".join(rows)


def overhead(quick: bool, workers: int, shard_counts: list[int], out: Path | None) -> dict[str, Any]:
    load_before = os.getloadavg()
    cases: dict[str, dict[str, dict[str, Any]]] = {b: {} for b in ("ray", "mpi")}
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        root = Path(tmp)
        run = build_run(root, "micro")
        for backend in cases:
            for shards in shard_counts:
                c = run_case(run, root / f"{backend}{shards}.h5", backend, workers, shards, 1)
                if "error" not in c:
                    c["generate_ms_per_shard"] = round(1000 * c["generate_s"] / shards, 2)
                    c["gather_ms_per_shard"] = round(1000 * c["fixed_s"]["gather_write"] / shards, 2)
                cases[backend][str(shards)] = c
                print(backend, shards, c, file=sys.stderr)
    lo, hi = str(min(shard_counts)), str(max(shard_counts))
    growth = {
        b: round(by[hi]["generate_ms_per_shard"] / by[lo]["generate_ms_per_shard"], 2)
        for b, by in cases.items() if all("error" not in c for c in by.values())
    }
    report = {
        "bench": "production --overhead", "quick": quick, "dataset": "ds2", "workers": workers,
        "shower_per_shard": 1, "shard_counts": shard_counts,
        "model": "micro: one 8-wide MADE block per flow, random weights (flow-1 teacher, flow-2/3 students)",
        "cases": cases,
        "generate_ms_per_shard_growth": growth,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()], "machine": machine(),
    }
    rows = ["| backend | shards | generation ms/shard | gather ms/shard | plan s | workers start s | wall s |",
            "|---|---|---|---|---|---|---|"]
    for b, by in cases.items():
        for s, c in by.items():
            rows.append(f"| {b} | {s} | error: {c['error']} |" if "error" in c else
                        f"| {b} | {s} | {c['generate_ms_per_shard']} | {c['gather_ms_per_shard']} "
                        f"| {c['fixed_s']['plan']:.2f} | {c['fixed_s']['workers_start']:.1f} | {c['wall_s']:.1f} |")
    print("\n".join(rows), file=sys.stderr)
    emit(report, out or (None if quick else RESULTS / "overhead.json"), indent=1)
    return report
