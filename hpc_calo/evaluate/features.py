"""High-level shower features with the official CaloChallenge definitions, computed block by block.

Definitions follow CaloChallenge ``HighLevelFeatures.py`` (datasets 2 and 3): voxels below the 15.15 keV
readout threshold are zeroed first (as the official ``evaluate.py`` does for both files); per layer the
energy-weighted centre <x> = sum(x E) / (sum(E) + 1e-16) and width sqrt(max(<x^2> - <x>^2, 0)) for x in
eta, phi, r (voxel centres from ``hpc_calo.geometry``), so an empty layer has centre 0 and width 0; sparsity
is 1 - (fraction of voxels > 0).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from hpc_calo.geometry import THRESHOLD_MEV, Geometry, apply_threshold
from hpc_calo.io import Block, CaloFile

# Per-layer features, in the order the official high-level classifier concatenates them (after E_layer).
LAYER_FEATURES = ("e_layer", "ec_eta", "ec_phi", "width_eta", "width_phi", "sparsity", "ec_r", "width_r")
_EPS = 1e-16


def block_features(showers: np.ndarray, geometry: Geometry) -> dict[str, np.ndarray]:
    """Features of one block of (already thresholded) showers: ``e_tot`` (n,) and each of LAYER_FEATURES (n, 45)."""
    layers = geometry.layers(showers).astype(np.float64)
    e_layer = layers.sum(axis=-1)
    denom = e_layer + _EPS
    out: dict[str, np.ndarray] = {"e_tot": e_layer.sum(axis=-1), "e_layer": e_layer}
    for name, pos in (("eta", geometry.voxel_eta), ("phi", geometry.voxel_phi), ("r", geometry.voxel_r)):
        mean = layers @ pos / denom
        mean_sq = layers @ (pos * pos) / denom
        out[f"ec_{name}"] = mean
        out[f"width_{name}"] = np.sqrt(np.clip(mean_sq - mean**2, 0.0, None))
    out["sparsity"] = 1.0 - (layers > 0).mean(axis=-1)
    return out


@dataclass
class Features:
    """Per-shower features of a whole file, kept in memory (362 float64 per shower)."""

    e_inc: np.ndarray
    e_tot: np.ndarray
    layer: dict[str, np.ndarray]  # name -> (N, 45)

    @property
    def n(self) -> int:
        return len(self.e_inc)

    def high_level_inputs(self) -> np.ndarray:
        """The official high-level classifier / FPD input (N, 362): see ``prepare_high_data_for_classifier``."""
        f = self.layer
        cols = [
            np.log10(self.e_inc)[:, None],
            np.log10(f["e_layer"] + 1e-8),
            f["ec_eta"] / 1e2,
            f["ec_phi"] / 1e2,
            f["width_eta"] / 1e2,
            f["width_phi"] / 1e2,
            np.log10(self.e_tot + 1e-8)[:, None],
            f["sparsity"],
            f["ec_r"] / 1e2,
            f["width_r"] / 1e2,
        ]
        return np.concatenate(cols, axis=1)


@dataclass
class FeatureCollector:
    """Block consumer that fills a ``Features`` record in place."""

    n: int
    geometry: Geometry
    e_inc: np.ndarray = field(init=False)
    e_tot: np.ndarray = field(init=False)
    layer: dict[str, np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        nl = self.geometry.n_layers
        self.e_inc = np.zeros(self.n)
        self.e_tot = np.zeros(self.n)
        self.layer = {k: np.zeros((self.n, nl)) for k in LAYER_FEATURES}

    def __call__(self, block: Block) -> None:
        sl = slice(block.start, block.stop)
        feats = block_features(block.showers, self.geometry)
        self.e_inc[sl] = block.incident_energies
        self.e_tot[sl] = feats["e_tot"]
        for k in LAYER_FEATURES:
            self.layer[k][sl] = feats[k]

    def result(self) -> Features:
        return Features(e_inc=self.e_inc, e_tot=self.e_tot, layer=self.layer)


@dataclass
class ShowerMoments:
    """Block consumer: the mean shower (all voxels) and the largest voxel energy."""

    n_voxels: int
    total: np.ndarray = field(init=False)
    count: int = 0
    vmax: float = 0.0

    def __post_init__(self) -> None:
        self.total = np.zeros(self.n_voxels)

    def __call__(self, block: Block) -> None:
        self.add(block.showers)

    def add(self, showers: np.ndarray) -> None:
        self.total += showers.sum(axis=0, dtype=np.float64)
        self.count += len(showers)
        if len(showers):
            self.vmax = max(self.vmax, float(showers.max()))

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)


@dataclass
class VoxelHistogram:
    """Block consumer: counts of voxel energies in fixed bins (zeros fall below the first edge)."""

    edges: np.ndarray
    counts: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.counts = np.zeros(len(self.edges) - 1, dtype=np.int64)

    def __call__(self, block: Block) -> None:
        vals = block.showers[block.showers >= self.edges[0]]
        self.counts += np.histogram(vals, bins=self.edges)[0]


def scan(
    f: CaloFile,
    consumers: Iterable[Callable[[Block], None]],
    desc: str,
    stop: int | None = None,
    block_size: int | None = None,
) -> None:
    """Read ``f`` once, block by block, threshold each block and hand it to every consumer."""
    consumers = list(consumers)
    stop = f.n if stop is None else min(stop, f.n)
    with tqdm(total=stop, desc=desc, unit="shower", unit_scale=True, leave=False) as bar:
        for block in f.blocks(block_size, stop=stop):
            apply_threshold(block.showers, THRESHOLD_MEV)
            for c in consumers:
                c(block)
            bar.update(len(block.showers))
