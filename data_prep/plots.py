"""Diagnostic PNGs of a CaloChallenge file: average shower, longitudinal and radial profiles, response, sparsity.

Everything is accumulated in one streaming pass over the file, so it works on files larger than memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpc_calo.atomic import atomic_path
from hpc_calo.evaluate.features import ShowerMoments
from hpc_calo.geometry import Geometry
from hpc_calo.io import iter_blocks

# Incident-energy bins (MeV) for the longitudinal profile: one per decade of the CaloChallenge range.
E_BINS_MEV = (1e3, 1e4, 1e5, 1e6)
RESPONSE_BINS = np.linspace(0.5, 1.5, 101)  # the official E_tot/E_inc binning


@dataclass
class Accumulator:
    """Streaming sums of everything the plots show."""

    geometry: Geometry
    n: int = 0
    moments: ShowerMoments = field(init=False)  # the average shower
    layer_frac_sum: np.ndarray = field(init=False)  # (n_ebins, 45)
    layer_frac_n: np.ndarray = field(init=False)
    radial_sum: np.ndarray = field(init=False)  # (n_r,) energy fraction per ring
    zero_sum: np.ndarray = field(init=False)  # (45,) zero voxels per layer
    response_hist: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        g = self.geometry
        self.moments = ShowerMoments(g.n_voxels)
        self.layer_frac_sum = np.zeros((len(E_BINS_MEV) - 1, g.n_layers))
        self.layer_frac_n = np.zeros(len(E_BINS_MEV) - 1)
        self.radial_sum = np.zeros(g.n_r)
        self.zero_sum = np.zeros(g.n_layers)
        self.response_hist = np.zeros(len(RESPONSE_BINS) - 1)

    def add(self, e_inc: np.ndarray, showers: np.ndarray) -> None:
        g = self.geometry
        s = showers.astype(np.float64)
        self.n += len(e_inc)
        self.moments.add(showers)
        e_tot = s.sum(axis=1)
        layer_e = g.layers(s).sum(axis=2)
        frac = layer_e / np.maximum(e_tot, 1e-30)[:, None]
        ebin = np.clip(np.searchsorted(E_BINS_MEV, e_inc, side="right") - 1, 0, len(E_BINS_MEV) - 2)
        np.add.at(self.layer_frac_sum, ebin, frac)
        self.layer_frac_n += np.bincount(ebin, minlength=len(E_BINS_MEV) - 1)
        ring = g.grid(s).sum(axis=(1, 2))
        self.radial_sum += (ring / np.maximum(e_tot, 1e-30)[:, None]).sum(axis=0)
        self.zero_sum += (g.layers(showers) == 0).sum(axis=(0, 2))
        self.response_hist += np.histogram(np.clip(e_tot / e_inc, 0.5, 1.5 - 1e-9), RESPONSE_BINS)[0]


def accumulate(path: str | os.PathLike[str], geometry: Geometry) -> Accumulator:
    acc = Accumulator(geometry)
    for block in iter_blocks(path, geometry):
        acc.add(block.incident_energies, block.showers)
    return acc


def _save(fig: object, target: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=110)  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]
    return target


def plot_file(path: str | os.PathLike[str], out_dir: str | os.PathLike[str], geometry: Geometry) -> list[Path]:
    """Write average_shower.png, longitudinal.png, radial.png, response.png, sparsity.png into out_dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    acc = accumulate(path, geometry)
    g = geometry
    written: list[Path] = []

    # Average shower: one polar image per layer, common log colour scale.
    mean = g.grid(acc.moments.mean[None, :])[0]  # (45, n_alpha, n_r)
    positive = mean[mean > 0]
    norm = LogNorm(vmin=max(positive.min(), 1e-4), vmax=positive.max()) if positive.size else None
    fig, axes = plt.subplots(5, 9, figsize=(18, 10.5), subplot_kw={"projection": "polar"})
    a_mesh, r_mesh = np.meshgrid(g.alpha_edges, g.r_edges, indexing="ij")
    for layer, ax in enumerate(axes.flat):
        img = np.where(mean[layer] > 0, mean[layer], np.nan)
        mesh = ax.pcolormesh(a_mesh, r_mesh, img, norm=norm, cmap="viridis", shading="flat")
        ax.set_title(f"layer {layer}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(mesh, ax=axes, shrink=0.6, label="mean voxel energy [MeV]")
    fig.suptitle(f"{g.name}: average shower per layer ({acc.n} showers)")
    written.append(_save(fig, out / "average_shower.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i in range(len(E_BINS_MEV) - 1):
        if acc.layer_frac_n[i]:
            label = f"{E_BINS_MEV[i] / 1e3:g}-{E_BINS_MEV[i + 1] / 1e3:g} GeV ({int(acc.layer_frac_n[i])})"
            ax.step(np.arange(g.n_layers), acc.layer_frac_sum[i] / acc.layer_frac_n[i], where="mid", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean fraction of E_tot")
    ax.set_title(f"{g.name}: mean longitudinal profile")
    ax.legend()
    written.append(_save(fig, out / "longitudinal.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ring_area = np.pi * (g.r_edges[1:] ** 2 - g.r_edges[:-1] ** 2)
    ax.step(g.r_centres, acc.radial_sum / acc.n / ring_area, where="mid")
    ax.set_yscale("log")
    ax.set_xlabel("r [mm]")
    ax.set_ylabel("mean fraction of E_tot per mm$^2$")
    ax.set_title(f"{g.name}: mean radial profile")
    written.append(_save(fig, out / "radial.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.stairs(acc.response_hist / acc.n, RESPONSE_BINS)
    ax.set_xlabel("E_tot / E_inc (clipped to [0.5, 1.5])")
    ax.set_ylabel("fraction of showers")
    ax.set_title(f"{g.name}: response")
    written.append(_save(fig, out / "response.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.step(np.arange(g.n_layers), acc.zero_sum / (acc.n * g.voxels_per_layer), where="mid")
    ax.set_xlabel("layer")
    ax.set_ylabel("sparsity (fraction of zero voxels)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{g.name}: sparsity per layer")
    written.append(_save(fig, out / "sparsity.png"))
    return written
