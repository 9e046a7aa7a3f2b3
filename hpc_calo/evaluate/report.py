"""report.md: the headline table first, then per-feature tables; every number is also in report.json."""

from __future__ import annotations

from pathlib import Path

from hpc_calo.atomic import atomic_path
from hpc_calo.evaluate.histograms import GROUP_LABELS, OFFICIAL_GROUPS


def _f(x: object, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def _headline(r: dict) -> list[str]:
    lines = ["| metric | value |", "|---|---|"]
    for g, s in r.get("histograms", {}).get("groups", {}).items():
        tag = "" if g in OFFICIAL_GROUPS else " (helper binning, not in the official summary)"
        lines.append(
            f"| separation power, {GROUP_LABELS[g]}{tag} | mean {_f(s['mean_separation_power'])}, "
            f"max {_f(s['max_separation_power'])} (chi2/NDF mean {_f(s['mean_chi2_ndf'])}) |"
        )
    for key, name in (("cls_low", "low-level (voxels)"), ("cls_high", "high-level (362 features)")):
        if key in r:
            c = r[key]
            lines.append(
                f"| classifier {name}: AUC / JSD (calibrated) | {c['auc']:.4f} / {c['jsd']:.4f} "
                f"(best epoch {c['best_epoch']} of {c['epochs_run']}) |"
            )
    for key, name in (("cls_low", "low-level"), ("cls_high", "high-level")):
        if key in r and r[key].get("warning"):
            lines.append(f"| {name} DNN test: WARNING | {r[key]['warning']} |")
    if "cls_boost" in r:
        c = r["cls_boost"]
        lines.append(f"| classifier cls-boost (gradient-boosted trees, high-level): AUC / JSD (calibrated) | "
                     f"{c['auc']:.4f} / {c['jsd']:.4f} ({c['iterations']} trees) |")
        if "groups" in c:
            per = ", ".join(f"{g} {auc:.3f}" for g, auc in c["groups"].items())
            lines.append(f"| cls-boost on one feature group at a time (with E_inc): AUC | {per} |")
    if "fpd" in r:
        lines.append(f"| FPD x 10^3 | {1e3 * r['fpd']['value']:.4f} ± {1e3 * r['fpd']['error']:.4f} |")
        lines.append(f"| KPD x 10^3 | {1e3 * r['kpd']['value']:.4f} ± {1e3 * r['kpd']['error']:.4f} |")
    m = r["mean_e_tot_over_e_inc"]
    lines.append(f"| mean E_tot / E_inc (GEN / REF) | {m['gen']:.4f} / {m['ref']:.4f} |")
    return lines


def _layer_tables(r: dict) -> list[str]:
    feats = r.get("histograms", {}).get("features", [])
    groups = [
        g
        for g in dict.fromkeys(f["group"] for f in feats)
        if any(f["layer"] is not None for f in feats if f["group"] == g)
    ]
    if not groups:
        return []
    table = {(f["group"], f["layer"]): f for f in feats}
    out = []
    for key, title in (("separation_power", "Separation power"), ("chi2_ndf", "chi2 / NDF")):
        out += [
            "",
            f"### {title} per layer",
            "",
            "| layer | " + " | ".join(groups) + " |",
            "|---|" + "---|" * len(groups),
        ]
        layers = sorted({f["layer"] for f in feats if f["layer"] is not None})
        for layer in layers:
            out.append(f"| {layer} | " + " | ".join(_f(table[(g, layer)][key], 3) for g in groups) + " |")
    singles = [f for f in feats if f["layer"] is None]
    if singles:
        out += [
            "",
            "### Per-shower distributions",
            "",
            "| histogram | separation power | chi2 / NDF |",
            "|---|---|---|",
        ]
        out += [f"| {GROUP_LABELS[f['group']]} | {_f(f['separation_power'])} | {_f(f['chi2_ndf'])} |" for f in singles]
    return out


def write_markdown(r: dict, path: Path) -> None:
    e = r["incident_energies"]
    lines = [f"# Evaluation of {Path(r['gen']).name} against {Path(r['ref']).name} ({r['dataset']})", ""]
    if not e["ok"]:
        lines += [f"> **WARNING: incident energies do not match.** {e['message']}.", ""]
    lines += [
        f"GEN: `{r['gen']}` ({r['n_gen']} showers); REF: `{r['ref']}` ({r['n_ref']} showers); "
        f"incident energies: {e['status']}. Voxels below {r['threshold_mev'] * 1e3:.2f} keV set to 0 (official).",
        f"Created {r['created']}; metrics {', '.join(r['metrics'])}; classifier epochs {r['epochs']}, "
        f"hidden {r['cls_hidden']}, batch {r['cls_batch']}, seed {r['seed']}, device {r['device']}.",
        "",
        "## Headline",
        "",
        *_headline(r),
        "",
        "Separation power S = 1/2 sum (h_GEN - h_REF)^2 / (h_GEN + h_REF) of unit-normalised histograms "
        "(0: identical, 1: disjoint). chi2/NDF: two-sample chi2 homogeneity test (ROOT Chi2Test UU); "
        "about 1 for samples of one distribution (not given for voxel energies: the voxels of one shower are "
        "correlated, which the test does not allow for). AUC 0.5 / JSD 0: the classifier cannot tell GEN from REF.",
    ]
    if r.get("figures"):
        lines += ["", "## Figures", "", *[f"- [{p}]({p})" for p in r["figures"]]]
    lines += _layer_tables(r)
    lines += ["", "## Timings (s)", "", *[f"- {k}: {v:.1f}" for k, v in r["timings"].items()], ""]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))
