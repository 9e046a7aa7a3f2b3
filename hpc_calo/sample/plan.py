"""A production request and its deterministic split into shards.

Everything that decides the bits of the output is in the :class:`Request`, the run's weights and the
incident energies; the plan derives from them alone, so every backend and every worker count produces the
same shards, and a re-run can tell its own leftover parts from another request's by the fingerprint.

Randomness follows the one seeding rule of ``hpc_calo.seeding``: the random numbers of output row ``i`` depend
on ``(seed, i)`` only, so a shard generates its rows ``start..stop`` exactly as ``python -m hpc_calo.generate``
would generate them in a single pass, whatever the shard size, worker count or backend.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hpc_calo.digest import fingerprint
from hpc_calo.errors import UserError
from hpc_calo.geometry import Geometry, get_geometry
from hpc_calo.io import CaloFile
from hpc_calo.io.check import check_energies, check_trained_range
from hpc_calo.io.hdf5 import MAX_SHOWERS
from hpc_calo.precision import PRECISIONS
from hpc_calo.seeding import DEFAULT_SEED, log_uniform_energies

PLAN_VERSION = 2  # 2: rows seeded by their global index (hpc_calo.seeding)
# A shard is generated in one call and held in memory once, so its default size keeps it near this.
SHARD_BYTES = 256 * 2**20
# Beyond this a request is a typo: every shard has a part file and a record in one directory.
MAX_SHARDS = 1_000_000


@dataclass(frozen=True)
class Request:
    """What to generate. Two requests with equal fields on the same weights give identical showers."""

    run_dir: Path
    n: int
    seed: int = DEFAULT_SEED
    shard_size: int | None = None  # None: default_shard_size(geometry)
    energies: Path | None = None  # take the first n incident energies of this CaloChallenge file
    emin: float | None = None  # log-uniform range in MeV; None: the trained range
    emax: float | None = None
    batch_size: int = 1000
    device: str = "cpu"
    dtype: str = "float32"
    students: bool | None = None  # None: students where the run has them
    renormalise: bool = True  # each generated layer sums exactly to flow-1's energy (hpc_calo.generate.Chain)
    compile: bool = False  # the students' spline under torch.compile (other last bits: part of the fingerprint)
    # torch CPU threads per worker: part of the request because matrix products round differently with
    # another thread count, so the same value everywhere is what makes CPU backends agree bit for bit.
    threads: int = 1

    def check(self) -> None:
        if not 0 < self.n <= MAX_SHOWERS:
            raise UserError(f"--showers must be between 1 and {MAX_SHOWERS:.0e}, not {self.n}")
        if self.shard_size is not None and self.shard_size <= 0:
            raise UserError(f"--shard-size must be positive, not {self.shard_size}")
        if self.batch_size <= 0:
            raise UserError(f"--batch-size must be positive, not {self.batch_size}")
        if self.seed < 0:
            raise UserError(f"--seed must be a non-negative integer, not {self.seed}")
        if self.energies is not None and (self.emin is not None or self.emax is not None):
            raise UserError("give either --energies or --emin/--emax, not both")
        if self.threads <= 0:
            raise UserError(f"--threads must be positive, not {self.threads}")
        if self.dtype not in PRECISIONS:
            raise UserError(f"--dtype must be one of {', '.join(PRECISIONS)}, not {self.dtype!r}")


@dataclass(frozen=True)
class Shard:
    index: int
    start: int  # first row in the output file
    count: int

    @property
    def stop(self) -> int:
        return self.start + self.count


@dataclass(frozen=True)
class Shards(Sequence[Shard]):
    """The shards of a plan, made on demand: a plan for a billion showers stays a few numbers."""

    n: int
    size: int

    def __len__(self) -> int:
        return -(-self.n // self.size)

    def __getitem__(self, index: int) -> Shard:  # type: ignore[override]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"shard {index} of {len(self)}")
        a = index * self.size
        return Shard(index=index, start=a, count=min(self.size, self.n - a))


@dataclass(frozen=True, eq=False)
class ShardSet:
    """Shard indices as sorted, disjoint half-open ranges: memory follows the gaps, not the shards.

    The shards still to generate are one range for a fresh request and a few for a resumed one, so a plan of
    a billion showers in 10^5 shards holds no per-shard Python objects.
    """

    ranges: np.ndarray  # (k, 2) int64: [start, stop) of each run of member indices, ascending

    @classmethod
    def where(cls, mask: np.ndarray) -> ShardSet:
        """The indices where ``mask`` (one bool per shard) is True."""
        padded = np.zeros(len(mask) + 2, dtype=bool)  # one byte per shard: the only per-shard memory
        padded[1:-1] = mask
        return cls(np.flatnonzero(padded[1:] != padded[:-1]).reshape(-1, 2))

    def __len__(self) -> int:
        return int((self.ranges[:, 1] - self.ranges[:, 0]).sum())

    def __iter__(self) -> Iterator[int]:
        for a, b in self.ranges:
            yield from range(int(a), int(b))

    def showers(self, shards: Shards) -> int:
        """Rows in these shards: every shard has ``shards.size`` but the last."""
        n = len(self) * shards.size
        if len(self.ranges) and self.ranges[-1, 1] == len(shards):
            n -= shards.size - shards[-1].count
        return n


@dataclass(frozen=True)
class Plan:
    """Small and picklable (no shower or energy arrays): this is what travels to workers."""

    request: Request
    dataset: str
    emin: float  # range of the incident energies actually used (MeV)
    emax: float
    shards: Shards
    fingerprint: str
    description: dict[str, Any]  # the fingerprinted fields, for request.json and error messages

    @property
    def n(self) -> int:
        return self.request.n

    @property
    def geometry(self) -> Geometry:
        return get_geometry(self.dataset)

    def energies(self, shard: Shard) -> np.ndarray:
        """Incident energies (MeV, float64) of one shard, recomputed from the request alone."""
        path = self.request.energies
        if path is not None:
            with h5py.File(path, "r") as f:
                return np.asarray(f["incident_energies"][shard.start : shard.stop, 0], dtype=np.float64)
        return log_uniform_energies(self.request.seed, shard.start, shard.stop, self.emin, self.emax)


def default_shard_size(geometry: Geometry) -> int:
    """About SHARD_BYTES of float32 showers, rounded down to one significant digit (DS2 10000, DS3 1000)."""
    rows = max(1, SHARD_BYTES // (4 * geometry.n_voxels))
    return rows - rows % 10 ** int(math.log10(rows))


def _energy_source(
    req: Request, geometry: Geometry, trained: tuple[float, float]
) -> tuple[float, float, dict[str, Any]]:
    """The energy range used and the fingerprint fields of the energy source; raises on a bad source."""
    if req.energies is not None:
        path = Path(req.energies)
        with CaloFile(path, geometry) as f:  # UserError for a missing file or another dataset
            if f.n < req.n:
                raise UserError(
                    f"{path}: holds {f.n} showers but {req.n} were requested "
                    "(the first N incident energies are used; ask for at most the file's count)"
                )
        with h5py.File(path, "r") as f:
            e = np.asarray(f["incident_energies"][: req.n, 0], dtype=np.float64)
        check_energies(str(path), 0, e)
        emin, emax = float(e.min()), float(e.max())
        check_trained_range(str(path), emin, emax, trained)
        return emin, emax, {"energies_sha256": hashlib.sha256(e.data).hexdigest()}
    emin = trained[0] if req.emin is None else float(req.emin)
    emax = trained[1] if req.emax is None else float(req.emax)
    if not (0 < emin < emax):
        raise UserError(f"--emin {emin:.6g} MeV must be positive and below --emax {emax:.6g} MeV")
    check_trained_range("--emin/--emax", emin, emax, trained)
    return emin, emax, {"log_uniform_mev": [emin, emax]}


def make_plan(req: Request, geometry: Geometry, energy_range: tuple[float, float], run_digest: str) -> Plan:
    """Validate the request against the loaded run and split it into shards."""
    req.check()
    lo, hi = (float(x) for x in energy_range)
    size = min(req.shard_size or default_shard_size(geometry), req.n)
    shards = Shards(req.n, size)
    if len(shards) > MAX_SHARDS:
        raise UserError(f"{req.n} showers in shards of {size} make {len(shards)} shards, more than the "
                        f"{MAX_SHARDS} a request may have; raise --shard-size")
    emin, emax, source = _energy_source(req, geometry, (lo, hi))
    description: dict[str, Any] = {
        "plan_version": PLAN_VERSION,
        "dataset": geometry.name,
        "run_sha256": run_digest,
        "showers": req.n,
        "seed": req.seed,
        "shard_size": size,
        "batch_size": req.batch_size,
        # The device index does not change results; the device type and dtype do.
        "device": req.device.split(":")[0],
        "dtype": req.dtype,
        "students": req.students,
        "renormalise": req.renormalise,
        "compile": req.compile,
        "threads": req.threads if req.device == "cpu" else None,
        **source,
    }
    return Plan(
        request=req,
        dataset=geometry.name,
        emin=emin,
        emax=emax,
        shards=shards,
        fingerprint=fingerprint(description),
        description=description,
    )
