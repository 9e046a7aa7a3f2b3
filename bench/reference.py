"""hpc-calo against the public iCaloFlow reference code, same box, same core, same run: generation and training.

``python -m bench.reference --ref-dir REFCODE [--quick] [--modes chain,train] [--reps N] [--cpu C] [--out FILE]``

REFCODE is a checkout of the public repository claudius-krause/inductive-caloflow (commit 328ae2a; its run.py
is all that is used). Every cell is a fresh process (the reference makes float64 torch's global default on
import), random weights at the reference architectures, one torch thread unless said; the cells of one
repetition run back to back, reference and ours interleaved, so that load on a shared box hits both alike.

- ``chain``: ms per shower of the student chain (flow-1, flow-2 student, 44 x flow-3 student): the reference's
  own ``generate_flow_1/2/3`` in float64, as shipped; hpc-calo's ``Chain`` with its fast samplers in float32,
  in bf16 (``--dtype bf16``: bf16 GEMMs, float32 splines), and in float32 on 2 threads (two batches side by
  side, one thread each: ``hpc_calo.cpus.batch_lanes``, as every hpc-calo command runs them). DS2 at batch 1000,
  DS3 at batch 100 (the reference's DS3 chain takes ~0.5 s per shower); both precisions again with ``--compile``
  (the students' spline under torch.compile; its one-time compilation is the warm-up, reported as ``warmup_s``
  and not timed; left out with ``--quick``). The 2-thread cell runs only where the
  process owns two CPUs (under ``taskset -c 1`` it is left out).
- ``train``: flow-3 teacher training steps per second at the DS2 reference size (8 MADE blocks, 2 x 256 hidden,
  8 bins, 144 features, context 191), batch 1000: the reference's loop body of ``train_eval_flow_3``
  (conditioning, log-likelihood, backward, Adam, schedule) on a batch as its DataLoader yields it, float64 as
  shipped; hpc-calo's step (``FlowModel`` on a raw batch: its preprocessing included) in float32 and under
  bf16 autocast. Also the peak resident memory of each cell's process.

Prints a table with the ratios against the goals and writes the JSON. The Ray Train 2-vs-1-worker training
speed-up is ``python -m bench.train_ray``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing
import os
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.report import emit, machine

V = {"ds2": 144, "ds3": 900}
# (what, numerator, denominator, goal): a ratio of two cells' medians, "higher is better" for every row.
GOALS = [
    ("ds2 chain: reference float64 / ours float32", "chain/ds2/ref/float64/1", "chain/ds2/ours/float32/1", 6.0),
    ("ds3 chain: reference float64 / ours float32", "chain/ds3/ref/float64/1", "chain/ds3/ours/float32/1", 8.0),
    ("ds2 chain: reference float64 / ours bf16", "chain/ds2/ref/float64/1", "chain/ds2/ours/bf16/1", 10.0),
    ("ds2 chain: reference float64 / ours float32 --compile", "chain/ds2/ref/float64/1",
     "chain/ds2/ours/float32+compile/1", 6.0),
    ("ds3 chain: reference float64 / ours float32 --compile", "chain/ds3/ref/float64/1",
     "chain/ds3/ours/float32+compile/1", 8.0),
    ("ds2 chain: reference float64 / ours bf16 --compile", "chain/ds2/ref/float64/1", "chain/ds2/ours/bf16+compile/1",
     10.0),
    ("ds2 chain: ours float32, 1 thread / 2 threads", "chain/ds2/ours/float32/1", "chain/ds2/ours/float32/2", 1.7),
    ("train: ours float32 / reference float64 (samples/s)", "train/ds2/ours/float32/1", "train/ds2/ref/float64/1",
     3.0),
    ("train: ours bf16 autocast / reference float64", "train/ds2/ours/bf16/1", "train/ds2/ref/float64/1", None),
]


@dataclass(frozen=True)
class Cell:
    """One measurement in its own process."""

    mode: str  # "chain" or "train"
    kind: str  # "ref" or "ours"
    dataset: str
    dtype: str  # ref: float64; ours: float32 or bf16
    batch: int
    threads: int = 1
    steps: int = 3  # train: timed steps (after one warm-up)
    ref_dir: str = ""
    cpu: int | None = None  # pin to this CPU (and the next ones for more threads)
    compile: bool = False  # ours: the students' spline under torch.compile (``--compile``)

    @property
    def key(self) -> str:
        return f"{self.mode}/{self.dataset}/{self.kind}/{self.dtype}{'+compile' if self.compile else ''}/{self.threads}"


def _reference(cell: Cell) -> Any:
    """The reference's run.py, imported as its main script would be, with torch 2.13's LR schedulers shimmed."""
    import torch.optim.lr_scheduler as sched

    sys.argv = ["run.py"]
    sys.path.insert(0, cell.ref_dir)
    for name in ("OneCycleLR", "MultiStepLR"):  # the reference passes verbose=, which torch 2.13 refuses
        base = getattr(sched, name)
        setattr(sched, name, type(name, (base,), {"__init__": _drop_verbose(base)}))
    import run  # type: ignore[import-not-found]

    arg = run.parser.parse_args(["--which_ds", cell.dataset[-1], "--no_cuda", "--results_file", os.devnull])
    import torch

    arg.device, arg.normalization = torch.device("cpu"), 6.5e4
    return run, arg


def _drop_verbose(base: type) -> Any:
    def init(self: Any, *a: Any, verbose: Any = None, **k: Any) -> None:
        base.__init__(self, *a, **k)

    return init


def _ref_chain(cell: Cell) -> float:
    import contextlib
    import io

    import torch

    run, arg = _reference(cell)
    v = V[cell.dataset]
    torch.manual_seed(0)
    f1, _, _ = run.build_flow(45, 1, arg, 256, 1)
    t2, _, _ = run.build_flow(v, 2, arg, 256, 2)
    t3, _, _ = run.build_flow(v, v + 3 + 44, arg, 256, 4 - int(cell.dataset[-1]))
    s2, _, _ = run.build_flow_student(t2, v, 2, arg, 256, 2)
    s3, _, _ = run.build_flow_student(t3, v, v + 3 + 44, arg, 384 if cell.dataset == "ds2" else 256,
                                      4 - int(cell.dataset[-1]))
    for m in (f1, s2, s3):
        m.eval()

    def chain(n: int) -> torch.Tensor:
        with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            e_inc, s1 = run.generate_flow_1(f1, arg, n)
            return run.generate_flow_3(s3, arg, e_inc, s1, run.generate_flow_2(s2, arg, e_inc, s1))

    chain(10)  # warm-up
    t = time.perf_counter()
    out = chain(cell.batch)
    dt = time.perf_counter() - t
    assert out.shape == (cell.batch, 45 * v), out.shape
    return dt * 1e3 / cell.batch


def _our_chain(cell: Cell) -> tuple[float, dict[str, Any]]:
    import torch

    from bench.sample import _energies, build_chain
    from hpc_calo.precision import resolve

    dtype, mm = resolve(cell.dtype)
    chain = build_chain(cell.dataset, student=True, dtype=dtype, device="cpu")
    chain.use_fast_samplers(compile=cell.compile, matmul_dtype=mm)
    e = _energies(cell.batch * cell.threads, 1)  # one batch per thread
    t = time.perf_counter()
    chain.sample(e[:10], seed=0, batch_size=cell.batch)  # warm-up (and the compilation, once per process)
    warmup_s = time.perf_counter() - t
    t = time.perf_counter()
    out = chain.sample(e, seed=0, batch_size=cell.batch, threads=cell.threads)
    dt = time.perf_counter() - t
    assert out.shape[0] == len(e) and torch.isfinite(torch.from_numpy(out)).all()
    return dt * 1e3 / len(e), {"warmup_s": round(warmup_s, 1)}


def _median_step(step: Any, steps: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _ref_train(cell: Cell) -> float:
    import torch
    import torch.nn.functional as F

    run, arg = _reference(cell)
    v, b = V[cell.dataset], cell.batch
    torch.manual_seed(0)
    flow, optimizer, schedule = run.build_flow(v, v + 3 + 44, arg, 256, 4 - int(cell.dataset[-1]))
    g = torch.Generator().manual_seed(1)
    # A batch as the reference's DataLoader yields it (CaloDataShowerShape: noised, normalised, logit layers).
    batch = {"layer": torch.randn(b, v, generator=g), "layer_p": torch.randn(b, v, generator=g),
             "energy": 10 ** (3 + 3 * torch.rand(b, 1, generator=g)),
             "energy_dep": 6e4 * torch.rand(b, 1, generator=g), "energy_dep_p": 6e4 * torch.rand(b, 1, generator=g),
             "layer_number": torch.randint(1, 45, (b,), generator=g)}

    def step() -> None:  # the loop body of run.train_eval_flow_3, without its printing
        flow.train()
        shower = batch["layer"].to(arg.device)
        cond_inc = torch.log10(batch["energy"].to(arg.device)) - 4.5
        cond_dep = run.logit_trafo(batch["energy_dep"].to(arg.device) / arg.normalization)
        cond_dep_p = run.logit_trafo(batch["energy_dep_p"].to(arg.device) / arg.normalization)
        cond_p = batch["layer_p"].to(arg.device)
        cond_num = F.one_hot(batch["layer_number"] - 1, num_classes=44).to(arg.device)
        cond = torch.vstack([cond_inc.T, cond_dep.T, cond_dep_p.T, cond_p.T, cond_num.T]).T
        loss = -flow.log_prob(shower, cond).mean(0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if arg.which_ds == "2":
            schedule.step()

    return b / _median_step(step, cell.steps)


def _our_train(cell: Cell) -> float:
    import contextlib

    import torch

    from bench.train import raw_pairs
    from hpc_calo.geometry import get_geometry
    from hpc_calo.models import FlowModel

    geo = get_geometry(cell.dataset)
    torch.manual_seed(0)
    model = FlowModel.from_preset(3, geo, cell.dataset).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    raw = raw_pairs(geo.voxels_per_layer, cell.batch, torch.Generator().manual_seed(1))
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if cell.dtype == "bf16" else contextlib.nullcontext()

    def step() -> None:
        with amp:
            loss = model(raw)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return cell.batch / _median_step(step, cell.steps)


def measure(cell: Cell) -> dict[str, Any]:
    """Runs in the cell's own process."""
    import torch

    if cell.cpu is not None:
        os.sched_setaffinity(0, set(range(cell.cpu, cell.cpu + cell.threads)))
    torch.set_num_threads(cell.threads)
    fn = {("chain", "ref"): _ref_chain, ("chain", "ours"): _our_chain, ("train", "ref"): _ref_train,
          ("train", "ours"): _our_train}[(cell.mode, cell.kind)]
    value = fn(cell)
    value, extra = value if isinstance(value, tuple) else (value, {})
    return {"value": value, **extra, "unit": "ms/shower" if cell.mode == "chain" else "samples/s",
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def run_cell(cell: Cell) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    t = time.perf_counter()
    row: dict[str, Any] = {**asdict(cell), "key": cell.key}
    row.pop("ref_dir")
    with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        try:
            row.update(pool.submit(measure, cell).result())
        except Exception as e:  # a cell that fails is reported, the others still run
            row["error"] = f"{type(e).__name__}: {e}"[-800:]
    row.update(wall_s=round(time.perf_counter() - t, 1), load1=round(os.getloadavg()[0], 2))
    return row


def plan(modes: list[str], quick: bool, ref_dir: str, cpu: int | None) -> list[Cell]:
    """The cells of one repetition, reference and ours interleaved."""
    cells: list[Cell] = []
    if "chain" in modes:
        for ds, batch in [("ds2", 100)] if quick else [("ds2", 1000), ("ds3", 100)]:
            cells += [Cell("chain", "ref", ds, "float64", batch, ref_dir=ref_dir, cpu=cpu),
                      Cell("chain", "ours", ds, "float32", batch, cpu=cpu),
                      Cell("chain", "ours", ds, "bf16", batch, cpu=cpu)]
            if not quick:
                cells += [Cell("chain", "ours", ds, dt, batch, cpu=cpu, compile=True) for dt in ("float32", "bf16")]
            if ds == "ds2" and len(os.sched_getaffinity(0)) >= 2:
                cells.append(Cell("chain", "ours", ds, "float32", batch, threads=2, cpu=None))
    if "train" in modes:
        batch, steps = (200, 2) if quick else (1000, 5)
        cells += [Cell("train", "ref", "ds2", "float64", batch, steps=steps, ref_dir=ref_dir, cpu=cpu),
                  Cell("train", "ours", "ds2", "float32", batch, steps=steps, cpu=cpu),
                  Cell("train", "ours", "ds2", "bf16", batch, steps=steps, cpu=cpu)]
    return cells


def summarise(rows: list[dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    by_key: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if "value" in r:
            by_key.setdefault(r["key"], []).append(r)
    med = {k: {"median": statistics.median(x["value"] for x in v), "n": len(v), "unit": v[0]["unit"],
               "batch": v[0]["batch"], "peak_rss_mb": max(x["peak_rss_mb"] for x in v)} for k, v in by_key.items()}
    goals = []
    for what, num, den, goal in GOALS:
        if num in med and den in med:
            ratio = med[num]["median"] / med[den]["median"]
            goals.append({"what": what, "ratio": round(ratio, 2), "goal": goal,
                          "met": None if goal is None else ratio >= goal})
    return med, goals


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.reference", description=__doc__.splitlines()[0])
    p.add_argument("--ref-dir", type=Path, required=True,
                   help="checkout of claudius-krause/inductive-caloflow (its run.py)")
    p.add_argument("--modes", default="chain,train", help="comma-separated subset of chain,train (default both)")
    p.add_argument("--quick", action="store_true", help="DS2 only, batch 100 (chain) / 200 (train), 1 repetition")
    p.add_argument("--reps", type=int, default=3, help="repetitions of every cell (default 3; --quick: 1)")
    p.add_argument("--cpu", type=int, default=None, help="pin the 1-thread cells to this CPU")
    p.add_argument("--out", type=Path, default=Path("bench/results/chain_floor.json"),
                   help="JSON output (default bench/results/chain_floor.json)")
    a = p.parse_args(argv)
    if not (a.ref_dir / "run.py").is_file():
        p.error(f"--ref-dir {a.ref_dir}: no run.py there (a checkout of claudius-krause/inductive-caloflow)")
    cells = plan(a.modes.split(","), a.quick, str(a.ref_dir.resolve()), a.cpu)
    if any(c.mode == "chain" for c in cells) and not any(c.threads == 2 for c in cells):
        print("the 2-thread cell is left out: this process owns one CPU", file=sys.stderr)
    t0 = time.perf_counter()
    rows = []
    for rep in range(1 if a.quick else a.reps):
        for cell in cells:
            rows.append({**run_cell(cell), "rep": rep})
            r = rows[-1]
            got = f"{r['value']:10.2f} {r['unit']:10s} rss {r['peak_rss_mb']} MB" if "value" in r else r["error"]
            print(f"{r['key']:32s} b{r['batch']:<5d} {got} (load {r['load1']})", file=sys.stderr, flush=True)
    med, goals = summarise(rows)
    print("\nkey | batch | median (n) | peak RSS MB", file=sys.stderr)
    for k, m in sorted(med.items()):
        print(f"{k} | {m['batch']} | {m['median']:.2f} {m['unit']} ({m['n']}) | {m['peak_rss_mb']}", file=sys.stderr)
    for g in goals:
        print(f"{g['what']}: {g['ratio']}x (goal {g['goal']})", file=sys.stderr)
    emit({"command": "python -m bench.reference " + " ".join(sys.argv[1:] if argv is None else argv),
          "machine": machine(), "quick": a.quick, "wall_s": round(time.perf_counter() - t0, 1), "medians": med,
          "goals": goals, "cells": rows}, a.out)
    return 0 if all("value" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
