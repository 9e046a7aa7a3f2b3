"""PNG figures of an evaluation: average showers, feature histograms with ratio panels, separation powers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from hpc_calo.evaluate.histograms import GROUP_LABELS, HistResult
from hpc_calo.geometry import Geometry

_GEN, _REF = "tab:red", "tab:blue"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw(figures: Sequence[Callable[[], list[Path]]], workers: int) -> list[Path]:
    """Draw independent figures, in ``workers`` processes when more than one: matplotlib draws on one core, and
    a report's per-layer grids alone take ~35 s of it. Heaviest first: the pool takes them in order. Returns the
    files written, in that order."""
    if workers <= 1 or len(figures) <= 1:
        return [p for f in figures for p in f()]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: the parent holds torch's OpenMP threads, which a forked child must not inherit.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(figures)), mp_context=ctx) as pool:
        return [p for done in [pool.submit(f) for f in figures] for p in done.result()]


def _unit(counts: np.ndarray, edges: np.ndarray) -> np.ndarray:
    n = counts.sum()
    return counts / (n * np.diff(edges)) if n else np.zeros(len(counts))


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / b, np.nan)


def _few_log_ticks(axis, small: bool) -> None:
    # Matplotlib's default log minor ticks are ~10 tick objects per decade per axis; on the 90 small axes of a
    # per-layer grid they made one figure take a minute.
    from matplotlib.ticker import LogLocator, NullLocator

    axis.set_major_locator(LogLocator(numticks=4 if small else 8))
    axis.set_minor_locator(NullLocator())


def _hist_pair(ax, rax, h: HistResult, title: str, small: bool) -> None:
    g, r = _unit(h.gen, h.edges), _unit(h.ref, h.edges)
    ax.stairs(r, h.edges, fill=True, alpha=0.3, color=_REF, label="REF")
    ax.stairs(g, h.edges, color=_GEN, lw=1.0 if small else 1.8, label="GEN")
    rax.stairs(_ratio(g, r), h.edges, color=_GEN, lw=0.8)
    rax.axhline(1.0, color="k", lw=0.5)
    rax.set_ylim(0.5, 1.5)
    log_x = h.group in ("e_layer", "voxel")
    for a in (ax, rax):
        a.set_xlim(h.edges[0], h.edges[-1])
        if log_x:
            a.set_xscale("log")
            _few_log_ticks(a.xaxis, small)
    if h.group not in ("etot_einc", "sparsity") and r.max(initial=0) > 0:
        ax.set_yscale("log")
        _few_log_ticks(ax.yaxis, small)
    ax.tick_params(labelbottom=False, labelsize=5 if small else 9)
    rax.tick_params(labelsize=5 if small else 9)
    if small:
        # Few ticks: building tick objects dominates the drawing time of a 90-panel grid.
        from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator

        ax.xaxis.set_major_locator(NullLocator())  # the ratio panel below carries the x labels
        rax.yaxis.set_major_locator(FixedLocator([0.5, 1.0, 1.5]))
        for axis in (rax.xaxis, ax.yaxis):
            if axis.get_scale() == "linear":
                axis.set_major_locator(MaxNLocator(3))
    ax.set_title(f"{title}  S={h.separation_power:.3g}", fontsize=6 if small else 10)


def plot_single(h: HistResult, path: Path) -> list[Path]:
    plt = _plt()
    fig, (ax, rax) = plt.subplots(2, 1, figsize=(6, 5), sharex=False, height_ratios=(3, 1))
    _hist_pair(ax, rax, h, GROUP_LABELS[h.group], small=False)
    ax.legend()
    rax.set_xlabel(GROUP_LABELS[h.group])
    rax.set_ylabel("GEN / REF")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_layer_grid(hists: Sequence[HistResult], path: Path, ncols: int = 9) -> list[Path]:
    """All 45 per-layer histograms of one feature, each with its GEN/REF ratio panel."""
    plt = _plt()
    nrows = -(-len(hists) // ncols)
    fig = plt.figure(figsize=(2.1 * ncols, 2.3 * nrows))
    outer = fig.add_gridspec(nrows, ncols, hspace=0.45, wspace=0.3, left=0.03, right=0.99, bottom=0.03, top=0.95)
    for i, h in enumerate(hists):
        inner = outer[i // ncols, i % ncols].subgridspec(2, 1, height_ratios=(3, 1), hspace=0.05)
        ax, rax = fig.add_subplot(inner[0]), fig.add_subplot(inner[1])
        _hist_pair(ax, rax, h, f"layer {h.layer}", small=True)
        if i == 0:
            ax.legend(fontsize=5)
    fig.suptitle(f"{GROUP_LABELS[hists[0].group]} per layer (ratio panels: GEN / REF, 0.5-1.5)")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return [path]


def plot_separation(hists: Sequence[HistResult], path: Path) -> list[Path]:
    """Separation power versus layer for every per-layer feature."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 5))
    groups = sorted({h.group for h in hists if h.layer is not None}, key=list(GROUP_LABELS).index)
    for g in groups:
        hs = sorted((h for h in hists if h.group == g), key=lambda h: h.layer)
        ax.plot([h.layer for h in hs], [max(h.separation_power, 1e-6) for h in hs], marker=".", label=g)
    for h in hists:
        if h.layer is None:
            ax.axhline(max(h.separation_power, 1e-6), ls="--", lw=0.8, color="gray")
            ax.text(44.5, max(h.separation_power, 1e-6), h.group, fontsize=7, ha="right", va="bottom")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("separation power")
    ax.set_title("Separation power per layer (dashed: E_tot/E_inc, voxel energies)")
    ax.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_average_showers(geo: Geometry, gen: np.ndarray, ref: np.ndarray, out: Path) -> list[Path]:
    """Average shower per layer in the (alpha, r) plane: GEN, REF (shared log scale) and GEN / REF."""
    from matplotlib.colors import LogNorm

    plt = _plt()
    g, r = geo.grid(gen[None])[0], geo.grid(ref[None])[0]
    vmax = max(float(r.max()), 1e-6)
    norm_e = LogNorm(vmin=max(vmax * 1e-6, 1e-6), vmax=vmax)
    theta = np.linspace(-np.pi, np.pi, geo.n_alpha + 1)
    # One figure for the three images: building 45 polar axes costs far more than drawing them, so the meshes
    # are made once and only their data, norm and colour map change between the saved images.
    fig, axes = plt.subplots(5, 9, figsize=(16, 9.5), subplot_kw={"projection": "polar"})
    meshes = []
    for layer, ax in enumerate(axes.flat):
        meshes.append(ax.pcolormesh(theta, geo.r_edges, np.ones((geo.n_r, geo.n_alpha)), shading="flat"))
        ax.set_axis_off()  # no polar grid or ticks: they cost more to draw than the data
        ax.set_title(f"layer {layer}", fontsize=8)
    bar = fig.colorbar(meshes[0], ax=axes, fraction=0.02, pad=0.02)
    paths = []
    for name, data, norm, cmap, label in (
        ("gen", g, norm_e, "viridis", "GEN mean energy [MeV]"),
        ("ref", r, norm_e, "viridis", "REF mean energy [MeV]"),
        ("ratio", _ratio(g, r), LogNorm(vmin=0.5, vmax=2.0), "coolwarm", "GEN / REF"),
    ):
        for layer, mesh in enumerate(meshes):
            mesh.set_array(np.clip(np.nan_to_num(data[layer], nan=1.0), norm.vmin, None).T.ravel())
            mesh.set_norm(norm)
            mesh.set_cmap(cmap)
        bar.update_normal(meshes[0])
        bar.set_label(label)
        fig.suptitle(f"Average shower per layer: {label}")
        p = out / f"average_shower_{name}.png"
        fig.savefig(p, dpi=80)
        paths.append(p)
    plt.close(fig)
    return paths


