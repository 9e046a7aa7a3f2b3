"""Validate a CaloChallenge file block by block and summarise it in one line."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from hpc_calo.errors import UserError
from hpc_calo.geometry import E_INC_MAX_MEV, E_INC_MIN_MEV, Geometry
from hpc_calo.io.hdf5 import Block, CaloFile

# Relative slack on the incident-energy ranges: real files store float64 values drawn up to the bounds.
_E_SLACK = 1e-6


@dataclass(frozen=True)
class Summary:
    path: str
    dataset: str
    n: int
    e_min: float
    e_max: float
    response_mean: float  # mean of E_tot / E_inc
    sparsity: float  # fraction of voxels that are zero

    def line(self) -> str:
        return (
            f"{self.path}: {self.dataset}, {self.n} showers, E_inc {self.e_min:.4g}..{self.e_max:.4g} MeV, "
            f"<E_tot/E_inc> {self.response_mean:.4f}, sparsity {self.sparsity:.4f}"
        )


def check_energies(where: str, start: int, e: np.ndarray) -> None:
    """Incident energies (MeV) of rows ``start..``: finite and inside the CaloChallenge range [1 GeV, 1 TeV]."""
    if not np.all(np.isfinite(e)):
        row = start + int(np.argmin(np.isfinite(e)))
        raise UserError(f"{where}: incident_energies contain NaN or inf (first at row {row})")
    bad = (e < E_INC_MIN_MEV * (1 - _E_SLACK)) | (e > E_INC_MAX_MEV * (1 + _E_SLACK))
    if bad.any():
        row = int(np.argmax(bad))
        raise UserError(
            f"{where}: incident energy {e[row]:.6g} MeV at row {start + row} is outside "
            f"[{E_INC_MIN_MEV:.0f}, {E_INC_MAX_MEV:.0f}] MeV"
        )


def check_block(path: str | os.PathLike[str], b: Block, totals: np.ndarray | None = None) -> np.ndarray:
    """The checks every reader of a CaloChallenge file applies to a block; returns E_tot per row (float64).

    ``totals``: the caller's float64 row sums when it has them (a NaN or inf voxel makes its row sum
    non-finite, and finite float32 values cannot overflow a float64 sum), saving a pass over the voxels.
    """
    where = f"{path}: rows {b.start}-{b.stop}"
    check_energies(where, b.start, b.incident_energies)
    s = b.showers
    tot = s.sum(axis=1, dtype=np.float64) if totals is None else totals
    if not np.all(np.isfinite(tot)):
        row = b.start + int(np.argmin(np.isfinite(tot)))
        raise UserError(f"{where}: showers contain NaN or inf (first at row {row})")
    if s.size and s.min() < 0:
        row = b.start + int(np.argmax((s < 0).any(axis=1)))
        raise UserError(f"{where}: showers contain negative energies (first at row {row})")
    return tot


# How far (as a share of the trained log-energy span) generation may reach past the trained range. The trained range
# is the min..max of a finite training sample: an independent reference file from the same distribution reaches a
# little past it about as often as not (~1/N of the span), which is no extrapolation; 2 % is ~50x that at N = 3000.
TRAINED_RANGE_MARGIN = 0.02


def check_trained_range(what: str, emin: float, emax: float, trained: tuple[float, float]) -> None:
    """Generation stays inside the incident-energy range the flows were trained on (no extrapolation)."""
    lo, hi = trained
    slack = (hi / lo) ** TRAINED_RANGE_MARGIN * (1 + _E_SLACK)
    if emin < lo / slack or emax > hi * slack:
        raise UserError(
            f"{what}: incident energies {emin:.6g}..{emax:.6g} MeV reach outside the trained range "
            f"{lo:.6g}..{hi:.6g} MeV of the run"
        )


def check_file(path: str | os.PathLike[str], geometry: Geometry | None = None) -> Summary:
    """Read the whole file once; raise UserError naming the file and rows at the first problem."""
    with CaloFile(path, geometry) as f:
        if f.n == 0:
            raise UserError(f"{f.path}: the file holds no showers")
        e_min, e_max, resp_sum, zeros = np.inf, -np.inf, 0.0, 0
        for b in f.blocks():
            tot = check_block(f.path, b)
            e, s = b.incident_energies, b.showers
            e_min, e_max = min(e_min, float(e.min())), max(e_max, float(e.max()))
            resp_sum += float((tot / e).sum())
            zeros += int(s.size - np.count_nonzero(s))
        return Summary(
            path=str(f.path),
            dataset=f.geometry.name,
            n=f.n,
            e_min=e_min,
            e_max=e_max,
            response_mean=resp_sum / f.n,
            sparsity=zeros / (f.n * f.geometry.n_voxels),
        )
