"""Benchmark of the Ray Train path: samples/s with 1 and 2 workers, and its overhead against the plain loop.

``python -m bench.train_ray [--quick] [--out FILE.json] [--gpus-per-worker G --dataset ds3 --preset ds3]``

Flow-3 teacher (``small`` preset by default) on a synthetic DS2 pair store, the same steps for every
variant, measured side by side in one run, interleaved and repeated (the box is shared and noisy):

- ``plain``: ``python -m hpc_calo.train``'s single-process ``fit`` with one torch thread;
- ``ray1``: the same job through Ray Train with one worker (1 CPU, DDP over gloo with world size 1);
- ``ray2``: two Ray Train workers, each with half the global batch;
- ``plain2`` (``--side-by-side``): two independent plain trainings at once, each with half the global batch: the
  same work per process as ``ray2`` without the all-reduce, so ``plain2 / plain`` is what the cores themselves
  give (shared caches and memory bandwidth);
- ``ddp2`` (``--side-by-side``): the ``ray2`` work as two torch DDP processes over gloo without Ray (the same
  per-rank code, ``fit_shard``), so ``ddp2 / plain2`` is what the gradient synchronisation costs and
  ``ray2 / ddp2`` what Ray Train adds to it.

- ``ray1@K``, ``ray2@K`` (``--ray-niceness K``): ``ray1`` and ``ray2`` with Ray's workers at niceness K;
- ``ray1@other``, ``ray2@other`` (``--ray-other``): ``ray1`` and ``ray2`` with every thread of Ray under normal
  scheduling (``HPC_CALO_RAY_BATCH=0``): the daemons, the helper actors and the workers' own Ray threads.
  ``HPC_CALO_RAY_BATCH=0`` in the bench's own environment does that for every Ray variant.

Each Ray run starts its own local Ray the way every hpc-calo command does (``hpc_calo.ray_session``: workers at
niceness 0, Ray's daemons and Ray's threads in the workers under SCHED_BATCH, the ranks' compute normal); its
start is part of the start-up time. ``preemptions_per_s_rank0`` counts the involuntary context switches of rank
0's process per second of ``fit``: how often something else took its CPU.

samples/s counts the training examples (layer pairs) of the optimiser steps over the time ``fit`` spent in its
loop (``train_s``, which excludes Ray start-up); the fixed cost of starting a worker group is reported apart
(wall time of ``run_ray`` minus ``train_s``). The overhead of the Ray path is ``1 - ray1 / plain``.
On a box where other jobs compete for the cores the wall-clock rates are noisy, so the CPU seconds per 1000
samples (the process CPU time inside ``fit``, summed over the workers) are recorded too: the cost per sample
on idle cores, and so the Ray overhead and the 2-worker efficiency, with little disturbance from neighbours.

With ``--gpus-per-worker 1`` (on a GPU machine) the Ray workers train on GPUs with NCCL and the JSON also
holds the peak GPU memory per worker (``torch.cuda.max_memory_allocated``); pass ``--dataset ds3 --preset ds3``
for the reference DS3 flow-3.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest.mock import patch

from bench.report import emit
from hpc_calo.errors import run_cli


def make_store(root: Path, dataset: str, showers: int) -> Path:
    from data_prep.convert import ConvertRequest, convert
    from data_prep.synth import write_synthetic

    h5 = write_synthetic(root / f"{dataset}.h5", dataset, showers, seed=1)
    store = root / f"{dataset}.zarr"
    if convert(ConvertRequest(inputs=(str(h5),), dataset=dataset, out=store, quiet=True)) != 0:
        raise RuntimeError("conversion failed")
    return store


def job(store: Path, out: Path, preset: str, batch: int, steps: int, device: str = "cpu") -> Any:
    from hpc_calo.train.job import TrainingOptions, TrainRequest, build_job

    opts = TrainingOptions(batch_size=batch, max_steps=steps, checkpoint_every=10**9, log_every=10**9, threads=1,
                           device=device)
    return build_job(TrainRequest(flow=3, store=store, preset=preset, out=out, options=opts))


def j_workers(name: str) -> int:
    return 1 if name == "plain" else int(name.partition("@")[0].lstrip("abcdefghijklmnopqrstuvwxyz"))


_CHILD = """
import json, sys
from pathlib import Path
import torch
import torch.distributed as dist
from bench.train_ray import job, run_plain
from hpc_calo.train.distributed import RayConfig, fit_shard
store, out, preset = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
batch, steps, rank, world, port = map(int, sys.argv[4:9])
j = job(store, out, preset, batch, steps)
if world == 1:
    summary = run_plain(j)
else:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    summary = fit_shard(j, RayConfig(workers=world), rank, world, torch.device("cpu"))
    dist.destroy_process_group()
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))  # kB; fresh at exec
print(json.dumps({"train_s": summary["train_s"], "steps": summary["global_step"], "cpu_s": summary["cpu_s"],
                  "preemptions": summary["preemptions"], "peak_rss_mb": hwm / 1024}))
"""


def run_plain(j: Any) -> dict[str, Any]:
    """``python -m hpc_calo.train``'s single-process run, with the costs ``fit_shard`` records for a worker."""
    from hpc_calo.train.job import run_local

    cpu, preempted = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw
    summary = run_local(j)
    summary["cpu_s"] = time.process_time() - cpu
    summary["preemptions"] = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw - preempted
    return summary


def run_children(name: str, store: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``plainN``: N independent plain trainings at once, each on 1/N of the global batch (the same work per
    process as N Ray workers, without the gradient all-reduce: what N cores give for this work, Ray or not).
    ``ddpN``: N torch DDP processes over gloo, without Ray (what the all-reduce costs, Ray or not)."""
    n, ddp = j_workers(name), name.startswith("ddp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if ddp:
        job(store, out, args.preset, args.batch, args.steps).prepare()
    else:
        out.mkdir(parents=True)
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(store), str(out if ddp else out / str(k)),
                               args.preset, str(args.batch if ddp else args.batch // n), str(args.steps),
                               str(k if ddp else 0), str(n if ddp else 1), str(port)],
                              stdout=subprocess.PIPE, text=True)
             for k in range(n)]
    runs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a {name} training process failed")
    return {"global_step": min(r["steps"] for r in runs), "train_s": max(r["train_s"] for r in runs),
            "cpu_s": sum(r["cpu_s"] for r in runs) / n, "preemptions": runs[0]["preemptions"],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}


def run_variant(name: str, store: Path, root: Path, args: argparse.Namespace, rep: int) -> dict[str, Any]:
    from hpc_calo.ray_session import BATCH_ENV, NICENESS_ENV, WORKER_NICENESS, ray_session
    from hpc_calo.train.distributed import RayConfig, run_ray

    out = root / f"{name}-{rep}"
    gpu = args.gpus_per_worker > 0
    j = job(store, out, args.preset, args.batch, args.steps, "cuda" if gpu else "cpu")
    t = time.perf_counter()
    if name == "plain":
        summary = run_plain(j)
    elif not name.startswith("ray"):
        summary = run_children(name, store, out, args)
    else:  # a Ray of its own for each run: ``rayN@K`` runs Ray's workers at niceness K, ``rayN@other`` normally
        tag = name.partition("@")[2]
        env = {NICENESS_ENV: tag if tag.isdigit() else WORKER_NICENESS, **({BATCH_ENV: "0"} if tag == "other" else {})}
        with patch.dict(os.environ, env), ray_session(None, num_cpus=2):
            summary = run_ray(j, RayConfig(workers=j_workers(name), gpus_per_worker=args.gpus_per_worker))
    wall = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    samples = summary["global_step"] * args.batch  # every step is a full global batch (steps < one epoch)
    rec = {"variant": name, "rep": rep, "steps": summary["global_step"], "train_s": summary["train_s"],
           "samples_per_s": samples / summary["train_s"], "wall_s": wall,
           "startup_s": wall - summary["train_s"],
           # CPU seconds of all workers per 1000 samples (rank 0's CPU time x workers): what the time per sample
           # would be on idle cores, little disturbed by other jobs competing for them.
           "cpu_s_per_1k_samples": summary["cpu_s"] * j_workers(name) / samples * 1000,
           "preemptions_per_s_rank0": summary["preemptions"] / summary["train_s"]}
    # Peak resident memory: of rank 0's worker process; for plain, of this process (store creation included).
    rec["peak_rss_mb_rank0"] = summary.get("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if "peak_gpu_memory_gb" in summary:
        rec["peak_gpu_memory_gb_rank0"] = summary["peak_gpu_memory_gb"]
    print(json.dumps(rec), file=sys.stderr, flush=True)
    return rec


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train_ray", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps and one repetition (a smoke run)")
    p.add_argument("--dataset", default="ds2", choices=("ds2", "ds3"), help="synthetic dataset (default ds2)")
    p.add_argument("--preset", default="small", help="flow preset (default small; ds3 for the reference DS3 size)")
    p.add_argument("--showers", type=int, default=4000,
                   help="synthetic showers in the store (default 4000: one epoch is longer than the run)")
    p.add_argument("--batch", type=int, default=500, help="GLOBAL batch of layer pairs (default 500)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per run (default 300, quick 15)")
    p.add_argument("--reps", type=int, default=None, help="repetitions of each variant (default 3, quick 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per Ray worker (default 0: CPU)")
    p.add_argument("--side-by-side", action="store_true",
                   help="also run plain2 (two independent plain trainings at once, each on half the global batch: "
                        "what two cores give for this work) and ddp2 (two torch DDP processes without Ray)")
    p.add_argument("--ray-niceness", type=int, default=None, metavar="K",
                   help="also run ray1@K and ray2@K: Ray's workers at niceness K (Ray's own default is 15) instead "
                        "of hpc-calo's 0")
    p.add_argument("--ray-other", action="store_true",
                   help="also run ray1@other and ray2@other: every thread of Ray under normal scheduling instead of "
                        "hpc-calo's SCHED_BATCH for Ray's daemons and Ray's own threads in the workers")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    args.steps = args.steps or (15 if args.quick else 300)
    reps = args.reps or (1 if args.quick else 3)

    root = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    records: list[dict[str, Any]] = []
    try:
        store = make_store(root, args.dataset, args.showers)
        variants: tuple[str, ...] = ("plain", "ray1", "ray2", *(("plain2", "ddp2") if args.side_by_side else ()))
        if args.gpus_per_worker > 0:
            import torch

            if torch.cuda.device_count() < 2 * args.gpus_per_worker:
                variants = ("plain", "ray1")  # one GPU: no second worker to place
        variants += tuple(f"ray{n}@{args.ray_niceness}" for n in (1, 2) if args.ray_niceness is not None)
        variants += tuple(f"ray{n}@other" for n in (1, 2) if args.ray_other)
        for rep in range(reps):  # interleaved: plain, ray1, ray2, plain, ...
            for v in variants:
                records.append(run_variant(v, store, root, args, rep))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    med = {v: statistics.median(r["samples_per_s"] for r in records if r["variant"] == v) for v in variants}
    startup = {v: statistics.median(r["startup_s"] for r in records if r["variant"] == v) for v in variants}
    cpu = {v: statistics.median(r["cpu_s_per_1k_samples"] for r in records if r["variant"] == v) for v in variants}
    result = {
        "bench": "train_ray",
        "flow": 3, "dataset": args.dataset, "preset": args.preset, "global_batch": args.batch,
        "steps": args.steps, "reps": reps, "device": "gpu" if args.gpus_per_worker > 0 else "cpu",
        "samples_per_s_median": med,
        "startup_s_median": startup,
        "ray1_overhead_vs_plain": 1.0 - med["ray1"] / med["plain"],
        "ray2_speedup_vs_ray1": med["ray2"] / med["ray1"] if "ray2" in med else None,
        "cpu_s_per_1k_samples_median": cpu,
        "ray1_cpu_overhead_vs_plain": cpu["ray1"] / cpu["plain"] - 1.0,
        "ray2_cpu_per_sample_vs_ray1": cpu["ray2"] / cpu["ray1"] if "ray2" in cpu else None,
        "plain2_speedup_vs_plain": med["plain2"] / med["plain"] if "plain2" in med else None,
        "plain2_cpu_per_sample_vs_plain": cpu["plain2"] / cpu["plain"] if "plain2" in cpu else None,
        "ddp2_speedup_vs_plain": med["ddp2"] / med["plain"] if "ddp2" in med else None,
        "ray2_vs_ddp2": med["ray2"] / med["ddp2"] if "ddp2" in med else None,
        "preemptions_per_s_rank0_median": {
            v: statistics.median(r["preemptions_per_s_rank0"] for r in records if r["variant"] == v) for v in variants},
        "records": records,
    }
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    run_cli(main)
