"""Unit tests of the evaluation metrics against hand-built showers and independent transcriptions."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from hpc_calo.evaluate.classifier import ClassifierConfig, ClassifierData, SplitPlan, _batches
from hpc_calo.evaluate.distances import (
    FPDConfig,
    KPDConfig,
    fpd,
    frechet_distance,
    kpd,
    mmd2_poly_unbiased,
    sample_frechet_distance,
)
from hpc_calo.evaluate.energies import compare_incident_energies
from hpc_calo.evaluate.features import LAYER_FEATURES, THRESHOLD_MEV, FeatureCollector, scan
from hpc_calo.evaluate.histograms import chi2_ndf, feature_histograms, separation_power
from hpc_calo.geometry import DS2
from hpc_calo.io import CaloFile, CaloWriter


def test_features_of_a_hand_built_shower() -> None:
    geo = DS2
    shower = np.zeros((1, geo.n_voxels), np.float32)
    grid = geo.grid(shower)
    # Layer 3: 3 MeV at (alpha bin 0, r bin 1) and 1 MeV at (alpha bin 8, r bin 4); one sub-threshold voxel.
    grid[0, 3, 0, 1], grid[0, 3, 8, 4], grid[0, 3, 5, 5] = 3.0, 1.0, 0.5 * THRESHOLD_MEV
    # Layer 10: one voxel only: centre at that voxel, width 0.
    grid[0, 10, 4, 2] = 2.0
    path_e = np.array([1000.0])
    from hpc_calo.evaluate.features import block_features
    from hpc_calo.geometry import apply_threshold

    f = block_features(apply_threshold(shower.copy()), geo)
    r_mid = (np.arange(9) + 0.5) * 4.65
    a_mid = -np.pi + (np.arange(16) + 0.5) * 2 * np.pi / 16
    x1 = (r_mid[1] * np.cos(a_mid[0]), r_mid[1] * np.sin(a_mid[0]), r_mid[1])
    x2 = (r_mid[4] * np.cos(a_mid[8]), r_mid[4] * np.sin(a_mid[8]), r_mid[4])
    for k, name in enumerate(("eta", "phi", "r")):
        mean = (3 * x1[k] + 1 * x2[k]) / 4
        width = math.sqrt((3 * x1[k] ** 2 + x2[k] ** 2) / 4 - mean**2)
        assert f[f"ec_{name}"][0, 3] == pytest.approx(mean, rel=1e-9, abs=1e-9)
        assert f[f"width_{name}"][0, 3] == pytest.approx(width, rel=1e-6)
        assert f[f"width_{name}"][0, 10] == pytest.approx(0.0, abs=1e-5)
        # Empty layers: centre 0 and width 0, as in the official code.
        assert f[f"ec_{name}"][0, 0] == 0.0 and f[f"width_{name}"][0, 0] == 0.0
    assert f["ec_r"][0, 10] == pytest.approx(r_mid[2])
    assert f["e_layer"][0, 3] == pytest.approx(4.0)  # the sub-threshold voxel is gone
    assert f["e_tot"][0] == pytest.approx(6.0)
    assert f["sparsity"][0, 3] == pytest.approx(1 - 2 / 144)
    assert f["sparsity"][0, 0] == 1.0
    assert path_e[0] == 1000.0


def _official_loop_features(e_inc: np.ndarray, showers: np.ndarray) -> dict[str, np.ndarray]:
    """Direct, loop-based transcription of CaloChallenge HighLevelFeatures.py for DS2 (independent check)."""
    n_alpha, n_r = 16, 9
    r_edges = [i * 4.65 for i in range(10)]
    r_mid = [(r_edges[i] + r_edges[i + 1]) / 2 for i in range(n_r)]
    a_edges = np.linspace(-math.pi, math.pi, n_alpha + 1)
    a_mid = [(a_edges[i] + a_edges[i + 1]) / 2 for i in range(n_alpha)]
    out = {k: np.zeros((len(showers), 45)) for k in LAYER_FEATURES}
    out["e_tot"] = np.zeros(len(showers))
    for s in range(len(showers)):
        x = np.where(showers[s] < 0.5e-3 / 0.033, 0.0, showers[s]).astype(np.float64)
        out["e_tot"][s] = x.sum()
        for layer in range(45):
            seg = x[layer * 144 : (layer + 1) * 144]
            e = sum(seg)
            sums = {"eta": [0.0, 0.0], "phi": [0.0, 0.0], "r": [0.0, 0.0]}
            nonzero = 0
            for ia in range(n_alpha):
                for ir in range(n_r):
                    v = seg[ia * n_r + ir]  # radial bin fastest
                    pos = {
                        "eta": r_mid[ir] * math.cos(a_mid[ia]),
                        "phi": r_mid[ir] * math.sin(a_mid[ia]),
                        "r": r_mid[ir],
                    }
                    for k, p in pos.items():
                        sums[k][0] += p * v
                        sums[k][1] += p * p * v
                    nonzero += v > 0
            out["e_layer"][s, layer] = e
            out["sparsity"][s, layer] = 1.0 - nonzero / 144
            for k in ("eta", "phi", "r"):
                ec = sums[k][0] / (e + 1e-16)
                out[f"ec_{k}"][s, layer] = ec
                out[f"width_{k}"][s, layer] = math.sqrt(max(sums[k][1] / (e + 1e-16) - ec**2, 0.0))
    return out


def _official_separation_power(a: np.ndarray, b: np.ndarray, bins: np.ndarray) -> float:
    """CaloChallenge _separation_power on plt.hist(density=True)-style histograms."""
    h1 = np.histogram(a, bins=bins, density=True)[0] * np.diff(bins)
    h2 = np.histogram(b, bins=bins, density=True)[0] * np.diff(bins)
    return 0.5 * float(((h1 - h2) ** 2 / (h1 + h2 + 1e-16)).sum())


def test_blockwise_features_and_separation_powers_match_the_official_definitions(synthetic) -> None:
    """Block-wise vectorised results equal a loop transcription of the official code."""
    gen_path, ref_path = synthetic("ds2", 40, seed=3), synthetic("ds2", 40, seed=4)
    feats = {}
    raw = {}
    for name, path in (("gen", gen_path), ("ref", ref_path)):
        with CaloFile(path, DS2) as f:
            col = FeatureCollector(f.n, DS2)
            scan(f, [col], name, block_size=7)  # many small blocks, last one partial
            feats[name] = col.result()
            b = f.read(0, f.n)
            raw[name] = (b.incident_energies, b.showers)
    loops = {k: _official_loop_features(*v) for k, v in raw.items()}
    for name in ("gen", "ref"):
        np.testing.assert_allclose(feats[name].e_tot, loops[name]["e_tot"], rtol=1e-10)
        for k in LAYER_FEATURES:
            # Widths of one-voxel layers are sqrt(rounding noise) ~ 1e-7 mm in both codes: atol 1e-5 mm.
            np.testing.assert_allclose(feats[name].layer[k], loops[name][k], rtol=1e-8, atol=1e-5, err_msg=k)
    hists = feature_histograms(feats["gen"], feats["ref"], 45)
    official_bins = {
        "ec_eta": np.linspace(-30, 30, 101),
        "ec_phi": np.linspace(-30, 30, 101),
        "width_eta": np.linspace(0, 30, 101),
        "width_phi": np.linspace(0, 30, 101),
        "ec_r": np.linspace(0, 42, 101),
        "width_r": np.linspace(0, 20, 101),
        "sparsity": np.linspace(0, 1, 21),
    }
    lg, lr = loops["gen"], loops["ref"]
    for h in hists:
        if h.group == "etot_einc":
            a, b = lg["e_tot"] / raw["gen"][0], lr["e_tot"] / raw["ref"][0]
            bins = np.linspace(0.5, 1.5, 101)
        else:
            a, b = lg[h.group][:, h.layer], lr[h.group][:, h.layer]
            if h.group == "e_layer":
                bins = np.logspace(np.log10(0.5e-3 / 0.033), np.log10(b.max()), 40)
            else:
                bins = official_bins[h.group]
        np.testing.assert_allclose(h.edges, bins, rtol=1e-12)
        if np.histogram(a, bins)[0].sum() and np.histogram(b, bins)[0].sum():
            assert h.separation_power == pytest.approx(_official_separation_power(a, b, bins), abs=1e-12)


def test_separation_power_and_chi2_known_values() -> None:
    a = np.array([10, 0, 0, 10])
    assert separation_power(a, a) == 0.0
    assert separation_power(np.array([5, 5, 0, 0]), np.array([0, 0, 7, 3])) == pytest.approx(1.0)
    # Unit-normalised [0.5, 0.5] vs [0.25, 0.75]: 1/2 (0.0625/0.75 + 0.0625/1.25) = 1/15.
    assert separation_power(np.array([2, 2]), np.array([1, 3])) == pytest.approx(1 / 15)
    chi2, ndf = chi2_ndf(np.array([10, 20, 0]), np.array([20, 40, 0]))
    assert (chi2, ndf) == (pytest.approx(0.0), 1)
    # N_a = N_b = 20: chi2 = sum (a - b)^2 / (a + b) = 16/20 + 16/20.
    chi2, ndf = chi2_ndf(np.array([12, 8]), np.array([8, 12]))
    assert chi2 == pytest.approx(1.6) and ndf == 1
    assert math.isnan(separation_power(np.zeros(3), a[:3]))


def test_frechet_distance_of_known_gaussians() -> None:
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 9.0])
    # Diagonal: |dmu|^2 + sum (sqrt(a) - sqrt(b))^2 = 5 + (1 + 1 + 0).
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(7.0)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 4))
    s = a @ a.T + np.eye(4)
    assert frechet_distance(mu1[:1].repeat(4), s, mu1[:1].repeat(4), s) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("n", [5, 12, 30])
def test_sample_frechet_distance_equals_the_covariance_form(n: int) -> None:
    """Fewer rows than features (the SVD of A B^T), as many, and more (the covariance form itself)."""
    rng = np.random.default_rng(n)
    a, b = rng.gamma(2.0, size=(n, 12)), 1.2 * rng.gamma(2.5, size=(n, 12))
    cov = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert sample_frechet_distance(a, b) == pytest.approx(cov, rel=1e-6)
    assert sample_frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_fpd_recovers_a_known_shift_and_is_zero_for_one_distribution() -> None:
    rng = np.random.default_rng(1)
    n, d = 6000, 4
    real = rng.normal(size=(n, d))
    same = rng.normal(size=(n, d))
    shifted = rng.normal(size=(n, d)) + np.array([0.5, 0.0, 0.0, 0.0])
    cfg = FPDConfig(min_samples=1000, max_samples=5000, num_batches=5, num_points=5)
    val, err = fpd(real, same, cfg)
    assert abs(val) < 0.01 and err >= 0
    # Features are divided by REF's max |x| per feature; unit covariances keep the trace term ~0.
    scale = np.abs(real).max(axis=0)[0]
    val, _ = fpd(real, shifted, cfg)
    assert val == pytest.approx((0.5 / scale) ** 2, rel=0.15)


def test_kpd_matches_a_direct_mmd_and_vanishes_for_one_distribution() -> None:
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(30, 5)), rng.normal(size=(25, 5)) + 0.3

    def k(a, b):
        return (a @ b.T / 5 + 1.0) ** 4

    kxx, kyy = k(x, x), k(y, y)
    direct = (kxx.sum() - np.trace(kxx)) / (30 * 29) + (kyy.sum() - np.trace(kyy)) / (25 * 24) - 2 * k(x, y).mean()
    assert mmd2_poly_unbiased(x, y, block=7) == pytest.approx(direct, rel=1e-10)
    a, b = rng.normal(size=(3000, 5)), rng.normal(size=(3000, 5))
    val, err = kpd(a, b, KPDConfig(batch_size=1000, num_batches=5))
    shifted, _ = kpd(a, b + 0.5, KPDConfig(batch_size=1000, num_batches=5))
    assert abs(val) < 3 * err + 1e-4
    assert shifted > 100 * abs(val)


def test_incident_energy_comparison() -> None:
    e = np.geomspace(1e3, 1e6, 50)
    assert compare_incident_energies(e, e.copy())["status"] == "identical"
    assert compare_incident_energies(e[::-1].copy(), e)["status"] == "same_set"
    bad = compare_incident_energies(e * 1.01, e)
    assert bad["status"] == "mismatch" and not bad["ok"] and "does not use" in bad["message"]
    assert compare_incident_energies(e[:40], e)["status"] == "mismatch"


def test_split_plan_is_official_and_files_round_trip(tmp_path) -> None:
    cfg = ClassifierConfig(seed=5, batch_size=16)
    plan = SplitPlan.make(101, cfg)
    assert plan.sizes == {"train": 60, "test": 20, "val": 21}  # int(0.6 n), int(0.2 n), the rest
    for split, s_idx in (("train", 0), ("test", 1), ("val", 2)):
        for c in range(2):
            rows = plan.dest_row[c][plan.dest_split[c] == s_idx]
            assert len(rows) == plan.sizes[split]
            assert np.all(plan.labels[split][rows] == c)  # each row lands in a slot labelled with its class
        assert plan.labels[split].sum() == plan.sizes[split]  # balanced classes
    data = ClassifierData(tmp_path / "cls", plan, dim=3)
    try:
        for c in range(2):
            src = np.arange(101)
            # Row content encodes (class, source row) so every landing place can be checked.
            data.add(c, src, np.stack([src, np.full(101, c), src * 2], axis=1).astype(np.float32))
        seen = set()
        for f in data.files.values():
            x = f.read(0, f.rows)
            assert np.array_equal(x[:, 1], f.labels)
            seen |= {(int(c), int(r)) for r, c in x[:, :2]}
            rng = np.random.default_rng(0)
            rows = np.concatenate([xb for xb, _ in _batches(f, 16, rng, buffer_rows=32)])
            # A shuffled epoch visits every row exactly once, in a different order.
            assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, x.tolist()))
            for xb, yb in _batches(f, 16, rng, buffer_rows=32):
                assert np.array_equal(xb[:, 1], yb)
        assert len(seen) == 202  # disjoint splits covering every shower of both classes
    finally:
        data.close()
    assert not any((tmp_path / "cls").iterdir())


def test_writer_helper_round_trip(tmp_path) -> None:
    """The CaloWriter used by the sanity tests keeps energies and voxels exactly."""
    e = np.array([1e3, 2e3])
    s = np.zeros((2, DS2.n_voxels), np.float32)
    s[1, 5] = 3.0
    with CaloWriter(tmp_path / "x.h5", DS2, n_total=2, compression="none") as w:
        w.write(e, s)
    with CaloFile(tmp_path / "x.h5", DS2) as f:
        b = f.read(0, 2)
    assert np.array_equal(b.incident_energies, e) and np.array_equal(b.showers, s)


def _features(path) -> object:
    with CaloFile(path, DS2) as f:
        collector = FeatureCollector(f.n, DS2)
        scan(f, [collector], "features")
    return collector.result()


def test_cls_boost_sees_a_ten_percent_scale_error_at_2000_showers(synthetic) -> None:
    """The official DNN test cannot see a x1.1 copy at this size; the boosted trees must, and stay at chance
    for two independent samples of one distribution."""
    from hpc_calo.evaluate.boost import boost_score

    ref = _features(synthetic("ds2", 2000, 0))
    same = _features(synthetic("ds2", 2000, 1))
    scaled = copy.deepcopy(ref)
    scaled.e_tot = ref.e_tot * 1.1
    scaled.layer["e_layer"] = ref.layer["e_layer"] * 1.1  # every voxel x 1.1: shapes unchanged
    plan = SplitPlan.make(2000, ClassifierConfig(seed=0))
    assert boost_score(scaled, ref, plan, seed=0)["auc"] > 0.9
    assert abs(boost_score(same, ref, plan, seed=0)["auc"] - 0.5) < 0.06
    # One feature group at a time points at what differs: the energies, not the (unchanged) shapes.
    assert boost_score(scaled, ref, plan, seed=0, group="energies")["auc"] > 0.9
    assert abs(boost_score(scaled, ref, plan, seed=0, group="widths")["auc"] - 0.5) < 0.06
