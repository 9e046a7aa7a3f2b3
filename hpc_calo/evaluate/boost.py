"""``cls-boost``: a gradient-boosted tree classifier on the high-level features, for the sample sizes users run.

The official DNN test (fixed 50 epochs of batch 1000, unnormalised inputs) was designed for 100k showers: at a
few thousand it takes a few hundred optimiser steps and cannot see even a 10 % energy-scale error. Trees need
no input scaling and few examples. Inputs: log10 E_inc, then every energy relative to E_inc (log10 of
E_layer / E_inc and E_tot / E_inc, so that a scale error is one threshold away), and the official shape
features (centres, widths, sparsity). Same splits as the DNN test (``SplitPlan``): train on train, keep the
iteration count picked by early stopping on an internal slice of train, calibrate isotonically on test, report
AUC and JSD on validation. The same classifier on one feature group at a time (each with log10 E_inc) says which
features give a sample away.
"""

from __future__ import annotations

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.isotonic import IsotonicRegression

from hpc_calo.evaluate.classifier import SPLITS, SplitPlan, _scores
from hpc_calo.evaluate.features import Features
from hpc_calo.geometry import N_LAYERS

MAX_ITER = 300
LEARNING_RATE = 0.1
SHAPES = ("ec_eta", "ec_phi", "width_eta", "width_phi", "sparsity", "ec_r", "width_r")


def _columns() -> dict[str, np.ndarray]:
    """Columns of ``boost_inputs`` per feature group, each group led by log10 E_inc (column 0)."""
    n = N_LAYERS
    block = {k: 1 + n + 1 + i * n + np.arange(n) for i, k in enumerate(SHAPES)}
    groups = {
        "energies": np.arange(1, n + 2),
        "centres": np.r_[block["ec_eta"], block["ec_phi"]],
        "widths": np.r_[block["width_eta"], block["width_phi"]],
        "radial": np.r_[block["ec_r"], block["width_r"]],
        "sparsity": block["sparsity"],
    }
    return {k: np.r_[0, v] for k, v in groups.items()}


GROUPS = _columns()


def boost_inputs(f: Features) -> np.ndarray:
    """(N, 1 + 2 x 45 + 1 + 5 x 45) features; energies as log10(E / E_inc) (1e-8 keeps empty layers finite)."""
    rel = f.layer["e_layer"] / f.e_inc[:, None]
    cols = [
        np.log10(f.e_inc)[:, None],
        np.log10(rel + 1e-8),
        np.log10(f.e_tot / f.e_inc + 1e-8)[:, None],
        *(f.layer[k] for k in SHAPES),
    ]
    return np.concatenate(cols, axis=1).astype(np.float32)


def boost_score(gen: Features, ref: Features, plan: SplitPlan, seed: int,
                group: str | None = None) -> dict[str, object]:
    """Train, calibrate and score the boosted classifier (GEN label 0, REF 1) on the plan's splits; ``group``: on
    that feature group of ``GROUPS`` only."""
    cols = slice(None) if group is None else GROUPS[group]
    rows = {0: boost_inputs(gen)[: plan.n_per_class, cols], 1: boost_inputs(ref)[: plan.n_per_class, cols]}
    x = {s: np.empty((2 * plan.sizes[s], rows[0].shape[1]), np.float32) for s in SPLITS}
    for cls in (0, 1):
        for s_idx, split in enumerate(SPLITS):
            sel = plan.dest_split[cls] == s_idx
            x[split][plan.dest_row[cls][sel]] = rows[cls][sel]
    clf = HistGradientBoostingClassifier(max_iter=MAX_ITER, learning_rate=LEARNING_RATE, early_stopping=True,
                                         validation_fraction=0.2, n_iter_no_change=20, random_state=seed)
    clf.fit(x["train"], plan.labels["train"])
    p_test = clf.predict_proba(x["test"])[:, 1]
    p_val = clf.predict_proba(x["val"])[:, 1]
    iso = IsotonicRegression(out_of_bounds="clip", y_min=1e-6, y_max=1.0 - 1e-6).fit(p_test, plan.labels["test"])
    return {
        **_scores(np.asarray(iso.predict(p_val)), plan.labels["val"]),
        "uncalibrated": _scores(p_val, plan.labels["val"]),
        "iterations": int(clf.n_iter_),
        "input_dim": int(x["train"].shape[1]),
        "split_sizes_per_class": plan.sizes,
    }
