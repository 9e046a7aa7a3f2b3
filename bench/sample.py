"""Full-chain generation time, ms per shower: teacher, plain-nflows student, fast student; DS2 and DS3.

``python -m bench.sample [--quick] [--device cpu|cuda] [--out FILE.json]``

Every chain is the real ``hpc_calo.generate.Chain`` (flow-1 MAF, flow-2, 44 x flow-3, preprocessing and its
inverse, threshold) at the reference architectures with random weights. Variants:

- ``teacher``: flows 2/3 teacher MAFs through plain nflows (V sequential full MADE passes per layer);
  ``fast_teacher``: the same MAFs through ``hpc_calo.flows.fast.FastMAF`` (each MADE unit computed once);
- ``nflows_student``: the students through plain nflows (``flow._transform.inverse``) — in float64 this is the
  reference stand-in (the reference code runs its students so);
- ``fast``: ``Chain.use_fast_samplers()``, what production runs: students through
  ``hpc_calo.flows.fast.FastStudent`` and flow-1 through ``FastMAF`` (eager); ``fast_compiled`` with the
  ``torch.compile``d student spline; ``fast_bf16`` with the student GEMMs in bf16 (float32 spline);
  ``fast_bf16_compiled`` both.

A cell is timed as the whole chain where that fits the per-cell cap; otherwise it is composed from measured
parts, ``head`` (flow-1, flow-2, first decode) + 44 x ``step`` (one flow-3 layer with its preprocessing, the
exact loop body of Chain), and marked ``"how": "composed"``; cells predicted to exceed the cap even so are
``"skipped"`` with their prediction. Ratios are taken within this one run (the box is shared and noisy).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch

from bench.report import emit
from hpc_calo.generate import Chain, _RowNoise
from hpc_calo.geometry import E_INC_MAX_MEV, E_INC_MIN_MEV, N_LAYERS, get_geometry
from hpc_calo.models import FlowModel


def build_chain(dataset: str, student: bool, dtype: torch.dtype, device: str, seed: int = 0,
                preset: str | None = None) -> Chain:
    """Random weights of ``preset`` (default: the dataset's reference architecture)."""
    torch.manual_seed(seed)
    geo = get_geometry(dataset)
    flows = {k: FlowModel.from_preset(k, geo, preset or dataset, student=student and k > 1).to(device, dtype).eval()
             for k in (1, 2, 3)}
    return Chain(flows, geo, (E_INC_MIN_MEV, E_INC_MAX_MEV))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _energies(n: int, seed: int) -> np.ndarray:
    u = np.random.default_rng(seed).random(n)
    return E_INC_MIN_MEV * (E_INC_MAX_MEV / E_INC_MIN_MEV) ** u


@torch.no_grad()
def parts(chain: Chain, batch: int, device: str) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """``head()`` and ``step()``: the chain's first part and one flow-3 layer, exactly as Chain runs them."""
    e = torch.as_tensor(_energies(batch, 1), device=device, dtype=chain.dtype)
    noise = _RowNoise(0, 0, batch, torch.device(device), chain.dtype)
    layer_e, layer0 = chain.head(e, noise)
    state = {"n": 1, "layer": layer0}

    def head() -> torch.Tensor:
        return chain.head(e, noise)[1]

    def step() -> torch.Tensor:
        n = state["n"]
        state["layer"] = chain.next_layer(e, layer_e, state["layer"], n, noise)
        state["n"] = n % (N_LAYERS - 1) + 1
        return state["layer"]

    return head, step


def _time(fn: Callable[[], Any], device: str, reps: int, budget_s: float) -> tuple[float, int]:
    """Median seconds of ``fn`` over up to ``reps`` runs (fewer when one run eats the budget); one warm-up."""
    with torch.no_grad():
        t = time.perf_counter()
        fn()
        _sync(device)
        first = time.perf_counter() - t
        times = []
        n = max(1, min(reps, int(budget_s / max(first, 1e-9))))
        for _ in range(n):
            t = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t)
    return statistics.median(times), n


def time_cell(chain: Chain, batch: int, device: str, reps: int, cap_s: float, predicted_s: float | None
              ) -> dict[str, Any]:
    """``predicted_s``: the expected seconds of ONE flow-3 layer at this batch; skip when that exceeds the cap."""
    if predicted_s is not None and predicted_s > cap_s:
        return {"how": "skipped", "predicted_layer_s": round(predicted_s, 1)}
    head, step = parts(chain, batch, device)
    t_step, n_step = _time(step, device, reps, cap_s / 4)
    t_head, n_head = _time(head, device, reps, cap_s / 8)
    composed = t_head + (N_LAYERS - 1) * t_step
    out: dict[str, Any] = {"ms_per_shower": composed * 1e3 / batch, "how": "composed",
                           "head_ms_per_shower": t_head * 1e3 / batch, "layer_ms_per_shower": t_step * 1e3 / batch,
                           "reps": min(n_step, n_head)}
    if composed <= cap_s:
        e = _energies(batch, 2)
        t_full, n_full = _time(lambda: chain._sample_rows(torch.as_tensor(e, device=device, dtype=chain.dtype),
                                                          _RowNoise(0, 0, batch, torch.device(device), chain.dtype)),
                               device, reps, cap_s)
        out.update(ms_per_shower=t_full * 1e3 / batch, how="full", reps=n_full,
                   composed_ms_per_shower=composed * 1e3 / batch)
    return out


