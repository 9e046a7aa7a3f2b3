"""CaloChallenge HDF5 files: a streaming reader and an atomic writer.

Format: ``incident_energies`` (N, 1) float64 MeV and ``showers`` (N, 45*V) float32 MeV. Files may exceed RAM,
so everything here works block by block.
"""

from __future__ import annotations

import contextlib
import os
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import h5py
import numpy as np

from hpc_calo.atomic import atomic_path
from hpc_calo.cpus import owned_cpus
from hpc_calo.errors import UserError
from hpc_calo.geometry import Geometry, infer_geometry
from hpc_calo.outputs import CALO_FILE, Kind, storage_error, writable_parent

E_KEY = "incident_energies"
S_KEY = "showers"
# Rows per block are chosen so one block of showers stays near this many bytes.
DEFAULT_BLOCK_BYTES = 128 * 2**20
# HDF5 chunks near 4 MiB: large enough for gzip to work well, small enough for cheap partial reads.
CHUNK_BYTES = 4 * 2**20
# The largest file hpc-calo writes in one request (DS2: ~26 TB raw): beyond it a request is a typo, and the
# plan, the incident energies and the progress counters would no longer be small.
MAX_SHOWERS = 10**9
GZIP_LEVEL = 4
# Up-front disk estimates count gzip output at this fraction of the raw size (zero voxels compress away).
GZIP_ESTIMATE = 0.25


@dataclass(frozen=True)
class Block:
    start: int
    incident_energies: np.ndarray  # (n,) float64, MeV
    showers: np.ndarray  # (n, n_voxels) float32, MeV

    @property
    def stop(self) -> int:
        return self.start + len(self.incident_energies)


def output_bytes(geometry: Geometry, n: int, compression: str | None = "gzip") -> int:
    """The estimated size of a file of ``n`` showers (raw for no compression)."""
    raw = n * (4 * geometry.n_voxels + 8)
    return raw if compression in (None, "none") else int(raw * GZIP_ESTIMATE)


def first_line(err: BaseException) -> str:
    # HDF5 errors carry a multi-line dump of its C error stack; the first line says what went wrong.
    return (str(err).splitlines() or [type(err).__name__])[0]


