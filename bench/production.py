"""``python -m bench.production [--quick] [--run RUN_DIR] [--out FILE.json]``: bulk-production throughput.

Measures, side by side in one run and through the real command line: showers/s of the sampler with 1 and 2
workers on the local, Ray and MPI backends; the gather's time as a fraction of the generation time (goal
<= 10%); and the gather's peak RSS (measured alone in a fresh process, with the high-water mark reset just
before it starts). Without ``--run`` it builds the test-sized run (tiny DS2 teachers trained one epoch on 40
synthetic showers, randomly initialised students), so the figures are for that tiny model: they show the
sampler's overheads and scaling, not the speed of a production model. GPU: not measured here.

``--scaling`` and ``--overhead``: strong scaling and the per-shard overhead of the coordination (see
``bench.scaling``).

``--writer`` measures only the output writer instead: DS2 showers/s with gzip through ``CaloWriter`` with 1 and
2 compression threads, compressing alone (the thread pool, no file) and writing a whole file end to end, next
to h5py's own single-threaded filters; the single-core cases are pinned to one CPU; synthetic GFlash showers
(``--showers``, default 4000), cases interleaved, median of ``--reps``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.report import emit, machine
from bench.scaling import BACKENDS, overhead, scaling

PY = sys.executable
BIN = Path(PY).parent
LINE = re.compile(r"generated in ([\d.]+) s \(([\d.]+) showers/s\).*gathered in ([\d.]+) s")


def build_run(root: Path) -> Path:
    """The same run as the tests' ``tiny_run`` fixture, made through the real command lines."""
    syn, store, run = root / "syn.h5", root / "store.zarr", root / "run"
    for cmd in (
        ["-m", "data_prep.synth", "--dataset", "ds2", "--showers", "40", "--out", str(syn), "--seed", "7"],
        ["-m", "data_prep.convert", "--dataset", "ds2", str(syn), "--out", str(store), "--quiet"],
        *(
            ["-m", "hpc_calo.train", "--flow", str(k), "--store", str(store), "--preset", "tiny", "--out", str(run),
             "--epochs", "1", "--threads", "1"]
            for k in (1, 2, 3)
        ),
    ):  # fmt: skip
        subprocess.run([PY, *cmd], check=True, capture_output=True)
    code = (
        "import sys, torch; from hpc_calo import rundir; from hpc_calo.geometry import DS2; "
        "from hpc_calo.models import FlowModel; torch.manual_seed(0)\n"
        "for k in (2, 3):\n"
        "    path = rundir.weights(sys.argv[1], k, student=True)\n"
        "    path.parent.mkdir()\n"
        "    FlowModel.from_preset(k, DS2, 'tiny', student=True).save(path)\n"
    )
    subprocess.run([PY, "-c", code, str(run)], check=True)
    return run