VARIANTS = ("teacher", "fast_teacher", "nflows_student", "fast", "fast_compiled", "fast_bf16", "fast_bf16_compiled")


def make_chain(variant: str, dataset: str, dtype: torch.dtype, device: str) -> Chain:
    chain = build_chain(dataset, variant not in ("teacher", "fast_teacher"), dtype, device)
    if variant.startswith("fast"):
        chain.use_fast_samplers(compile=variant.endswith("_compiled"),
                                matmul_dtype=torch.bfloat16 if "_bf16" in variant else None)
    return chain


def plan(quick: bool) -> list[tuple[str, str, torch.dtype, list[int]]]:
    """(dataset, variant, dtype, batches): the cells of one run, cheapest first within each group."""
    f32, f64 = torch.float32, torch.float64
    if quick:
        return [("ds2", v, d, [1, 100]) for v, d in
                (("nflows_student", f64), ("nflows_student", f32), ("fast", f32), ("fast", f64))]
    cells = []
    for ds in ("ds2", "ds3"):
        batches = [1, 100, 1000, 10000]
        cells += [(ds, "nflows_student", f64, batches), (ds, "nflows_student", f32, batches),
                  (ds, "fast", f32, batches), (ds, "fast", f64, batches),
                  (ds, "fast_bf16", f32, [1000, 10000]), (ds, "fast_teacher", f32, [100, 1000, 10000]),
                  (ds, "teacher", f64, [1, 100]), (ds, "teacher", f32, [1, 100])]
    cells.insert(5, ("ds2", "fast_compiled", f32, [1000, 10000]))
    cells.insert(6, ("ds2", "fast_bf16_compiled", f32, [1000, 10000]))
    return cells


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sample", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="DS2 only, batches 1 and 100, students only (~1 min)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device (default cpu)")
    p.add_argument("--cap", type=float, default=25.0, help="seconds one timed chain may take (default 25)")
    p.add_argument("--reps", type=int, default=5, help="max repetitions per timing (default 5)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared box, 2 threads make every small op wait for a "
                        "descheduled thread, 20x slower at batch 1); 0: torch's default")
    p.add_argument("--variants", help=f"comma-separated subset of {','.join(VARIANTS)} (default all)")
    p.add_argument("--datasets", default="ds2,ds3", help="comma-separated subset of ds2,ds3 (default both)")
    p.add_argument("--batches", help="comma-separated batch sizes to keep (default: each variant's plan)")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results: list[dict[str, Any]] = []
    variants = set(args.variants.split(",")) if args.variants else set(VARIANTS)
    keep = {int(b) for b in args.batches.split(",")} if args.batches else None
    if variants - set(VARIANTS):
        p.error(f"--variants: unknown {', '.join(sorted(variants - set(VARIANTS)))}")
    for ds, variant, dtype, batches in plan(args.quick):
        batches = [b for b in batches if keep is None or b in keep]
        if variant not in variants or ds not in args.datasets.split(",") or not batches:
            continue
        t_build = time.perf_counter()
        chain = make_chain(variant, ds, dtype, args.device)
        if variant.endswith("_compiled"):  # compile once, outside the timings; report its cost
            parts(chain, batches[0], args.device)[1]()
        build_s = time.perf_counter() - t_build
        prev: tuple[int, float] | None = None
        for b in batches:
            # Predicted seconds of one layer: its ms/shower at the last smaller batch (an upper bound) x showers;
            # batch 1 is dominated by per-op overhead, so it predicts nothing.
            predicted = None if prev is None or prev[0] < 100 else prev[1] * 1e-3 * b
            cell = time_cell(chain, b, args.device, args.reps, args.cap, predicted)
            cell.update(dataset=ds, variant=variant, dtype=str(dtype).removeprefix("torch."), batch=b,
                        setup_s=round(build_s, 2))
            results.append(cell)
            print(json.dumps(cell), file=sys.stderr, flush=True)
            if "layer_ms_per_shower" in cell:
                prev = (b, cell["layer_ms_per_shower"])
        del chain
    ratios = {}
    for r in results:
        ref = next((x for x in results if x["dataset"] == r["dataset"] and x["batch"] == r["batch"]
                    and x["variant"] == "nflows_student" and x["dtype"] == "float64" and "ms_per_shower" in x), None)
        if ref and "ms_per_shower" in r:
            ratios[f"{r['dataset']}/{r['variant']}/{r['dtype']}/b{r['batch']}"] = round(
                ref["ms_per_shower"] / r["ms_per_shower"], 2)
    report = {
        "bench": "sample", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": "2-core shared CPU box, no GPU, other jobs running" if args.device == "cpu" else args.device,
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "quick": args.quick, "wall_s": round(time.perf_counter() - t0, 1),
        "speedup_vs_float64_nflows_student": ratios, "cells": results,
    }
    emit(report, args.out, indent=1)
    return 0 if all(math.isfinite(c.get("ms_per_shower", 0.0)) for c in results) else 1


if __name__ == "__main__":
    sys.exit(main())
