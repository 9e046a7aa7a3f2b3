"""Convert CaloChallenge HDF5 files into the Zarr pair store that training reads.

``python -m data_prep.convert --dataset ds2 IN.h5 [IN2.h5 ...] --out STORE.zarr`` on one process, or the same
command under ``mpiexec -n N`` / ``srun -n N``: the ranks split the output chunks among them.

Why it is shaped like this:
- every rank owns whole output chunks (zarr chunk files are written whole, so ranks never touch the same file);
  the work list is the chunks not yet marked done, cut into one contiguous run per rank so each rank reads its
  input rows sequentially, block by block, with memory bounded by ``--memory-gb``;
- rank 0 validates the inputs' structure and creates the store before anyone writes; values (NaN, negative
  energies) are checked as the blocks stream by, and the ranks agree at every block boundary whether one of
  them failed, so an error on one rank never leaves the others hanging;
- a chunk is marked done (``<split>/done``) only after it is written, and ``complete`` is written last: a killed
  run leaves a store that readers refuse and that the same command resumes, ending byte-identical to an
  uninterrupted run.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from hpc_calo import __version__
from hpc_calo.data import store as fmt
from hpc_calo.digest import file_sha256, fingerprint
from hpc_calo.errors import UserError, abort_world, run_cli
from hpc_calo.flags import number, positive_int
from hpc_calo.geometry import DATASETS, Geometry, get_geometry
from hpc_calo.io import Block, CaloFile
from hpc_calo.io.check import check_block
from hpc_calo.mpi import mpi_module, plan_on_rank0
from hpc_calo.outputs import PAIR_STORE, claim, refuse_inputs, storage_error

CONVERTER_VERSION = f"hpc-calo {__version__} data_prep.convert 1"
# What the interpreter, numpy, h5py, zarr and MPI take before any data (measured ~200 MB; rounded up).
BASE_BYTES = 300 * 2**20
# Larger read blocks do not read faster; they only cost memory.
MAX_BLOCK_BYTES = 128 * 2**20


@dataclass(frozen=True)
class ConvertRequest:
    """One conversion: CaloChallenge files in (concatenated in order), one pair store out."""

    inputs: tuple[str, ...]
    dataset: str
    out: Path
    val_fraction: float = 0.1
    memory_gb: float = 2.0  # peak memory budget per rank
    overwrite: bool = False
    repair: bool = False  # re-read every chunk of an existing store and convert the damaged ones again
    chunk_showers: int | None = None
    block_showers: int | None = None
    quiet: bool = False
    # Called on every rank after each block it converted, with how many it has done (progress, fault injection).
    after_block: Callable[[int], None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise UserError("give at least one CaloChallenge input file")
        if self.dataset not in DATASETS:
            raise UserError(f"--dataset must be one of {', '.join(sorted(DATASETS))}, not {self.dataset!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"--val-fraction must be in [0, 1), not {self.val_fraction}")
        if not self.memory_gb > 0:
            raise UserError(f"--memory-gb must be positive, not {self.memory_gb}")


# ------------------------------------------------------------------------------------------------ MPI


class _SerialComm:
    """The few mpi4py calls used here, for a single process without MPI."""

    rank, size = 0, 1

    def Get_rank(self) -> int:
        return 0

    def Get_size(self) -> int:
        return 1

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj

    def allgather(self, obj: Any) -> list[Any]:
        return [obj]

    def allreduce(self, obj: Any, op: Any = None) -> Any:
        return obj

    def barrier(self) -> None:
        pass

    def Abort(self, code: int = 1) -> None:
        os._exit(code)


def get_comm() -> Any:
    """COMM_WORLD when mpi4py and an MPI library are present (a lone process is a world of one), else serial."""
    try:
        return mpi_module().COMM_WORLD
    except (ImportError, RuntimeError):
        return _SerialComm()


# ------------------------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class Source:
    path: str
    n: int
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Plan:
    """What every rank needs, decided by rank 0."""

    geometry_name: str
    sources: list[Source]
    n_train: int
    n_val: int
    chunk: int
    block_rows: int
    pending: list[tuple[str, int]]  # (split, chunk index) still to write
    complete: bool = False
    offsets: list[int] = field(default_factory=list)  # global first row of each source

    def chunk_rows(self, split: str, k: int) -> tuple[int, int]:
        """Global input rows [a, b) of chunk k of a split (train first, then val)."""
        n, base = (self.n_train, 0) if split == "train" else (self.n_val, self.n_train)
        return base + k * self.chunk, base + min((k + 1) * self.chunk, n)


def _describe(path: Path, geometry: Geometry, several: bool) -> Source:
    """Open the file (structure checked) and say which dataset it is when it is the wrong one."""
    try:
        with CaloFile(path) as f:
            n = f.n
    except UserError as err:
        msg = str(err) if str(path) in str(err) else f"{path}: {err}"
        raise UserError(f"{msg} (expected a {geometry.name} file)") from None
    if f.geometry.name != geometry.name:
        raise UserError(
            f"{path}: this is a {f.geometry.name} file ({f.geometry.n_voxels} voxels per shower) but --dataset is "
            f"{geometry.name} ({geometry.n_voxels})"
            + ("; files of different datasets cannot be mixed" if several else "")
        )
    if n == 0:
        raise UserError(f"{path}: the file holds no showers")
    st = path.stat()
    return Source(str(path.resolve()), n, st.st_size, st.st_mtime_ns)


def _request(geometry: Geometry, sources: list[Source], val_fraction: float, chunk: int) -> dict[str, Any]:
    """Everything that determines the store's content; a resume requires the same request."""
    return {
        "format_version": fmt.FORMAT_VERSION,
        "dataset": geometry.name,
        "val_fraction": val_fraction,
        "chunk_showers": chunk,
        "codec": fmt.CODEC,
        "sources": [asdict(s) for s in sources],
    }


