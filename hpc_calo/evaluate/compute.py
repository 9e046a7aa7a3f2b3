"""The computing half of an evaluation: stream both files, compute every requested metric, write the report
directory. Imported by :func:`hpc_calo.evaluate.pipeline.evaluate` once the request has passed its checks."""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from datetime import UTC, datetime
from functools import partial

import h5py
import numpy as np

from hpc_calo.atomic import atomic_path
from hpc_calo.cpus import governed_threads
from hpc_calo.errors import UserError
from hpc_calo.evaluate import plots
from hpc_calo.evaluate.boost import GROUPS, boost_score
from hpc_calo.evaluate.classifier import ClassifierConfig, ClassifierData, LowLevelWriter, SplitPlan, train_and_score
from hpc_calo.evaluate.config import EvaluateRequest
from hpc_calo.evaluate.distances import FPDConfig, KPDConfig, fpd, kpd
from hpc_calo.evaluate.energies import compare_incident_energies
from hpc_calo.evaluate.features import (
    LAYER_FEATURES,
    THRESHOLD_MEV,
    FeatureCollector,
    ShowerMoments,
    VoxelHistogram,
    scan,
)
from hpc_calo.evaluate.histograms import HistResult, feature_histograms, log_edges
from hpc_calo.evaluate.report import write_markdown
from hpc_calo.geometry import Geometry
from hpc_calo.io import CaloFile
from hpc_calo.outputs import REPORT_DIR, REPORT_FORMAT


def _warn(msg: str) -> None:
    print(f"WARNING: {msg}", file=sys.stderr)


CLASSIFIERS = {"cls-low", "cls-high", "cls-boost"}
# The official DNN test on 2 x 100k showers: 120 batches of 1000 per epoch x 50 epochs. Far fewer steps and the
# DNN has not learnt enough to see a real difference: its AUC then says little.
OFFICIAL_STEPS = 6000


