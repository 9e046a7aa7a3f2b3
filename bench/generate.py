"""Teacher generation time per shower on CPU (reference architecture, random weights), float32 and float64.

A MAF samples sequentially: per flow, ``features`` passes of every MADE block, each pass evaluating the MADE
and the spline. A DS2 chain is 8 x 45 = 360 flow-1 passes plus 8 x 45 x 144 = 51,840 flow-2/3 passes (DS3:
324,000) -- hours per batch on one shared core. So this measures (a) flow-1 sampling end to end and (b) the
median time of single flow-3 passes (the same loop nflows runs), and EXTRAPOLATES the chain:
``ms/shower = (t_flow1 + 8 x 45 x F x t_pass3) / batch`` (flow-2 passes are priced as flow-3 passes,
an upper bound: its MADE has a 2-dim context). ``python -m bench.generate [--quick] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence

import torch

from bench.report import emit
from hpc_calo.flows import maf_step
from hpc_calo.geometry import N_LAYERS, get_geometry
from hpc_calo.models import FlowModel


def pass_time(model: FlowModel, batch: int, passes: int) -> float:
    """Median seconds of one sequential MAF pass (MADE + spline on all features), as nflows' inverse runs it."""
    f, c = model.spec.features, model.spec.context
    g = torch.Generator().manual_seed(0)
    z = torch.randn(batch, f, generator=g).to(model.dtype)
    ctx = torch.randn(batch, c, generator=g).to(model.dtype)
    out = torch.zeros_like(z)
    times = []
    with torch.no_grad():
        for i in range(passes + 1):
            t = time.perf_counter()
            out = maf_step(model.flow, out, z, ctx).clamp(-10, 10)
            if i:
                times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench(dataset: str, batch: int, dtype: torch.dtype, passes: int) -> dict[str, float | str | int]:
    geo = get_geometry(dataset)
    torch.manual_seed(0)
    f1 = FlowModel.from_preset(1, geo, dataset).to(dtype).eval()
    f3 = FlowModel.from_preset(3, geo, dataset).to(dtype).eval()
    e = torch.logspace(3, 6, batch, dtype=dtype)
    t = time.perf_counter()
    f1.sample(f1.context1(e), torch.Generator().manual_seed(0))
    t1 = time.perf_counter() - t
    tp = pass_time(f3, batch, passes)
    v = geo.voxels_per_layer
    n_pass = f3.spec.blocks * (v + (N_LAYERS - 1) * v)
    total = t1 + n_pass * tp
    return {"dataset": dataset, "dtype": str(dtype).removeprefix("torch."), "batch": batch,
            "flow1_s_measured": t1, "flow3_pass_ms_measured": tp * 1e3, "passes_flows_2_3": n_pass,
            "chain_ms_per_shower_extrapolated": total * 1e3 / batch}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.generate", description=__doc__)
    p.add_argument("--quick", action="store_true", help="DS2 only, fewer passes")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    passes = 3 if args.quick else 7
    results = []
    for ds in ("ds2",) if args.quick else ("ds2", "ds3"):
        for batch in (100, 1000):
            for dt in (torch.float32, torch.float64):
                results.append(bench(ds, batch, dt, passes))
                print(json.dumps(results[-1]), flush=True)
    out = {"bench": "teacher chain generation on CPU, 1 thread", "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "results": results}
    emit(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