def sample(cmd_prefix: list[str], argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.run([*cmd_prefix, *argv], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    m = LINE.search(proc.stdout)
    assert m, proc.stdout
    gen, rate, gather = (float(x) for x in m.groups())
    return {"wall_s": round(wall, 2), "generate_s": gen, "showers_per_s": rate, "gather_s": gather}


_GATHER = """
import json, sys, time
from pathlib import Path
from hpc_calo.sample.gather import gather
from hpc_calo.sample.job import Output, prepare
from hpc_calo.sample.plan import Request
from hpc_calo.sample.worker import load_chain
run, n, shard, parts, out, comp = sys.argv[1:7]  # sys.argv[7]: device
req = Request(run_dir=Path(run), n=int(n), shard_size=int(shard), device=sys.argv[7])
output = Output(path=Path(out), parts_dir=Path(parts), keep_parts=True, compression=comp)
plan, pd, todo = prepare(req, output, load_chain(req))
assert not todo
def status(key):
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith(key)) * 1024
before = status("VmRSS:")
try:
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: measure the gather, not the model loading
    reset = True
except OSError:
    reset = False
t0 = time.perf_counter()
gather(plan, pd, out, comp, keep_parts=True, progress=False)
print(json.dumps({"seconds": time.perf_counter() - t0, "rss_before_mb": before / 2**20,
                  "peak_rss_mb": status("VmHWM:") / 2**20, "hwm_reset": reset}))
"""


def bench_writer(n: int, reps: int, root: Path) -> dict[str, Any]:
    import statistics
    from concurrent.futures import ThreadPoolExecutor

    import h5py

    from data_prep.synth import generate_blocks
    from hpc_calo.geometry import DS2
    from hpc_calo.io import CaloWriter
    from hpc_calo.io.hdf5 import CHUNK_BYTES, GZIP_LEVEL, S_KEY, gzip_chunk, rows_for_bytes

    e, s = next(generate_blocks(DS2, n, seed=1, block_size=n))
    block, chunk = 1000, rows_for_bytes(DS2.n_voxels, CHUNK_BYTES)  # the writer's chunk rows when n >= chunk

    def compress(threads: int) -> None:
        with ThreadPoolExecutor(threads) as pool:
            for _ in pool.map(gzip_chunk, (s[a : a + chunk] for a in range(0, n - n % chunk, chunk))):
                pass

    def writer(threads: int) -> None:
        with CaloWriter(root / "w.h5", DS2, n_total=n, threads=threads) as w:
            for a in range(0, n, block):
                w.write(e[a : a + block], s[a : a + block])

    def one_core(fn: Callable[[], None]) -> Callable[[], None]:
        """``fn`` on one CPU: threads it starts inherit the mask. Storing the compressed bytes costs the caller's
        thread CPU time in the kernel, so one compression thread beside it is more than one core's work."""
        def pinned() -> None:
            cpus = os.sched_getaffinity(0)
            os.sched_setaffinity(0, {min(cpus)})
            try:
                fn()
            finally:
                os.sched_setaffinity(0, cpus)
        return pinned

    def h5py_filters() -> None:  # the writer before: h5py's filters, one thread
        with h5py.File(root / "h.h5", "w") as f:
            d = f.create_dataset(S_KEY, shape=s.shape, dtype="f4", chunks=(chunk, DS2.n_voxels), compression="gzip",
                                 compression_opts=GZIP_LEVEL, shuffle=True)
            for a in range(0, n, block):
                d[a : a + block] = s[a : a + block]

    whole = n - n % chunk
    cases = {"compress_1_thread": (lambda: compress(1), whole), "compress_2_threads": (lambda: compress(2), whole),
             "write_h5py_filters": (one_core(h5py_filters), n), "write_1_core": (one_core(lambda: writer(1)), n),
             "write_1_thread": (lambda: writer(1), n), "write_2_threads": (lambda: writer(2), n)}
    times: dict[str, list[float]] = {k: [] for k in cases}
    load_before = os.getloadavg()
    for _ in range(reps):
        for name, (fn, _rows) in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    rate = {k: round(rows / statistics.median(times[k]), 1) for k, (_fn, rows) in cases.items()}
    return {
        "bench": "production --writer", "dataset": "ds2", "showers": n, "block_rows": block, "reps": reps,
        "showers_per_s_median": rate,
        "seconds_each_rep": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "compress_2_over_1": round(rate["compress_2_threads"] / rate["compress_1_thread"], 2),
        "write_2_over_1": round(rate["write_2_threads"] / rate["write_1_thread"], 2),
        "write_2_over_h5py": round(rate["write_2_threads"] / rate["write_h5py_filters"], 2),
        # the goal: against the faster of the two single-core writers
        "write_2_over_single_core": round(
            rate["write_2_threads"] / max(rate["write_1_core"], rate["write_h5py_filters"]), 2),
        "file_mb": round((root / "w.h5").stat().st_size / 2**20, 1),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "machine": machine(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.production", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer showers (a smoke run)")
    p.add_argument("--writer", action="store_true", help="measure only the output writer (gzip threads)")
    p.add_argument("--scaling", action="store_true", help="strong scaling, 1 vs 2 workers per backend, with the "
                   "fixed costs apart (bench.scaling; JSON to bench/results/scaling.json unless --quick)")
    p.add_argument("--showers", type=int, default=None, help="--scaling: N (default 6400: one worker >= 2 min "
                   "with the reference DS2 student; --quick 160); --writer: showers written (default 4000)")
    p.add_argument("--overhead", action="store_true", help="per-shard overhead with --workers Ray actors and MPI "
                   "ranks at 10^2..10^4 one-shower shards (bench.scaling; JSON to bench/results/overhead.json)")
    p.add_argument("--workers", type=int, default=32, help="--overhead: actors and ranks (default 32)")
    p.add_argument("--shards", type=int, nargs="+", default=None,
                   help="--overhead: shard counts (default 100 1000 10000; --quick 100 1000)")
    p.add_argument("--reps", type=int, default=None, help="repetitions of every case, medians reported (--writer: "
                   "default 5; --scaling: default 1, interleaved 1 and 2 workers)")
    p.add_argument("--backends", default=",".join(BACKENDS), help="--scaling: comma-separated subset of "
                   f"{','.join(BACKENDS)} (default all)")
    p.add_argument("--note", default="", help="--writer: a note for the JSON (what else ran on the machine)")
    p.add_argument("--run", type=Path, help="run directory to benchmark (default: build the tiny test run)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (one worker per GPU)")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.scaling:
        backends = tuple(b for b in args.backends.split(",") if b)
        if not backends or set(backends) - set(BACKENDS):
            p.error(f"--backends: a comma-separated subset of {','.join(BACKENDS)}, not {args.backends!r}")
        if args.reps is not None and args.reps < 1:
            p.error("--reps must be >= 1")
        scaling(args.quick, args.showers, args.out, backends, args.reps or 1)
        return 0
    if args.overhead:
        overhead(args.quick, args.workers, args.shards or ([100, 1000] if args.quick else [100, 1000, 10000]), args.out)
        return 0
    if args.writer:
        with tempfile.TemporaryDirectory(prefix="bench-writer-") as tmp:
            report = bench_writer(args.showers or (500 if args.quick else 4000), 2 if args.quick else args.reps or 5,
                                  Path(tmp))
        emit({**report, "note": args.note}, args.out, indent=1)
        return 0
    n, shard = (60, 10) if args.quick else (400, 25)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    with tempfile.TemporaryDirectory(prefix="bench-prod-") as tmp:
        root = Path(tmp)
        run = args.run or build_run(root)
        common = ["--run", str(run), "--showers", str(n), "--shard-size", str(shard), "--no-progress"]
        common += ["--device", args.device]
        sampler = [PY, "-m", "hpc_calo.sample"]
        cases: dict[str, tuple[list[str], list[str]]] = {}
        for w in (1, 2):
            cases[f"local_{w}"] = (sampler, ["--backend", "local", "--workers", str(w)])
            cases[f"ray_{w}"] = (sampler, ["--backend", "ray", "--workers", str(w)])
            cases[f"mpi_{w}"] = ([str(BIN / "mpiexec"), "-n", str(w), *sampler], ["--backend", "mpi"])
        results: dict[str, Any] = {}
        for name, (prefix, extra) in cases.items():
            results[name] = sample(prefix, [*common, "--out", str(root / f"{name}.h5"), *extra], env)
            print(name, results[name], file=sys.stderr)

        gathers = {}
        for comp in ("gzip", "none"):
            out, parts = root / f"g_{comp}.h5", root / "g.parts"
            if comp == "gzip":  # generate the parts once, keep them for both gathers
                sample(sampler, [*common, "--out", str(out), "--parts-dir", str(parts), "--keep-parts"], env)
            proc = subprocess.run(
                [PY, "-c", _GATHER, str(run), str(n), str(shard), str(parts), str(out), comp, args.device],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            gathers[comp] = json.loads(proc.stdout)
        gen_1 = results["local_1"].get("generate_s")
        report = {
            "bench": "production",
            "quick": args.quick,
            "showers": n,
            "shard_size": shard,
            "dataset": "ds2",
            "model": str(args.run) if args.run else "tiny test run (1-epoch teachers, random-init students)",
            "threads_per_worker": 1,
            "cases": results,
            "speedup_2_vs_1": {
                b: round(results[f"{b}_2"]["showers_per_s"] / results[f"{b}_1"]["showers_per_s"], 2)
                for b in ("local", "ray", "mpi")
                if "showers_per_s" in results[f"{b}_1"] and "showers_per_s" in results[f"{b}_2"]
            },
            "gather": gathers,
            "gather_fraction_of_generation": (
                {c: round(g["seconds"] / gen_1, 4) for c, g in gathers.items()} if gen_1 else None
            ),
            "device": args.device,
            "gpu": "not measured (no GPU on this machine)" if args.device == "cpu" else "see cases",
            "machine": f"{os.cpu_count()} cores",
            "date": time.strftime("%Y-%m-%d"),
        }
    emit(report, args.out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
