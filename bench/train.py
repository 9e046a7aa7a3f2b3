"""Teacher training throughput: flow-3 samples/s per core at the DS2 and DS3 reference sizes.

One optimiser step = preprocessing of a raw random batch + forward + backward + Adam step, torch on one thread.
Prints and writes JSON. ``python -m bench.train [--quick] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Sequence

import torch

from bench.report import emit
from hpc_calo.geometry import get_geometry
from hpc_calo.models import FlowModel


def raw_pairs(v: int, b: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    prev = torch.rand(b, v, generator=g) * (torch.rand(b, v, generator=g) > 0.7)
    cur = torch.rand(b, v, generator=g) * (torch.rand(b, v, generator=g) > 0.7)
    return {"e_inc": 10 ** (3 + 3 * torch.rand(b, generator=g)), "prev": prev, "cur": cur,
            "e_prev": prev.sum(1), "e_cur": cur.sum(1), "n": torch.randint(1, 45, (b,), generator=g)}


def bench_flow3(dataset: str, batch: int, steps: int, dtype: torch.dtype) -> dict[str, float]:
    geo = get_geometry(dataset)
    torch.manual_seed(0)
    model = FlowModel.from_preset(3, geo, dataset).to(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps + 1):  # the first step is warm-up
        raw = raw_pairs(geo.voxels_per_layer, batch, g)
        t = time.perf_counter()
        loss = model(raw)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {"dataset": dataset, "dtype": str(dtype).removeprefix("torch."), "batch": batch, "steps": steps,
            "step_s_median": med, "samples_per_s_per_core": batch / med}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer steps and smaller batches")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    steps = 2 if args.quick else 5
    runs = [("ds2", 100 if args.quick else 500), ("ds3", 20 if args.quick else 100)]
    results = [bench_flow3(ds, b, steps, torch.float32) for ds, b in runs]
    out = {"bench": "teacher flow-3 training, 1 thread", "torch": torch.__version__, "machine": platform.machine(),
           "date": time.strftime("%Y-%m-%d"), "results": results}
    emit(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
