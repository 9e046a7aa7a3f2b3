"""CaloChallenge 2022 datasets 2 and 3: the one source of truth for the detector geometry.

Voxel order inside a shower row is ``showers.reshape(N, 45, n_alpha, n_r)``: radial bin fastest, then the
angular bin, then the layer. Every other module asks this one for shapes and voxel positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from hpc_calo.errors import UserError

N_LAYERS = 45
# 0.5 keV Geant4 cut divided by the sampling fraction 0.033; the official evaluation zeroes voxels below it.
THRESHOLD_MEV = 0.5e-3 / 0.033  # = 0.01515... MeV, exactly as the official code computes it
E_INC_MIN_MEV = 1.0e3
E_INC_MAX_MEV = 1.0e6
R_MAX_MM = 41.85


def apply_threshold(energies: Any, threshold: float = THRESHOLD_MEV) -> Any:
    """Zero the energies below the readout threshold (MeV) in place, as the official evaluation does.

    ``energies`` is a numpy array (files) or a torch tensor (generation): one rule for both.
    """
    if isinstance(energies, np.ndarray):
        energies[energies < threshold] = 0.0
    else:
        energies.masked_fill_(energies < threshold, 0.0)  # no host sync on a GPU, unlike boolean indexing
    return energies


@dataclass(frozen=True)
class Geometry:
    name: str
    n_alpha: int
    n_r: int
    n_layers: int = N_LAYERS

    @property
    def voxels_per_layer(self) -> int:
        return self.n_alpha * self.n_r

    @property
    def n_voxels(self) -> int:
        return self.n_layers * self.voxels_per_layer

    @cached_property
    def r_edges(self) -> np.ndarray:
        """Radial bin edges in mm (equal bins up to 41.85 mm for both datasets)."""
        return np.linspace(0.0, R_MAX_MM, self.n_r + 1)

    @cached_property
    def r_centres(self) -> np.ndarray:
        return 0.5 * (self.r_edges[1:] + self.r_edges[:-1])

    @cached_property
    def alpha_edges(self) -> np.ndarray:
        return np.linspace(-np.pi, np.pi, self.n_alpha + 1)

    @cached_property
    def alpha_centres(self) -> np.ndarray:
        return 0.5 * (self.alpha_edges[1:] + self.alpha_edges[:-1])

    @cached_property
    def voxel_r(self) -> np.ndarray:
        """Radial centre (mm) of each voxel of one layer, in file order (radial fastest)."""
        return np.tile(self.r_centres, self.n_alpha)

    @cached_property
    def voxel_alpha(self) -> np.ndarray:
        return np.repeat(self.alpha_centres, self.n_r)

    @cached_property
    def voxel_eta(self) -> np.ndarray:
        return self.voxel_r * np.cos(self.voxel_alpha)

    @cached_property
    def voxel_phi(self) -> np.ndarray:
        return self.voxel_r * np.sin(self.voxel_alpha)

    @cached_property
    def voxel_area(self) -> np.ndarray:
        """Transverse area (mm^2) of each voxel of one layer, in file order."""
        ring = np.pi * (self.r_edges[1:] ** 2 - self.r_edges[:-1] ** 2) / self.n_alpha
        return np.tile(ring, self.n_alpha)

    def layers(self, showers: np.ndarray) -> np.ndarray:
        """View (N, n_voxels) as (N, 45, voxels_per_layer) without copying."""
        return showers.reshape(showers.shape[0], self.n_layers, self.voxels_per_layer)

    def grid(self, showers: np.ndarray) -> np.ndarray:
        """View (N, n_voxels) as (N, 45, n_alpha, n_r) without copying."""
        return showers.reshape(showers.shape[0], self.n_layers, self.n_alpha, self.n_r)


DS2 = Geometry(name="ds2", n_alpha=16, n_r=9)
DS3 = Geometry(name="ds3", n_alpha=50, n_r=18)
DATASETS: dict[str, Geometry] = {"ds2": DS2, "ds3": DS3}


def get_geometry(name: str) -> Geometry:
    try:
        return DATASETS[name.lower()]
    except KeyError:
        raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}") from None


def infer_geometry(n_voxels: int) -> Geometry:
    """The dataset whose shower rows have ``n_voxels`` columns."""
    for geo in DATASETS.values():
        if geo.n_voxels == n_voxels:
            return geo
    known = ", ".join(f"{g.name}={g.n_voxels}" for g in DATASETS.values())
    raise UserError(f"{n_voxels} voxels per shower matches no dataset ({known})")
