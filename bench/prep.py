"""Benchmark of data_prep: conversion against the HDF5 read floor, memory, store size, training-reader speed.

``python -m bench.prep [--quick] [--ds3-showers N | --ds3-file F] [--codecs] [--out FILE.json]``

Everything that is compared is measured side by side in the same run, interleaved and repeated, and quoted as
medians and ratios: the box these run on is shared and noisy.

- read floor: read and decompress the same HDF5 block by block with ``CaloFile`` (what the converter cannot
  avoid), in 1 process, and in 2 concurrent processes each reading half (the 2-rank floor);
- conversion: ``data_prep.convert`` with 1 rank and under ``mpiexec -n 2``; MB/s of raw float32 voxels;
  the peak RSS of every rank (``getrusage``) recorded by the converter;
- sizes: raw voxels vs HDF5 file vs store;
- training reader: ``ShardedLoader`` pair batches of 1000, preloaded and streamed (a budget of a quarter of
  the share), pairs/s, against forward + backward + Adam step of the ``small`` flow-3 MAF on one CPU thread;
- DS3 full-size memory: convert a 50k-shower synthetic DS3 file with ``--memory-gb 2``, peak RSS per rank;
- ``--codecs``: the codec / chunk-size sweep behind the store's choice (size ratio, write and read MB/s).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.report import emit
from hpc_calo.errors import run_cli

PY = sys.executable
MPIEXEC = str(Path(PY).parent / "mpiexec")

_FLOOR = """
import sys, time
from hpc_calo.io import CaloFile
from data_prep.convert import _block_rows
from hpc_calo.data.store import chunk_showers
path, rank, world = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with CaloFile(path) as f:
    g = f.geometry
    a, b = rank * f.n // world, (rank + 1) * f.n // world
    t = time.perf_counter()
    for blk in f.blocks(_block_rows(g, chunk_showers(g), 2.0, None), start=a, stop=b):
        pass
    print(time.perf_counter() - t)