def rows_for_bytes(n_voxels: int, n_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    return max(1, n_bytes // (4 * n_voxels))


class CaloFile:
    """A CaloChallenge file opened for block-wise reading; the structure is checked on open."""

    def __init__(self, path: str | os.PathLike[str], geometry: Geometry | None = None) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise UserError(f"{self.path}: no such file")
        if self.path.is_dir():
            raise UserError(f"{self.path}: is a directory, not a CaloChallenge HDF5 file")
        try:
            self._h5 = h5py.File(self.path, "r")
        except OSError as err:
            why = first_line(err)
            raise UserError(f"{self.path}: not a readable HDF5 file (truncated or corrupt): {why}") from None
        try:
            self._check_structure(geometry)
        except BaseException:
            self._h5.close()
            raise

    def _check_structure(self, geometry: Geometry | None) -> None:
        for key in (E_KEY, S_KEY):
            if key not in self._h5 or not isinstance(self._h5[key], h5py.Dataset):
                raise UserError(f"{self.path}: missing dataset {key!r}")
        e, s = self._h5[E_KEY], self._h5[S_KEY]
        if e.ndim != 2 or e.shape[1] != 1:
            raise UserError(f"{self.path}: {E_KEY} has shape {e.shape}, expected (N, 1)")
        if s.ndim != 2:
            raise UserError(f"{self.path}: {S_KEY} has shape {s.shape}, expected (N, voxels)")
        if e.shape[0] != s.shape[0]:
            raise UserError(f"{self.path}: {E_KEY} has {e.shape[0]} rows but {S_KEY} has {s.shape[0]}")
        if geometry is None:
            try:
                geometry = infer_geometry(s.shape[1])
            except UserError as err:
                raise UserError(f"{self.path}: {err}") from None
        elif s.shape[1] != geometry.n_voxels:
            raise UserError(
                f"{self.path}: showers have {s.shape[1]} voxels per row; "
                f"{geometry.name} needs {geometry.n_voxels} (45 layers x {geometry.voxels_per_layer})"
            )
        self.geometry = geometry
        self.n = int(s.shape[0])
        self._chunk_rows = s.chunks[0] if s.chunks else 1

    def __enter__(self) -> CaloFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._h5.close()

    def __len__(self) -> int:
        return self.n

    def read(self, start: int, stop: int) -> Block:
        try:
            e = np.asarray(self._h5[E_KEY][start:stop, 0], dtype=np.float64)
            s = np.asarray(self._h5[S_KEY][start:stop], dtype=np.float32)
        except OSError as err:
            raise UserError(
                f"{self.path}: rows {start}-{stop} cannot be read (truncated or corrupt): {first_line(err)}"
            ) from None
        return Block(start=start, incident_energies=e, showers=s)

    def blocks(
        self, block_size: int | None = None, start: int = 0, stop: int | None = None
    ) -> Iterator[Block]:
        """Consecutive blocks of rows [start, stop); block size rounded to whole HDF5 chunks."""
        stop = self.n if stop is None else min(stop, self.n)
        rows = block_size or rows_for_bytes(self.geometry.n_voxels)
        if rows >= self._chunk_rows:
            rows -= rows % self._chunk_rows
        for a in range(start, stop, rows):
            yield self.read(a, min(a + rows, stop))


def iter_blocks(
    path: str | os.PathLike[str], geometry: Geometry | None = None, block_size: int | None = None
) -> Iterator[Block]:
    with CaloFile(path, geometry) as f:
        yield from f.blocks(block_size)


def gzip_chunk(rows: np.ndarray) -> bytes:
    """One whole chunk as HDF5's shuffle and deflate filters store it. zlib releases the GIL, so chunks
    compress in parallel threads."""
    shuffled = np.ascontiguousarray(rows.view(np.uint8).reshape(-1, rows.itemsize).T)
    return zlib.compress(shuffled, GZIP_LEVEL)


class CaloWriter:
    """Append blocks of showers; the file appears at ``path`` only when the writer closes without error.

    With ``n_total`` the datasets are preallocated and closing with fewer or more rows is an error. An existing
    file at ``path`` is replaced only if it is of ``kind`` (default: a CaloChallenge file; None for a command's
    own files in a folder it owns). A full disk or read-only directory is one UserError and leaves nothing.
    ``sweep``: as in :func:`hpc_calo.atomic.atomic_path`.

    With gzip, whole chunks of showers are compressed by ``threads`` threads (0: the CPUs this process owns)
    while the caller goes on, and stored as they are; at most two chunks per thread wait, which bounds memory.
    The file is the one h5py's own filters would write: same filters, chunks and bytes once read back.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        geometry: Geometry,
        n_total: int | None = None,
        compression: str | None = "gzip",
        attrs: dict[str, object] | None = None,
        kind: Kind | None = CALO_FILE,
        threads: int = 0,
        sweep: bool = True,
    ) -> None:
        if compression not in (None, "none", "gzip"):
            raise UserError(f"unknown compression {compression!r}: choose gzip or none")
        if threads < 0:
            raise UserError(f"threads must be >= 0, not {threads}")
        self.path = Path(path)
        self.geometry = geometry
        self.n_total = n_total
        self.compression = None if compression == "none" else compression
        self.attrs = attrs or {}
        self.kind = kind
        self.sweep = sweep
        self.threads = threads or owned_cpus()
        self.n_written = 0
        self._stack = ExitStack()
        self._pool: ThreadPoolExecutor | None = None
        self._queued: deque[tuple[int, np.ndarray, Future[bytes]]] = deque()
        self._spare: list[np.ndarray] = []
        self._fill = self._chunks = 0

    def __enter__(self) -> CaloWriter:
        writable_parent(self.path)
        tmp = self._tmp = self._stack.enter_context(atomic_path(self.path, self.kind, self.sweep))
        try:
            self._create(tmp)
        except BaseException as err:
            self._fail(err)
        return self

    def _fail(self, err: BaseException) -> None:
        """Close the HDF5 file, then let atomic_path remove its temporary, and re-raise (storage errors: one line).

        On a full disk HDF5 cannot flush its cached chunks and metadata, so closing fails and leaves library
        state that crashes the interpreter at exit. Emptying the doomed temporary first gives the close the
        room it needs.
        """
        # Raw size: what compression saves on these showers is unknown, so the bound is what is certain.
        mapped = storage_error(err, self.path.parent, output_bytes(self.geometry, self.n_total or self.n_written, None))
        if mapped is not None:
            with contextlib.suppress(OSError):
                os.truncate(self._tmp, 0)
        self._e = self._s = None
        self._queued.clear()
        with contextlib.suppress(BaseException):  # the first error is the one to report
            self._stack.__exit__(type(err), err, err.__traceback__)
        if mapped is not None:
            raise mapped from None
        raise err

    def _create(self, tmp: Path) -> None:
        self._h5 = self._stack.enter_context(h5py.File(tmp, "w"))
        n_vox = self.geometry.n_voxels
        n0 = self.n_total or 0
        maxrows = self.n_total if self.n_total is not None else None
        chunk_rows = max(1, min(rows_for_bytes(n_vox, CHUNK_BYTES), max(n0, 1)))
        e_chunk_rows = max(chunk_rows, 1024) if self.n_total is None else max(1, min(1024, n0))
        opts: dict[str, object] = {}
        if self.compression:
            opts = {"compression": "gzip", "compression_opts": GZIP_LEVEL, "shuffle": True}
        self._e = self._h5.create_dataset(
            E_KEY, shape=(n0, 1), maxshape=(maxrows, 1), dtype="f8", chunks=(e_chunk_rows, 1), **opts
        )
        self._s = self._h5.create_dataset(
            S_KEY, shape=(n0, n_vox), maxshape=(maxrows, n_vox), dtype="f4", chunks=(chunk_rows, n_vox), **opts
        )
        for k, v in self.attrs.items():
            self._h5.attrs[k] = v
        if self.compression:
            self._rows = np.empty((chunk_rows, n_vox), dtype=np.float32)
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="gzip")
            # After the file, so it stops (queued chunks cancelled) before the file closes.
            self._stack.callback(self._pool.shutdown, cancel_futures=True)

    def write(self, incident_energies: np.ndarray, showers: np.ndarray) -> None:
        """Append a block; its arrays may be reused as soon as this returns."""
        e = np.asarray(incident_energies, dtype=np.float64).reshape(-1, 1)
        s = np.asarray(showers, dtype=np.float32)
        if s.ndim != 2 or s.shape[1] != self.geometry.n_voxels or s.shape[0] != e.shape[0]:
            raise ValueError(f"block shapes {e.shape} / {s.shape} do not fit {self.geometry.name}")
        a, b = self.n_written, self.n_written + len(e)
        if self.n_total is None:
            self._e.resize(b, axis=0)
            self._s.resize(b, axis=0)
        elif b > self.n_total:
            raise ValueError(f"writing rows {a}-{b} past the declared {self.n_total}")
        try:
            self._e[a:b] = e
            if self._pool is None:
                self._s[a:b] = s
            else:
                self._add_rows(s)
        except (OSError, RuntimeError) as err:
            self._fail(err)
        self.n_written = b

    def _add_rows(self, s: np.ndarray) -> None:
        """Copy rows into the chunk being filled; hand each full chunk to the pool."""
        rows = len(self._rows)
        done = 0
        while done < len(s):
            take = min(rows - self._fill, len(s) - done)
            self._rows[self._fill : self._fill + take] = s[done : done + take]
            self._fill += take
            done += take
            if self._fill == rows:
                while self._queued and (self._queued[0][2].done() or len(self._queued) >= 2 * self.threads):
                    self._store_oldest()
                self._queued.append((self._chunks * rows, self._rows, self._pool.submit(gzip_chunk, self._rows)))
                self._rows = self._spare.pop() if self._spare else np.empty_like(self._rows)
                self._chunks += 1
                self._fill = 0

    def _store_oldest(self) -> None:
        row, buf, compressed = self._queued.popleft()
        self._s.id.write_direct_chunk((row, 0), compressed.result(), 0)
        self._spare.append(buf)

    def _finish(self) -> None:
        """Store the queued chunks and a last, partial one, zero-padded to a whole chunk as HDF5 stores edge chunks
        (compressed in the pool like the others: done on this thread it would be a serial tail)."""
        if self._fill:
            self._rows[self._fill :] = 0
            self._queued.append((self._chunks * len(self._rows), self._rows, self._pool.submit(gzip_chunk, self._rows)))
            self._fill = 0
        while self._queued:
            self._store_oldest()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None and self.n_total is not None and self.n_written != self.n_total:
            exc = ValueError(f"{self.path}: wrote {self.n_written} showers, expected {self.n_total}")
            self._queued.clear()
            self._stack.__exit__(type(exc), exc, None)
            raise exc
        if exc is not None:
            self._fail(exc)
        try:
            if self._pool is not None:
                self._finish()
            self._stack.__exit__(None, None, None)  # flush + close, then rename
        except BaseException as err:
            self._fail(err)