def _block_rows(geometry: Geometry, chunk: int, memory_gb: float, block_showers: int | None) -> int:
    row_bytes = 4 * geometry.n_voxels
    # Two blocks live at once (one read, one written by the writer thread), plus a concatenation across a
    # file boundary and allocator slack: budget four.
    avail = int(memory_gb * 2**30) - BASE_BYTES
    fit = min(MAX_BLOCK_BYTES, avail // 4) // row_bytes
    if fit < chunk:
        need = (BASE_BYTES + 4 * chunk * row_bytes) / 2**30
        raise UserError(f"--memory-gb {memory_gb:g} is too small: one {geometry.name} chunk needs {need:.2f} GB")
    rows = block_showers or fit
    return max(chunk, rows - rows % chunk)


def prepare(args: ConvertRequest) -> Plan:
    """Rank 0: validate the inputs, decide create / resume / nothing to do, create the store if new."""
    geometry = get_geometry(args.dataset)
    refuse_inputs(args.out, args.inputs)
    sources = [_describe(Path(p), geometry, len(args.inputs) > 1) for p in args.inputs]
    n_total = sum(s.n for s in sources)
    n_train, n_val = fmt.split_sizes(n_total, args.val_fraction)
    if n_train < 1:
        raise UserError(f"--val-fraction {args.val_fraction} leaves no training showers out of {n_total}")
    chunk = args.chunk_showers or fmt.chunk_showers(geometry)
    block_rows = _block_rows(geometry, chunk, args.memory_gb, args.block_showers)
    request = _request(geometry, sources, args.val_fraction, chunk)
    request_fingerprint = fingerprint(request)
    out: Path = args.out
    offsets = list(np.cumsum([0] + [s.n for s in sources[:-1]]).tolist())
    plan = dict(
        geometry_name=geometry.name,
        sources=sources,
        n_train=n_train,
        n_val=n_val,
        chunk=chunk,
        block_rows=block_rows,
        offsets=offsets,
    )

    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty directory (e.g. made by a job script) holds nothing to protect
    claim(out, PAIR_STORE)  # anything else at --out is refused, --overwrite or not
    existing = fmt.read_attrs(out) if out.exists() else None
    if out.exists() and args.overwrite:
        shutil.rmtree(out)
        existing = None
    elif out.exists():
        assert existing is not None  # claim() refused anything but a pair store
        if existing.get("request_fingerprint") != request_fingerprint:
            state = "complete" if existing.get("complete") else "incomplete"
            raise UserError(
                f"{out}: holds a {state} store of a different request (other inputs or options); "
                "choose another --out, or pass --overwrite to replace it"
            )
        if args.repair:
            damaged = fmt.damaged_chunks(out)
            if damaged:
                fmt.mark_pending(out, damaged)
                print(f"{out}: {len(damaged)} missing or corrupt chunks to convert again "
                      f"(first: {damaged[0][0]} chunk {damaged[0][1]})", file=sys.stderr)
                existing["complete"] = False
        if existing.get("complete") is True:
            return Plan(**plan, pending=[], complete=True)
        root = zarr.open_group(zarr.storage.LocalStore(out), mode="r")
        pending = [(split, int(k)) for split in fmt.SPLITS for k in np.flatnonzero(~root[f"{split}/{fmt.DONE}"][:])]
        return Plan(**plan, pending=pending)

    attrs = {
        "dataset": geometry.name,
        "geometry": {"n_alpha": geometry.n_alpha, "n_r": geometry.n_r, "n_layers": geometry.n_layers},
        "converter_version": CONVERTER_VERSION,
        "sources": [{"name": Path(s.path).name, "path": s.path, "showers": s.n, "bytes": s.size} for s in sources],
        "split": {
            "rule": "contiguous: the last round(val_fraction * N) showers of the concatenated inputs (in the order "
            "given) are the validation split; CaloChallenge files are already shuffled",
            "val_fraction": args.val_fraction,
        },
        "n_train": n_train,
        "n_val": n_val,
        "chunk_showers": chunk,
        "codec": fmt.CODEC,
        "request": request,
        "request_fingerprint": request_fingerprint,
    }
    fmt.create_store(out, geometry, n_train, n_val, chunk, attrs)
    pending = [(split, k) for split, n in (("train", n_train), ("val", n_val)) for k in range(fmt.n_chunks(n, chunk))]
    return Plan(**plan, pending=pending)


# ------------------------------------------------------------------------------------------------ work


class Converter:
    """One rank's share of the pending chunks, read and written block by block."""

    def __init__(self, plan: Plan, out: Path, rank: int, size: int) -> None:
        self.plan, self.out = plan, out
        self.geometry = get_geometry(plan.geometry_name)
        p = len(plan.pending)
        self.mine = plan.pending[rank * p // size : (rank + 1) * p // size]
        self.blocks = self._group(self.mine)
        self.root = zarr.open_group(zarr.storage.LocalStore(out), mode="r+")
        self._files: dict[int, CaloFile] = {}
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="convert-writer")
        self._pending_write: Future[None] | None = None

    def _group(self, chunks: list[tuple[str, int]]) -> list[list[tuple[str, int]]]:
        """Runs of chunks whose input rows are contiguous, each at most block_rows long."""
        blocks: list[list[tuple[str, int]]] = []
        start = end = -1
        for split, k in chunks:
            a, b = self.plan.chunk_rows(split, k)
            if blocks and a == end and b - start <= self.plan.block_rows:
                blocks[-1].append((split, k))
                end = b
            else:
                blocks.append([(split, k)])
                start, end = a, b
        return blocks

    def rows(self, block: list[tuple[str, int]]) -> int:
        return sum(b - a for a, b in (self.plan.chunk_rows(*c) for c in block))

    def _file(self, i: int) -> CaloFile:
        if i not in self._files:
            self._files[i] = CaloFile(self.plan.sources[i].path, self.geometry)
        return self._files[i]

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        for f in self._files.values():
            f.close()

    def _read(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Global rows [a, b) from the concatenated inputs as (e_inc, showers, layer_e), validated per file."""
        es, ss, ls = [], [], []
        for i, (src, off) in enumerate(zip(self.plan.sources, self.plan.offsets, strict=True)):
            lo, hi = max(a, off), min(b, off + src.n)
            if lo >= hi:
                continue
            blk = self._file(i).read(lo - off, hi - off)
            layer_e = self.geometry.layers(blk.showers).sum(axis=2, dtype=np.float64)
            self._check(src.path, blk, layer_e)
            es.append(blk.incident_energies)
            ss.append(blk.showers)
            ls.append(layer_e)
        if len(es) == 1:
            return es[0], ss[0], ls[0]
        return np.concatenate(es), np.concatenate(ss), np.concatenate(ls)

    def _check(self, path: str, blk: Block, layer_e: np.ndarray) -> None:
        try:
            check_block(path, blk, totals=layer_e.sum(axis=1))  # the io check's rules, on the layer sums we need
        except UserError as err:
            raise UserError(f"{err}; the store {self.out} stays incomplete (readers refuse it)") from None

    def run_block(self, block: list[tuple[str, int]]) -> None:
        """Read and validate a block here; encode and write it on the writer thread while the next is read."""
        a = self.plan.chunk_rows(*block[0])[0]
        b = self.plan.chunk_rows(*block[-1])[1]
        e, s, layer_e = self._read(a, b)
        vox = self.geometry.layers(s)
        self.wait()  # at most one block in flight: memory stays at ~2 blocks
        self._pending_write = self._writer.submit(self._write, block, a, e, layer_e, vox)

    def wait(self) -> None:
        if self._pending_write is not None:
            self._pending_write.result()  # re-raises a failure of the writer thread here
            self._pending_write = None

    def _write(self, block: list[tuple[str, int]], a: int, e: np.ndarray, layer_e: np.ndarray, vox: np.ndarray) -> None:
        with zarr.config.set(fmt.WRITE_EVERY_CHUNK):
            self._write_chunks(block, a, e, layer_e, vox)

    def _write_chunks(self, block: list[tuple[str, int]], a: int, e: np.ndarray, layer_e: np.ndarray,
                      vox: np.ndarray) -> None:
        for split in fmt.SPLITS:  # a block may end the train split and start the val split
            ks = [k for sp, k in block if sp == split]
            if not ks:
                continue
            g = self.root[split]
            base = 0 if split == "train" else self.plan.n_train
            for k in ks:  # one voxel chunk per zarr call: measured faster than the whole block in one call
                lo, hi = self.plan.chunk_rows(split, k)
                g[fmt.VOXELS][lo - base : hi - base] = vox[lo - a : hi - a]
            lo, hi = self.plan.chunk_rows(split, ks[0])[0], self.plan.chunk_rows(split, ks[-1])[1]
            g[fmt.E_INC][lo - base : hi - base] = e[lo - a : hi - a]
            g[fmt.LAYER_E][lo - base : hi - base] = layer_e[lo - a : hi - a]
            # Marked only once the chunk files are on disk: a kill before this point redoes the chunks.
            g[fmt.DONE][ks[0] : ks[-1] + 1] = True


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started (exec), in MiB.

    VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over exec, so a converter started by a large
    parent (fork + exec) would report the parent's size.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def finalize(out: Path, plan: Plan, checksums: dict[str, str], timing: dict[str, Any]) -> None:
    """Rank 0, after every rank is done: provenance checksums, then ``complete`` — the last write."""
    root = zarr.open_group(zarr.storage.LocalStore(out), mode="r+")
    for split in fmt.SPLITS:
        if not root[f"{split}/{fmt.DONE}"][:].all():
            raise RuntimeError(f"{out}: {split} has chunks not marked done after every rank finished")
    sources = [dict(s, sha256=checksums[s["path"]]) for s in root.attrs["sources"]]
    # "timing" describes the last run only (seconds, ranks, peak RSS): the one attribute that differs between
    # otherwise identical stores.
    root.attrs.update({"sources": sources, "timing": timing})
    root.attrs["complete"] = True


# ------------------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.convert",
        description=(
            "Convert CaloChallenge HDF5 files (datasets 2 or 3) into a Zarr v3 pair store for training. "
            "Run it alone or under mpiexec/srun: the ranks split the output chunks. Re-running the same command "
            "on a killed conversion resumes it; the store is marked complete only at the end."
        ),
    )
    p.add_argument("inputs", nargs="+", help="CaloChallenge HDF5 files; several are concatenated in this order")
    p.add_argument("--dataset", required=True, choices=sorted(DATASETS), help="dataset every input must be")
    p.add_argument("--out", required=True, type=Path, help="output store directory (e.g. ds2.zarr)")
    p.add_argument(
        "--val-fraction",
        type=number(float, "--val-fraction", 0, 1, hi_open=True),
        default=0.1,
        help="fraction of showers, taken from the END of the concatenated inputs, for validation (default 0.1)",
    )
    p.add_argument(
        "--memory-gb",
        type=number(float, "--memory-gb", 0, lo_open=True),
        default=2.0,
        help="peak memory budget per rank in GB; read blocks are sized from it (default 2)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing pair store of a different request at --out (never deletes anything else)",
    )
    p.add_argument(
        "--repair",
        action="store_true",
        help="read every chunk of the existing store of this request and convert again the missing or corrupt "
        "ones (what a reader's 'chunk ... is missing/corrupt' error asks for)",
    )
    p.add_argument(
        "--chunk-showers",
        type=positive_int("--chunk-showers"),
        default=None,
        help="showers per Zarr chunk (default: ~4 MiB of raw voxels, 161 for ds2, 25 for ds3)",
    )
    p.add_argument(
        "--block-showers",
        type=positive_int("--block-showers"),
        default=None,
        help="showers read per block (default: as many as --memory-gb allows, at most 128 MiB of voxels)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _agree(comm: Any, err: str | None, rows: int) -> tuple[str | None, int]:
    """Every rank learns whether any rank failed, and how many rows were converted in this step."""
    gathered = comm.allgather((err, rows))
    errors = [e for e, _ in gathered if e is not None]
    return (errors[0] if errors else None), sum(r for _, r in gathered)


def _fail(comm: Any, msg: str) -> int:
    """Rank 0 reports the error (one line via run_cli); the other ranks exit quietly with the same code."""
    if comm.Get_rank() == 0:
        raise UserError(msg)
    return 2


def parse_request(argv: Sequence[str] | None = None) -> ConvertRequest:
    a = build_parser().parse_args(argv)
    return ConvertRequest(inputs=tuple(a.inputs), dataset=a.dataset, out=a.out, val_fraction=a.val_fraction,
                          memory_gb=a.memory_gb, overwrite=a.overwrite, repair=a.repair, chunk_showers=a.chunk_showers,
                          block_showers=a.block_showers, quiet=a.quiet)


def main(argv: Sequence[str] | None = None) -> int:
    return convert(parse_request(argv))


def convert(args: ConvertRequest) -> int:
    """Convert (or resume, or find complete) on this process, or on every rank under mpiexec/srun; 0 on success."""
    comm = get_comm()
    rank, size = comm.Get_rank(), comm.Get_size()
    t0 = time.perf_counter()
    try:
        return _main(args, comm, rank, size, t0)
    except UserError:
        raise  # agreed by every rank before it is raised
    except BaseException as err:
        # Ctrl-C or a bug on one rank: a peer blocked in a collective would wait forever, so end the world.
        if size == 1:
            raise
        abort_world(comm, err)
        return 1


def _main(args: ConvertRequest, comm: Any, rank: int, size: int, t0: float) -> int:
    plan, err = plan_on_rank0(comm, lambda: prepare(args))
    if err is not None:
        return _fail(comm, err)
    assert plan is not None
    if plan.complete:
        if rank == 0:
            print(f"{args.out}: already complete for this request; nothing to do", file=sys.stderr)
        return 0

    conv = Converter(plan, args.out, rank, size)
    steps = comm.allreduce(len(conv.blocks), op=_max_op(comm))
    bar = None
    if rank == 0 and not args.quiet:
        from tqdm import tqdm

        total_rows = sum(b - a for a, b in (plan.chunk_rows(*c) for c in plan.pending))
        bar = tqdm(total=total_rows, unit="shower", desc=f"convert ({size} rank{'s' * (size > 1)})", file=sys.stderr)
    try:
        for i in range(steps):
            err, rows = None, 0
            if i < len(conv.blocks):
                try:
                    conv.run_block(conv.blocks[i])
                    rows = conv.rows(conv.blocks[i])
                    if i + 1 == len(conv.blocks):
                        conv.wait()  # the last write lands before this rank reports its rows
                except UserError as e:
                    err = str(e)
                except OSError as e:
                    err = str(_storage(e, args.out, plan) or "")
                    if not err:
                        raise
                if args.after_block is not None:
                    args.after_block(i + 1)
            err, done = _agree(comm, err, rows)
            if bar is not None:
                bar.update(done)
            if err is not None:
                return _fail(comm, err)
    finally:
        conv.close()
        if bar is not None:
            bar.close()

    # Checksums of the inputs, split across ranks (file i on rank i mod size), streamed in 8 MiB reads.
    mine = {s.path: file_sha256(s.path) for i, s in enumerate(plan.sources) if i % size == rank}
    checksums = {k: v for part in comm.allgather(mine) for k, v in part.items()}
    rss_mb = comm.allgather(peak_rss_mb())
    comm.barrier()
    if rank == 0:
        seconds = time.perf_counter() - t0
        finalize(
            args.out,
            plan,
            checksums,
            {"last_run_seconds": round(seconds, 3), "ranks": size, "peak_rss_mb_per_rank": rss_mb},
        )
        n = plan.n_train + plan.n_val
        print(
            f"{args.out}: complete, {plan.n_train} train + {plan.n_val} val showers of {plan.geometry_name} "
            f"({n} total) in {seconds:.1f} s on {size} rank{'s' * (size > 1)}, peak RSS per rank {rss_mb} MB",
            file=sys.stderr,
        )
    comm.barrier()
    return 0


def _storage(err: OSError, out: Path, plan: Plan) -> UserError | None:
    """Disk full / read-only while writing chunks: one line (the store stays incomplete and resumable)."""
    geometry = get_geometry(plan.geometry_name)
    left = sum(b - a for a, b in (plan.chunk_rows(*c) for c in plan.pending))
    # zstd packs the voxels ~6x (BENCHMARKS.md); a quarter of the raw size is the estimate with margin.
    needed = left * (geometry.n_voxels * 4 // 4 + 8 * (1 + geometry.n_layers))
    mapped = storage_error(err, out, needed)
    return None if mapped is None else UserError(f"{mapped}; the store stays incomplete: free space and re-run")


def _max_op(comm: Any) -> Any:
    if isinstance(comm, _SerialComm):
        return None
    return mpi_module().MAX


if __name__ == "__main__":
    run_cli(main)