def plot_profiles(geo: Geometry, gen: np.ndarray, ref: np.ndarray, path: Path) -> list[Path]:
    """Mean longitudinal (per layer) and radial (per r bin) energy profiles with ratio panels."""
    plt = _plt()
    g, r = geo.grid(gen[None])[0], geo.grid(ref[None])[0]
    fig, axes = plt.subplots(2, 2, figsize=(11, 6), height_ratios=(3, 1), sharex="col")
    for col, (gg, rr, x, xlabel) in enumerate(
        (
            (g.sum(axis=(1, 2)), r.sum(axis=(1, 2)), np.arange(geo.n_layers), "layer"),
            (g.sum(axis=(0, 1)), r.sum(axis=(0, 1)), geo.r_centres, "r [mm]"),
        )
    ):
        ax, rax = axes[0, col], axes[1, col]
        ax.plot(x, rr, "o-", color=_REF, label="REF", ms=3)
        ax.plot(x, gg, "s--", color=_GEN, label="GEN", ms=3)
        ax.set_yscale("log")
        ax.set_ylabel("mean energy [MeV]")
        ax.legend()
        rax.plot(x, _ratio(gg, rr), "s-", color=_GEN, ms=3)
        rax.axhline(1.0, color="k", lw=0.5)
        rax.set_ylim(0.5, 1.5)
        rax.set_xlabel(xlabel)
        rax.set_ylabel("GEN / REF")
    axes[0, 0].set_title("Longitudinal profile")
    axes[0, 1].set_title("Radial profile")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