def _checked_steps(result: dict[str, object]) -> dict[str, object]:
    """Record the optimiser steps the DNN test took; warn when they are far below the official test's."""
    sizes = result["split_sizes_per_class"]
    assert isinstance(sizes, dict)
    steps = int(result["epochs_run"]) * -(-2 * sizes["train"] // int(result["batch_size"]))
    result["optimiser_steps"] = steps
    if steps < OFFICIAL_STEPS // 4:
        result["warning"] = (f"{steps} optimiser steps against the official test's {OFFICIAL_STEPS}: too few examples "
                             "for this DNN to see moderate differences; read cls-boost")
        _warn(f"classifier: {result['warning']}")
    return result


def _cls_config(cfg: EvaluateRequest) -> ClassifierConfig:
    return ClassifierConfig(
        epochs=cfg.epochs,
        hidden=cfg.cls_hidden,
        batch_size=cfg.cls_batch,
        device=cfg.device,
        seed=cfg.seed,
        buffer_bytes=cfg.buffer_mb * 2**20,
    )


def _json_safe(obj: object) -> object:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def group_summary(hists: list[HistResult]) -> dict[str, dict[str, float]]:
    out = {}
    for g in dict.fromkeys(h.group for h in hists):
        s = np.array([h.separation_power for h in hists if h.group == g])
        c = [h.chi2_ndf for h in hists if h.group == g]
        r = np.array([x / n if n > 0 else np.nan for x, n in c])
        out[g] = {
            "mean_separation_power": float(np.nanmean(s)) if np.isfinite(s).any() else float("nan"),
            "max_separation_power": float(np.nanmax(s)) if np.isfinite(s).any() else float("nan"),
            "mean_chi2_ndf": float(np.nanmean(r)) if np.isfinite(r).any() else float("nan"),
            "n_histograms": len(s),
        }
    return out


def run(cfg: EvaluateRequest, geo: Geometry) -> dict[str, object]:
    """Compute every requested metric and write the report (``evaluate`` has checked the request)."""
    cls_cfg = _cls_config(cfg) if CLASSIFIERS & set(cfg.metrics) else None
    t_start = time.perf_counter()
    threads = governed_threads(cfg.threads)
    workers = threads.ceiling
    timings: dict[str, float] = {}
    report: dict[str, object] = {}
    with CaloFile(cfg.gen, geo) as fg, CaloFile(cfg.ref, geo) as fr, atomic_path(cfg.out, REPORT_DIR) as tmp:
        for f in (fg, fr):
            if f.n < 10:
                raise UserError(f"{f.path}: {f.n} showers; the evaluation needs at least 10")
        tmp.mkdir(parents=True)
        with h5py.File(cfg.gen, "r") as hg, h5py.File(cfg.ref, "r") as hr:
            energy_check = compare_incident_energies(hg["incident_energies"][:, 0], hr["incident_energies"][:, 0])
        if not energy_check["ok"]:
            _warn(str(energy_check["message"]))

        n_cls = min(fg.n, fr.n)
        plan: SplitPlan | None = None
        if CLASSIFIERS & set(cfg.metrics):
            if fg.n != fr.n:
                _warn(f"GEN has {fg.n} showers and REF {fr.n}: the classifiers use the first {n_cls} of each")
            assert cls_cfg is not None
            plan = SplitPlan.make(n_cls, cls_cfg)
        low = ClassifierData(tmp / "_cls_low", plan, 1 + geo.n_voxels) if plan and "cls-low" in cfg.metrics else None

        t = time.perf_counter()
        ref_feat, ref_mom = FeatureCollector(fr.n, geo), ShowerMoments(geo.n_voxels)
        consumers: list = [ref_feat, ref_mom] + ([LowLevelWriter(low, 1)] if low else [])
        scan(fr, consumers, "REF pass 1", block_size=cfg.block_size)
        vox_edges = log_edges(ref_mom.vmax, 50)
        gen_feat, gen_mom = FeatureCollector(fg.n, geo), ShowerMoments(geo.n_voxels)
        gen_vox, ref_vox = VoxelHistogram(vox_edges), VoxelHistogram(vox_edges)
        consumers = [gen_feat, gen_mom] + ([gen_vox] if "hist" in cfg.metrics else [])
        consumers += [LowLevelWriter(low, 0)] if low else []
        scan(fg, consumers, "GEN pass 1", block_size=cfg.block_size)
        if "hist" in cfg.metrics:  # voxel bins need REF's largest voxel, known only after pass 1
            scan(fr, [ref_vox], "REF voxel histogram", block_size=cfg.block_size)
        timings["read_features_s"] = time.perf_counter() - t
        gen_f, ref_f = gen_feat.result(), ref_feat.result()

        hists: list[HistResult] = []
        if "hist" in cfg.metrics:
            t = time.perf_counter()
            hists = feature_histograms(gen_f, ref_f, geo.n_layers)
            hists.append(HistResult("voxel", None, vox_edges, gen_vox.counts, ref_vox.counts))
            report["histograms"] = {
                "groups": group_summary(hists),
                "features": [h.to_json() for h in hists],
                "voxel_edges_mev": [float(vox_edges[0]), float(vox_edges[-1])],
            }
            timings["histograms_s"] = time.perf_counter() - t

        if low is not None:
            assert cls_cfg is not None
            t = time.perf_counter()
            try:
                report["cls_low"] = _checked_steps(train_and_score(low, cls_cfg, "classifier low-level", threads))
            finally:
                low.close()
                shutil.rmtree(tmp / "_cls_low", ignore_errors=True)
            timings["cls_low_s"] = time.perf_counter() - t
        if "cls-high" in cfg.metrics:
            assert cls_cfg is not None and plan is not None
            t = time.perf_counter()
            high = ClassifierData(tmp / "_cls_high", plan, 362)
            try:
                for c, feats in ((0, gen_f), (1, ref_f)):
                    x = feats.high_level_inputs()[:n_cls]
                    high.add(c, np.arange(n_cls), x)
                report["cls_high"] = _checked_steps(train_and_score(high, cls_cfg, "classifier high-level", threads))
            finally:
                high.close()
                shutil.rmtree(tmp / "_cls_high", ignore_errors=True)
            timings["cls_high_s"] = time.perf_counter() - t
        if "cls-boost" in cfg.metrics:
            assert plan is not None
            t = time.perf_counter()
            report["cls_boost"] = boost_score(gen_f, ref_f, plan, cfg.seed)
            report["cls_boost"]["groups"] = {g: boost_score(gen_f, ref_f, plan, cfg.seed, g)["auc"] for g in GROUPS}
            timings["cls_boost_s"] = time.perf_counter() - t
        if "fpd" in cfg.metrics:
            t = time.perf_counter()
            x_ref, x_gen = ref_f.high_level_inputs(), gen_f.high_level_inputs()
            n_min = min(len(x_ref), len(x_gen))
            # CaloChallenge settings for >= 50k showers; smaller files shrink the sample sizes to N.
            fcfg = FPDConfig(min_samples=min(10_000, n_min // 5), max_samples=min(50_000, n_min), seed=cfg.seed + 42)
            kcfg = KPDConfig(batch_size=min(10_000, n_min), seed=cfg.seed + 42)
            fpd_val, fpd_err = fpd(x_ref, x_gen, fcfg)
            t_fpd = time.perf_counter() - t
            kpd_val, kpd_err = kpd(x_ref, x_gen, kcfg)
            report["fpd"] = {"value": fpd_val, "error": fpd_err, "config": vars(fcfg), "seconds": t_fpd}
            report["kpd"] = {"value": kpd_val, "error": kpd_err, "config": vars(kcfg)}
            timings["fpd_kpd_s"] = time.perf_counter() - t

        if cfg.plots:
            t = time.perf_counter()
            figures = [partial(plots.plot_layer_grid, [h for h in hists if h.group == g], tmp / f"hist_{g}.png")
                       for g in (LAYER_FEATURES if hists else ())]
            figures += [partial(plots.plot_average_showers, geo, gen_mom.mean, ref_mom.mean, tmp),
                        partial(plots.plot_profiles, geo, gen_mom.mean, ref_mom.mean, tmp / "profiles.png")]
            if hists:
                figures += [partial(plots.plot_single, h, tmp / f"hist_{h.group}.png")
                            for h in hists if h.layer is None]
                figures.append(partial(plots.plot_separation, hists, tmp / "separation_power.png"))
            report["figures"] = [p.name for p in plots.draw(figures, workers)]
            timings["plots_s"] = time.perf_counter() - t

        timings["total_s"] = time.perf_counter() - t_start
        report = {
            "format": REPORT_FORMAT,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "gen": str(cfg.gen),
            "ref": str(cfg.ref),
            "dataset": geo.name,
            "n_gen": fg.n,
            "n_ref": fr.n,
            "threshold_mev": THRESHOLD_MEV,
            "metrics": list(cfg.metrics),
            "seed": cfg.seed,
            "device": cfg.device,
            "epochs": cfg.epochs,
            "cls_hidden": cfg.cls_hidden,
            "cls_batch": cfg.cls_batch,
            "incident_energies": energy_check,
            "mean_e_tot_over_e_inc": {
                "gen": float(np.mean(gen_f.e_tot / gen_f.e_inc)),
                "ref": float(np.mean(ref_f.e_tot / ref_f.e_inc)),
            },
            **report,
            "timings": timings,
        }
        report = _json_safe(report)  # type: ignore[assignment]
        (tmp / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        write_markdown(report, tmp / "report.md")
    return report