"""


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def read_floor(path: Path, world: int) -> float:
    """Seconds for `world` concurrent processes to read and decompress the file, each its own half."""
    procs = [
        subprocess.Popen([PY, "-c", _FLOOR, str(path), str(r), str(world)], stdout=subprocess.PIPE, text=True)
        for r in range(world)
    ]
    times = [float(p.communicate()[0]) for p in procs]
    return max(times)


def convert(src: Path, out: Path, ranks: int, memory_gb: float = 2.0) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        PY,
        "-m",
        "data_prep.convert",
        "--dataset",
        _dataset(src),
        str(src),
        "--out",
        str(out),
        "--quiet",
        "--memory-gb",
        str(memory_gb),
    ]
    if ranks > 1:
        cmd = [MPIEXEC, "-n", str(ranks), *cmd]
    subprocess.run(cmd, check=True, capture_output=True)
    from hpc_calo.data import open_store

    return dict(open_store(out).attrs["timing"])


def _dataset(src: Path) -> str:
    from hpc_calo.io import CaloFile

    with CaloFile(src) as f:
        return f.geometry.name


def conversion(src: Path, work: Path, repeats: int) -> dict[str, Any]:
    from hpc_calo.io import CaloFile

    with CaloFile(src) as f:
        raw = f.n * f.geometry.n_voxels * 4
    runs: dict[str, list[float]] = {"floor1": [], "floor2": [], "conv1": [], "conv2": []}
    rss: dict[str, list[float]] = {"conv1": [], "conv2": []}
    for _ in range(repeats):  # interleaved so that load from other users hits every variant alike
        runs["floor1"].append(read_floor(src, 1))
        t = convert(src, work / "c1.zarr", 1)
        runs["conv1"].append(t["last_run_seconds"])
        rss["conv1"] = t["peak_rss_mb_per_rank"]
        runs["floor2"].append(read_floor(src, 2))
        t = convert(src, work / "c2.zarr", 2)
        runs["conv2"].append(t["last_run_seconds"])
        rss["conv2"] = t["peak_rss_mb_per_rank"]
    med = {k: statistics.median(v) for k, v in runs.items()}
    mbps = {k: raw / v / 1e6 for k, v in med.items()}
    store = work / "c1.zarr"
    return {
        "raw_voxel_MB": round(raw / 1e6, 1),
        "repeats": repeats,
        "median_seconds": {k: round(v, 2) for k, v in med.items()},
        "MB_per_s": {k: round(v, 1) for k, v in mbps.items()},
        "conversion_over_floor_1rank": round(med["conv1"] / med["floor1"], 2),
        "conversion_over_floor_2ranks": round(med["conv2"] / med["floor2"], 2),
        "speedup_2ranks_over_1": round(med["conv1"] / med["conv2"], 2),
        "floor_speedup_2_over_1": round(med["floor1"] / med["floor2"], 2),
        "peak_rss_MB_per_rank": rss,
        "sizes_MB": {"raw": round(raw / 1e6, 1), "hdf5": round(du(src) / 1e6, 1), "store": round(du(store) / 1e6, 1)},
    }


def reader(store_path: Path, seconds: float, stream_gb: float | None = None, preload: bool = True) -> dict[str, Any]:
    """Pairs/s of the loader (batch 1000) against one CPU thread training the small flow-3 on such batches.

    Streaming uses ``stream_gb`` (default: a quarter of the share, so that it cannot preload).
    """
    import torch

    from hpc_calo.data import ShardedLoader, open_store

    store = open_store(store_path)
    out: dict[str, Any] = {}
    share = store.n_train * store.geometry.n_voxels * 4
    modes = [("preload", 2 * share / 2**30 + 0.5)] if preload else []
    modes.append(("stream", stream_gb or share / 4 / 2**30))
    for mode, mem in modes:
        t = time.perf_counter()
        loader = ShardedLoader(store, "train", "pairs", batch_size=1000, memory_gb=mem)
        assert loader.mode == mode
        it = iter(loader)
        next(it)  # preloading happens here
        t_first = time.perf_counter() - t
        n, t = 0, time.perf_counter()
        for b in it:
            n += len(b["n"])
            if time.perf_counter() - t > seconds:
                break
        out[mode] = {
            "pairs_per_s": round(n / (time.perf_counter() - t)),
            "first_batch_s": round(t_first, 2),
            "buffer_chunks": loader.buffer_chunks if mode == "stream" else None,
        }
    # One CPU worker training flow-3 (small preset) on the same batch size.
    from hpc_calo.flows.build import build_maf
    from hpc_calo.flows.presets import PRESETS

    torch.set_num_threads(1)
    spec = PRESETS["small"].spec(3, store.geometry)
    flow = build_maf(spec)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1000, spec.features, generator=gen)
    ctx = torch.randn(1000, spec.context, generator=gen)
    steps, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds or steps < 2:
        opt.zero_grad()
        loss = -flow.log_prob(x, context=ctx).mean()
        loss.backward()
        opt.step()
        steps += 1
    train = steps * 1000 / (time.perf_counter() - t)
    out["train_flow3_small_1thread_pairs_per_s"] = round(train)
    for mode, _ in modes:
        out[f"{mode}_over_train"] = round(out[mode]["pairs_per_s"] / train, 1)
    return out


def ds3_memory(src: Path, work: Path) -> dict[str, Any]:
    """Peak RSS per rank converting a full-size DS3 file, and the streamed reader on the result."""
    res: dict[str, Any] = {}
    # A tight budget first (it must bind: smaller read blocks), then the default 2 GB with 1 and 2 ranks.
    for ranks, gb in ((1, 0.75), (2, 2.0), (1, 2.0)):
        t = convert(src, work / "ds3.zarr", ranks, memory_gb=gb)
        res[f"{ranks}_rank_{gb:g}gb"] = {
            "seconds": t["last_run_seconds"],
            "peak_rss_MB_per_rank": t["peak_rss_mb_per_rank"],
        }
    # The DS3 share does not fit a 2 GB budget: the reader streams, as a training worker would.
    res["reader_stream_2gb"] = reader(work / "ds3.zarr", 10.0, stream_gb=2.0, preload=False)
    raw = _n(src) * 40500 * 4
    res["showers"] = _n(src)
    store = du(work / "ds3.zarr")
    res["sizes_MB"] = {"raw": round(raw / 1e6), "hdf5": round(du(src) / 1e6), "store": round(store / 1e6)}
    shutil.rmtree(work / "ds3.zarr")
    return res


def _n(src: Path) -> int:
    from hpc_calo.io import CaloFile

    with CaloFile(src) as f:
        return f.n


def codec_sweep(src: Path, work: Path, n: int) -> list[dict[str, Any]]:
    import zarr
    from zarr.codecs import BloscCodec, ZstdCodec

    from hpc_calo.io import CaloFile

    with CaloFile(src) as f:
        n = min(n, f.n)
        s = f.geometry.layers(f.read(0, n).showers)
    cands = {
        "zstd1": lambda: ZstdCodec(level=1),
        "zstd3": lambda: ZstdCodec(level=3),
        "blosc-zstd1-bitshuffle": lambda: BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle", typesize=4),
        "blosc-zstd3-bitshuffle": lambda: BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle", typesize=4),
        "blosc-zstd1-shuffle": lambda: BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=4),
        "blosc-lz4-5-bitshuffle": lambda: BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=4),
    }
    shower = s[0].nbytes
    rows = []
    for chunk_mib in (1, 4, 16):
        c = max(1, chunk_mib * 2**20 // shower)
        for name, make in cands.items():
            p = work / "codec.zarr"
            shutil.rmtree(p, ignore_errors=True)
            a = zarr.create_array(p, shape=s.shape, chunks=(c, *s.shape[1:]), dtype="f4", compressors=(make(),))
            t = time.perf_counter()
            for k in range(0, n, c):
                a[k : k + c] = s[k : k + c]
            tw = time.perf_counter() - t
            a = zarr.open_array(p, mode="r")
            order = np.random.default_rng(0).permutation(range(0, n, c))
            t = time.perf_counter()
            for k in order:
                a[k : k + c]
            tr = time.perf_counter() - t
            rows.append(
                {
                    "codec": name,
                    "chunk_showers": int(c),
                    "chunk_MiB": chunk_mib,
                    "ratio": round(s.nbytes / du(p), 2),
                    "write_MB_per_s": round(s.nbytes / tw / 1e6),
                    "read_chunks_MB_per_s": round(s.nbytes / tr / 1e6),
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    shutil.rmtree(work / "codec.zarr", ignore_errors=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.prep", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small DS2 file, 1 repeat, no DS3 (a smoke run)")
    p.add_argument("--showers", type=int, default=None, help="DS2 showers to convert (default 20000; quick 2000)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3; quick 1)")
    p.add_argument(
        "--ds3-showers",
        type=int,
        default=0,
        help="also make a synthetic DS3 file of N showers and "
        "record the conversion's peak RSS per rank at --memory-gb 2 (the full-size figure uses 50000)",
    )
    p.add_argument("--ds3-file", type=Path, default=None, help="use this DS3 file for the memory figure instead")
    p.add_argument("--codecs", action="store_true", help="also run the codec / chunk-size sweep")
    p.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    showers = args.showers or (2000 if args.quick else 20000)
    repeats = args.repeats or (1 if args.quick else 3)

    from data_prep.synth import write_synthetic

    work = Path(tempfile.mkdtemp(prefix="bench_prep_", dir=args.workdir))
    try:
        src = write_synthetic(work / "ds2.h5", "ds2", showers, seed=1)
        result: dict[str, Any] = {
            "machine": "2-core shared CPU box, no GPU",
            "date": time.strftime("%Y-%m-%d"),
            "ds2_showers": showers,
            "conversion": conversion(src, work, repeats),
            "reader": reader(work / "c1.zarr", 2.0 if args.quick else 5.0),
        }
        if args.codecs:
            result["codecs"] = codec_sweep(src, work, 8000)
        ds3 = args.ds3_file
        if ds3 is None and args.ds3_showers:
            t = time.perf_counter()
            ds3 = write_synthetic(work / "ds3.h5", "ds3", args.ds3_showers, seed=5)
            result["ds3_synth_seconds"] = round(time.perf_counter() - t)
        if ds3 is not None:
            result["ds3_memory"] = ds3_memory(ds3, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    run_cli(main)
