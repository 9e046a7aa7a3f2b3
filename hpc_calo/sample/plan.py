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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hpc_calo.digest import fingerprint
from hpc_calo.errors import UserError
from hpc_calo.geometry import Geometry, get_geometry
from hpc_calo.io import CaloFile
from hpc_calo.precision import PRECISIONS
from hpc_calo.seeding import DEFAULT_SEED, log_uniform_energies

PLAN_VERSION = 2  # 2: rows seeded by their global index (hpc_calo.seeding)
# A shard is generated in one call and held in memory once, so its default size keeps it near this.
SHARD_BYTES = 256 * 2**20
# Relative slack when comparing a requested energy range with the trained one (float round trips).
_E_SLACK = 1e-9


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
    # torch CPU threads per worker: part of the request because matrix products round differently with
    # another thread count, so the same value everywhere is what makes CPU backends agree bit for bit.
    threads: int = 1

    def check(self) -> None:
        if self.n <= 0:
            raise UserError(f"--showers must be positive, not {self.n}")
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
class Plan:
    """Small and picklable (no shower or energy arrays): this is what travels to workers."""

    request: Request
    dataset: str
    emin: float  # range of the incident energies actually used (MeV)
    emax: float
    shards: tuple[Shard, ...]
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


def _energy_source(req: Request, geometry: Geometry, lo: float, hi: float) -> tuple[float, float, dict[str, Any]]:
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
        if not np.all(np.isfinite(e)) or e.min() <= 0:
            raise UserError(f"{path}: incident_energies contain non-positive, NaN or inf values")
        emin, emax = float(e.min()), float(e.max())
        if emin < lo * (1 - _E_SLACK) or emax > hi * (1 + _E_SLACK):
            raise UserError(
                f"{path}: incident energies {emin:.6g}..{emax:.6g} MeV reach outside the trained range "
                f"{lo:.6g}..{hi:.6g} MeV of the run"
            )
        return emin, emax, {"energies_sha256": hashlib.sha256(e.data).hexdigest()}
    emin = lo if req.emin is None else float(req.emin)
    emax = hi if req.emax is None else float(req.emax)
    if not (0 < emin < emax):
        raise UserError(f"--emin {emin:.6g} MeV must be positive and below --emax {emax:.6g} MeV")
    if emin < lo * (1 - _E_SLACK) or emax > hi * (1 + _E_SLACK):
        raise UserError(
            f"requested incident energies {emin:.6g}..{emax:.6g} MeV reach outside the trained range "
            f"{lo:.6g}..{hi:.6g} MeV of {req.run_dir}"
        )
    return emin, emax, {"log_uniform_mev": [emin, emax]}


def make_plan(req: Request, geometry: Geometry, energy_range: tuple[float, float], run_digest: str) -> Plan:
    """Validate the request against the loaded run and split it into shards."""
    req.check()
    lo, hi = (float(x) for x in energy_range)
    emin, emax, source = _energy_source(req, geometry, lo, hi)
    size = min(req.shard_size or default_shard_size(geometry), req.n)
    shards = tuple(
        Shard(index=i, start=a, count=min(size, req.n - a))
        for i, a in enumerate(range(0, req.n, size))
    )
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
