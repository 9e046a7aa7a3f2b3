"""Stream the shard parts, in shard order, into one CaloChallenge HDF5 in bounded memory.

Memory: one re-blocking buffer of about ``block_bytes`` (rows read straight into it with ``read_direct``) plus
HDF5's chunk caches and the writer's chunks in flight; nothing scales with N. Each part is verified on the way
through (its manifest sha256, that its incident energies are the plan's, finite non-negative voxels); a bad
part is deleted with its record so that re-running the same command regenerates just that shard.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from hpc_calo.errors import UserError
from hpc_calo.io import CaloFile, CaloWriter
from hpc_calo.io.hdf5 import E_KEY, S_KEY, rows_for_bytes
from hpc_calo.sample.parts import PartsDir
from hpc_calo.sample.plan import Plan

BLOCK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Gathered:
    path: str
    n: int
    seconds: float
    bytes: int


def gather(
    plan: Plan,
    parts: PartsDir,
    out: str | os.PathLike[str],
    compression: str = "gzip",
    keep_parts: bool = False,
    block_bytes: int = BLOCK_BYTES,
    progress: bool = True,
) -> Gathered:
    out = Path(out)
    t0 = time.perf_counter()
    done = parts.finished(plan)
    if not done.all():
        raise UserError(
            f"{parts.path}: {int((~done).sum())} of {len(plan.shards)} shards are not generated yet "
            f"(first: {int(np.argmin(done))}); re-run the same command to generate them"
        )
    del done
    geo = plan.geometry
    rows = min(rows_for_bytes(geo.n_voxels, block_bytes), plan.n)
    e_buf = np.empty(rows, dtype=np.float64)
    s_buf = np.empty((rows, geo.n_voxels), dtype=np.float32)
    attrs = {"generator": "hpc-calo", "request_fingerprint": plan.fingerprint, "dataset": geo.name,
             "renormalise": plan.request.renormalise, "compile": plan.request.compile}
    bar = tqdm(total=plan.n, unit="shower", unit_scale=True, desc="gather", disable=not progress, mininterval=1)
    with CaloWriter(out, geo, n_total=plan.n, compression=compression, attrs=attrs) as writer:
        fill = 0
        for shard in plan.shards:
            path = parts.part_path(shard.index)

            def bad(why: str, path: Path = path, index: int = shard.index) -> UserError:
                parts.discard(index)
                return UserError(f"{path}: {why}; removed it, re-run the same command to regenerate it")

            record = parts.valid(plan, shard.index)  # one record at a time: nothing per shard is kept
            if record is None:
                raise bad("its record went missing or changed during the gather")
            try:
                f = h5py.File(path, "r")
            except OSError:
                raise bad("unreadable part file") from None
            with f:
                e_ds, s_ds = f.get(E_KEY), f.get(S_KEY)
                if e_ds is None or s_ds is None or s_ds.shape != (shard.count, geo.n_voxels):
                    raise bad("wrong keys or shapes")
                energies = np.asarray(e_ds[:, 0], dtype=np.float64)
                if not np.array_equal(energies, plan.energies(shard)):
                    raise bad("incident energies differ from the request's")
                digest = hashlib.sha256(energies.data)
                done = 0
                while done < shard.count:
                    take = min(rows - fill, shard.count - done)
                    dest = s_buf[fill : fill + take]
                    try:
                        s_ds.read_direct(s_buf, np.s_[done : done + take], np.s_[fill : fill + take])
                    except OSError:
                        raise bad("unreadable rows (truncated part file)") from None
                    digest.update(dest.data)
                    lo, hi = dest.min(), dest.max()
                    if not (lo >= 0 and np.isfinite(hi)):
                        raise bad("showers contain negative, NaN or inf values")
                    e_buf[fill : fill + take] = energies[done : done + take]
                    fill += take
                    done += take
                    if fill == rows:
                        writer.write(e_buf, s_buf)
                        fill = 0
                    bar.update(take)
                if digest.hexdigest() != record["sha256"]:
                    raise bad("contents do not match the sha256 in its manifest record")
        if fill:
            writer.write(e_buf[:fill], s_buf[:fill])
    bar.close()
    del e_buf, s_buf
    with CaloFile(out, geo) as f:  # structure, dataset and count of what a reader will see
        if f.n != plan.n:
            raise RuntimeError(f"{out}: holds {f.n} showers after the gather, expected {plan.n}")
    if keep_parts:
        parts.clean_temps(plan)
    else:
        parts.remove(plan)
    return Gathered(path=str(out), n=plan.n, seconds=time.perf_counter() - t0, bytes=out.stat().st_size)
