"""Histogram comparisons with the official CaloChallenge binnings: separation power and chi2/NDF.

Binnings follow ``evaluate_plotting_helper.py`` (datasets 2 and 3): E_tot/E_inc 100 bins on [0.5, 1.5];
E_layer 40 log-spaced edges from the readout threshold to the reference's largest layer energy; centres of
energy in eta/phi 100 bins on [-30, 30] mm; widths in eta/phi 100 bins on [0, 30] mm; centre in r 100 bins
on [0, 42] mm; width in r 100 bins on [0, 20] mm; sparsity 20 bins on [0, 1]; voxel energies 50 log-spaced
edges from the threshold to the reference's largest voxel. As with ``plt.hist(density=True)`` entries outside
the binning are dropped before normalising.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpc_calo.evaluate.features import LAYER_FEATURES, THRESHOLD_MEV, Features

# Groups the official ``plot_histograms`` reports; the others use the official helper's binnings too.
OFFICIAL_GROUPS = ("etot_einc", "e_layer", "ec_eta", "ec_phi", "width_eta", "width_phi", "voxel")
GROUP_LABELS = {
    "etot_einc": "E_tot / E_inc",
    "e_layer": "E_layer [MeV]",
    "ec_eta": "centre of energy in eta [mm]",
    "ec_phi": "centre of energy in phi [mm]",
    "width_eta": "width in eta [mm]",
    "width_phi": "width in phi [mm]",
    "ec_r": "centre of energy in r [mm]",
    "width_r": "width in r [mm]",
    "sparsity": "sparsity (fraction of empty voxels)",
    "voxel": "voxel energy [MeV]",
}
_LINEAR = {
    "ec_eta": (-30.0, 30.0, 101),
    "ec_phi": (-30.0, 30.0, 101),
    "width_eta": (0.0, 30.0, 101),
    "width_phi": (0.0, 30.0, 101),
    "ec_r": (0.0, 42.0, 101),
    "width_r": (0.0, 20.0, 101),
    "sparsity": (0.0, 1.0, 21),
}


def log_edges(upper: float, n_edges: int, lower: float = THRESHOLD_MEV) -> np.ndarray:
    """``np.logspace(log10(lower), log10(upper), n_edges)``; a degenerate upper end still gives valid bins."""
    upper = max(float(upper), lower * 10.0)
    return np.logspace(np.log10(lower), np.log10(upper), n_edges)


def feature_edges(group: str, ref: Features, layer: int | None) -> np.ndarray:
    if group == "etot_einc":
        return np.linspace(0.5, 1.5, 101)
    if group == "e_layer":
        assert layer is not None
        return log_edges(ref.layer["e_layer"][:, layer].max(initial=0.0), 40)
    lo, hi, n = _LINEAR[group]
    return np.linspace(lo, hi, n)


def feature_values(group: str, feats: Features, layer: int | None) -> np.ndarray:
    if group == "etot_einc":
        return feats.e_tot / feats.e_inc
    assert layer is not None
    return feats.layer[group][:, layer]


def separation_power(counts_a: np.ndarray, counts_b: np.ndarray) -> float:
    """S = 1/2 sum (h_a - h_b)^2 / (h_a + h_b) of the unit-normalised histograms (0 same, 1 disjoint).

    The official ``_separation_power`` multiplies density histograms by the bin widths, i.e. divides the
    counts by the number of entries inside the binning; it adds 1e-16 to the denominator.
    """
    na, nb = counts_a.sum(), counts_b.sum()
    if na == 0 or nb == 0:
        return float("nan")
    ha, hb = counts_a / na, counts_b / nb
    return float(0.5 * np.sum((ha - hb) ** 2 / (ha + hb + 1e-16)))


def chi2_ndf(counts_a: np.ndarray, counts_b: np.ndarray) -> tuple[float, int]:
    """Chi2 homogeneity test of two unweighted histograms with different totals, and its NDF.

    chi2 = 1/(N_a N_b) sum_i (N_b a_i - N_a b_i)^2 / (a_i + b_i) over bins with a_i + b_i > 0, NDF = (number of
    such bins) - 1 (ROOT ``TH1::Chi2Test`` option "UU"; Gagunashvili, physics/0605123). For two samples of the
    same distribution chi2/NDF is about 1; unlike the separation power it grows with the sample size.
    """
    na, nb = float(counts_a.sum()), float(counts_b.sum())
    used = (counts_a + counts_b) > 0
    ndf = int(used.sum()) - 1
    if na == 0 or nb == 0 or ndf < 1:
        return float("nan"), max(ndf, 0)
    a, b = counts_a[used].astype(np.float64), counts_b[used].astype(np.float64)
    chi2 = float(np.sum((nb * a - na * b) ** 2 / (a + b)) / (na * nb))
    return chi2, ndf


@dataclass(frozen=True)
class HistResult:
    group: str
    layer: int | None  # None for per-shower features (E_tot/E_inc) and the voxel distribution
    edges: np.ndarray
    gen: np.ndarray  # counts
    ref: np.ndarray

    @property
    def separation_power(self) -> float:
        return separation_power(self.gen, self.ref)

    @property
    def chi2_ndf(self) -> tuple[float, int]:
        if self.group == "voxel":
            # The test assumes independent entries; the voxels of one shower are not (two independent samples
            # of one distribution give chi2/NDF ~ 20), so it is not reported for them.
            return float("nan"), 0
        return chi2_ndf(self.gen, self.ref)

    def to_json(self) -> dict[str, object]:
        chi2, ndf = self.chi2_ndf
        return {
            "group": self.group,
            "layer": self.layer,
            "separation_power": self.separation_power,
            "chi2": chi2,
            "ndf": ndf,
            "chi2_ndf": chi2 / ndf if ndf > 0 else float("nan"),
            "n_gen_in_range": int(self.gen.sum()),
            "n_ref_in_range": int(self.ref.sum()),
        }


def feature_histograms(gen: Features, ref: Features, n_layers: int) -> list[HistResult]:
    """Every high-level feature histogram (E_tot/E_inc, then 45 per layer for each layer feature)."""
    out = []
    specs: list[tuple[str, int | None]] = [("etot_einc", None)]
    specs += [(g, layer) for g in LAYER_FEATURES for layer in range(n_layers)]
    for group, layer in specs:
        edges = feature_edges(group, ref, layer)
        hg = np.histogram(feature_values(group, gen, layer), bins=edges)[0]
        hr = np.histogram(feature_values(group, ref, layer), bins=edges)[0]
        out.append(HistResult(group, layer, edges, hg, hr))
    return out
