"""Benchmark the synthetic generator: showers/s on one core for DS2 and DS3, and its distributions.

``python -m bench.synth [--quick] [--out FILE.json]`` pins itself to one CPU core, times the generation alone
(``generate_blocks``) and the full file write (gzip and none), repeated, and prints medians as JSON together
with summary statistics of the showers (response, shower-maximum layer, sparsity) for the README comparison.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench.report import emit
from data_prep.synth import generate_blocks, write_synthetic
from hpc_calo.errors import run_cli
from hpc_calo.geometry import DS2, DS3, Geometry


def _time_generation(geometry: Geometry, n: int, seed: int) -> tuple[float, float]:
    """Showers per wall second and per CPU second (the latter is robust on a shared, oversubscribed box)."""
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in generate_blocks(geometry, n, seed, block_size=1024):
        pass
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def _time_write(geometry: Geometry, n: int, seed: int, compression: str) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.h5"
        t0 = time.perf_counter()
        write_synthetic(path, geometry.name, n, seed, compression)
        rate = n / (time.perf_counter() - t0)
        return rate, path.stat().st_size


def _distributions(geometry: Geometry, n: int, seed: int) -> dict[str, object]:
    e_parts, layer_parts, zeros, total = [], [], np.zeros(geometry.n_layers), 0
    for e, s in generate_blocks(geometry, n, seed, block_size=1024):
        layers = geometry.layers(s)
        e_parts.append(e)
        layer_parts.append(layers.sum(axis=2, dtype=np.float64))
        zeros += (layers == 0).sum(axis=(0, 2))
        total += len(e)
    e, layer_e = np.concatenate(e_parts), np.concatenate(layer_parts)
    response = layer_e.sum(axis=1) / e
    out: dict[str, object] = {
        "n": int(n),
        "response_mean": float(response.mean()),
        "response_std": float(response.std()),
        "response_median": float(np.median(response)),
        "sparsity": float(zeros.sum() / (total * geometry.n_voxels)),
        "sparsity_per_layer": [round(float(x), 3) for x in zeros / (total * geometry.voxels_per_layer)],
    }
    frac = layer_e / layer_e.sum(axis=1, keepdims=True)
    cog = frac @ np.arange(geometry.n_layers)
    decades = {}
    for lo in (1e3, 1e4, 1e5):
        m = (e >= lo) & (e < 10 * lo)
        mean_profile = frac[m].mean(axis=0)
        decades[f"{lo / 1e3:g}-{lo / 1e2:g} GeV"] = {
            "n": int(m.sum()),
            "response_mean": float(response[m].mean()),
            "response_std": float(response[m].std()),
            "max_layer_of_mean_profile": int(mean_profile.argmax()),
            "centre_of_gravity_layer": float(cog[m].mean()),
        }
    out["per_decade"] = decades
    out["mean_profile_all"] = [round(float(x), 5) for x in frac.mean(axis=0)]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.synth", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer showers and repeats (about 30 s)")
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (default 3, quick 1)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    n = {"ds2": 1024 if args.quick else 4096, "ds3": 256 if args.quick else 1024}
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, as the figures claim
    result: dict[str, object] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": platform.node(),
        "cpu_cores_used": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_1min": os.getloadavg()[0],
        "quick": args.quick,
        "repeats": repeats,
    }
    for geometry in (DS2, DS3):
        k = n[geometry.name]
        gen = [_time_generation(geometry, k, seed=100 + i) for i in range(repeats)]
        writes = {c: [_time_write(geometry, k, 200 + i, c) for i in range(repeats)] for c in ("gzip", "none")}
        result[geometry.name] = {
            "showers": k,
            "generate_showers_per_s": statistics.median(w for w, _ in gen),
            "generate_showers_per_cpu_s": statistics.median(c for _, c in gen),
            **{f"write_{c}_showers_per_s": statistics.median(r for r, _ in w) for c, w in writes.items()},
            **{f"bytes_per_shower_{c}": w[0][1] / k for c, w in writes.items()},
            "distributions": _distributions(geometry, 10000 if geometry is DS2 and not args.quick else k, 7),
        }
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    run_cli(main)
