"""The vectorised spline (hpc_calo.flows.spline) against nflows' own, in a teacher training step.

python -m bench.spline [--presets quickstart small] [--batches 256 1000] [--steps 12] [--threads 1] [--out FILE]

For each preset and batch size: flow-3's teacher (DS2 geometry) built twice with the same weights, once with the
blocks of hpc_calo.flows.build (new) and once with nflows' stock MaskedPiecewiseRationalQuadraticAutoregressive-
Transform (old). One training step is forward + backward of the mean negative log-likelihood + Adam; the two are
timed interleaved, step by step, on the same random batch, and the median over steps (after 2 warm-up steps each)
is reported with the speed-up. Also reports the largest relative difference of the two log-likelihoods.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from nflows import transforms

from bench.report import emit, machine
from hpc_calo.flows import build
from hpc_calo.flows.presets import get_preset
from hpc_calo.geometry import DS2

WARMUP = 2


def flows(preset: str) -> tuple[torch.nn.Module, torch.nn.Module, int, int]:
    spec = get_preset(preset).spec(3, DS2)
    torch.manual_seed(0)
    new = build.build_maf(spec)
    torch.manual_seed(0)
    old = build.build_maf(spec)
    for t in old._transform._transforms:
        if isinstance(t, build.SplineAutoregressiveTransform):
            t.__class__ = transforms.MaskedPiecewiseRationalQuadraticAutoregressiveTransform  # nflows' spline
    old.load_state_dict(new.state_dict())
    return old, new, spec.features, spec.context


def case(preset: str, batch: int, steps: int) -> dict[str, Any]:
    old, new, features, context = flows(preset)
    g = torch.Generator().manual_seed(1)
    x = 4 * torch.randn(batch, features, generator=g)  # a few beyond the tail bound, as preprocessed voxels are
    c = torch.randn(batch, context, generator=g)
    with torch.no_grad():
        lp_old, lp_new = old.log_prob(x, c), new.log_prob(x, c)
    flows_ = {"old": old, "new": new}
    opts = {k: torch.optim.Adam(f.parameters(), lr=1e-6) for k, f in flows_.items()}
    times: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(steps + WARMUP):
        for k, f in flows_.items():
            t = time.perf_counter()
            opts[k].zero_grad(set_to_none=True)
            loss = -f.log_prob(x, c).mean()
            loss.backward()
            opts[k].step()
            times[k].append(time.perf_counter() - t)
    ms = {k: 1e3 * statistics.median(v[WARMUP:]) for k, v in times.items()}
    return {"preset": preset, "batch": batch, "features": features, "steps": steps,
            "old_ms": round(ms["old"], 1), "new_ms": round(ms["new"], 1), "speedup": round(ms["old"] / ms["new"], 2),
            "max_rel_diff_log_prob": float(((lp_new - lp_old).abs() / lp_old.abs()).max())}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.spline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["quickstart", "small"], help="(default quickstart small)")
    p.add_argument("--batches", nargs="+", type=int, default=[256, 1000], help="batch sizes (default 256 1000)")
    p.add_argument("--steps", type=int, default=12, help="timed training steps per flow and case (default 12)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here (bench/results/spline.json)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    cases = [case(preset, batch, a.steps) for preset in a.presets for batch in a.batches]
    emit({"command": "python -m bench.spline " + " ".join(sys.argv[1:] if argv is None else argv),
          "machine": machine(), "threads": torch.get_num_threads(), "flow": 3, "geometry": "ds2",
          "wall_s": round(time.perf_counter() - t0, 1), "cases": cases}, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
