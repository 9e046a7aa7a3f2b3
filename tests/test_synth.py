"""The GFlash synthetic generator: reproducibility, physics sanity, the CLI and its errors."""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pytest

from data_prep.synth import PAR04, generate_blocks, longitudinal_parameters, write_synthetic
from hpc_calo.errors import UserError
from hpc_calo.geometry import DS2, DS3, E_INC_MAX_MEV, E_INC_MIN_MEV, THRESHOLD_MEV
from hpc_calo.io import check_file


def _collect(geometry, n, seed, block_size):
    parts = list(generate_blocks(geometry, n, seed, block_size))
    assert all(len(e) == len(s) <= block_size for e, s in parts)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _read(path):
    with h5py.File(path, "r") as f:
        return f["incident_energies"][:, 0], f["showers"][:]


@pytest.fixture(scope="module")
def ds2(synthetic):
    return _read(synthetic("ds2", 2000, seed=0))


def test_same_seed_same_showers_whatever_the_block_size():
    e1, s1 = _collect(DS2, 150, seed=7, block_size=150)
    e2, s2 = _collect(DS2, 150, seed=7, block_size=37)
    e3, s3 = _collect(DS2, 100, seed=7, block_size=64)
    np.testing.assert_array_equal(e1, e2)
    np.testing.assert_array_equal(s1, s2)
    # A shorter run is a prefix of a longer one with the same seed.
    np.testing.assert_array_equal(e1[:100], e3)
    np.testing.assert_array_equal(s1[:100], s3)
    e4, s4 = _collect(DS2, 150, seed=8, block_size=150)
    assert not np.array_equal(e1, e4) and not np.array_equal(s1, s4)


def test_written_file_is_reproducible_and_valid(synthetic, tmp_path):
    path = synthetic("ds3", 70, seed=3)
    again = write_synthetic(tmp_path / "again.h5", "ds3", 70, 3, compression="none")
    for a, b in zip(_read(path), _read(again), strict=True):
        np.testing.assert_array_equal(a, b)
    summary = check_file(path, DS3)
    assert summary.n == 70 and summary.dataset == "ds3"
    with h5py.File(path, "r") as f:
        assert f["incident_energies"].dtype == np.float64 and f["incident_energies"].shape == (70, 1)
        assert f["showers"].dtype == np.float32 and f["showers"].shape == (70, DS3.n_voxels)
        assert f["showers"].compression == "gzip"


def test_bad_requests_raise_user_errors(tmp_path):
    with pytest.raises(UserError, match="positive"):
        write_synthetic(tmp_path / "x.h5", "ds2", 0, 0)
    with pytest.raises(UserError, match="unknown dataset"):
        write_synthetic(tmp_path / "x.h5", "ds1", 10, 0)
    with pytest.raises(UserError, match="does not exist"):
        write_synthetic(tmp_path / "missing" / "x.h5", "ds2", 10, 0)
    assert list(tmp_path.iterdir()) == []


def test_incident_energies_log_uniform_in_range(ds2):
    e, _ = ds2
    assert e.min() >= E_INC_MIN_MEV and e.max() <= E_INC_MAX_MEV
    log_e = np.log10(e)
    # Uniform on [3, 6]: mean 4.5, sd 0.866; 2000 draws -> standard error 0.019.
    assert abs(log_e.mean() - 4.5) < 0.08
    assert abs(log_e.std() - np.sqrt(0.75)) < 0.05
    counts = np.histogram(log_e, bins=3, range=(3, 6))[0]
    assert counts.min() > 0.8 * len(e) / 3


def test_voxels_nonnegative_and_below_threshold_are_zero(ds2):
    _, s = ds2
    assert s.dtype == np.float32 and np.isfinite(s).all()
    assert (s >= 0).all()
    assert s[s > 0].min() >= np.float32(THRESHOLD_MEV)


def test_response_mean_and_spread(ds2):
    e, s = ds2
    response = s.sum(axis=1, dtype=np.float64) / e
    # Sampling fraction divided out; a few % leak radially and longitudinally, a little falls under the threshold.
    assert 0.95 < response.mean() < 1.01
    assert 0.01 < response.std() < 0.1
    # Stochastic resolution c_s/sqrt(E): the 1-10 GeV decade is much wider than the 100-1000 GeV decade.
    low, high = response[e < 1e4], response[e > 1e5]
    assert low.std() > 3 * high.std()
    # ... and each decade's spread is the stochastic term c_s / sqrt(E) averaged over its energies, plus a little
    # from leakage fluctuations.
    for sel in (e < 1e4, e > 1e5):
        expected = PAR04.c_s * np.sqrt(np.mean(1e3 / e[sel]))
        assert 0.85 * expected < response[sel].std() < 1.3 * expected


def test_shower_maximum_moves_deeper_with_energy(ds2):
    e, s = ds2
    layer_e = DS2.layers(s).sum(axis=2)
    cog = (layer_e * np.arange(DS2.n_layers)).sum(axis=1) / layer_e.sum(axis=1)
    means = [cog[(e >= lo) & (e < 10 * lo)].mean() for lo in (1e3, 1e4, 1e5)]
    # Shower depth grows like ln E: ~ln(10) X0 = 2.3 X0 ~ 2.9 readout layers per decade.
    assert 2.0 < means[1] - means[0] < 4.0
    assert 2.0 < means[2] - means[1] < 4.0
    peaks = [np.argmax(layer_e[(e >= lo) & (e < 10 * lo)].mean(axis=0)) for lo in (1e3, 1e4, 1e5)]
    assert peaks[0] < peaks[1] < peaks[2]


def test_radial_profile_core_dense_outer_rings_sparse(ds2):
    _, s = ds2
    grid = DS2.grid(s)
    occupancy = (grid > 0).mean(axis=(0, 1, 2))  # per ring
    assert np.all(np.diff(occupancy) < 0)
    assert occupancy[0] > 5 * occupancy[-1]
    ring_e = grid.sum(axis=(1, 2), dtype=np.float64)
    inside_rm = ring_e[:, :2].sum(axis=1) / ring_e.sum(axis=1)  # r < 9.3 mm, about one Moliere radius
    assert 0.85 < inside_rm.mean() < 0.95  # ~90 % of the energy within R_M, by its definition


def test_sparsity_highest_in_first_and_last_layers(ds2):
    _, s = ds2
    sparsity = (DS2.layers(s) == 0).mean(axis=(0, 2))
    middle = sparsity[5:20].min()
    assert sparsity[0] > middle + 0.1 and sparsity[-1] > middle + 0.1
    assert 0.6 < (s == 0).mean() < 0.95


def test_primary_track_always_signals_in_layer_zero_on_axis(ds2):
    _, s = ds2
    layer0 = DS2.grid(s)[:, 0]  # (n, alpha, r)
    # Two MIP signals of the charged primary: never below ~2 x 70 keV / 0.033 = 4.2 MeV, whatever GFlash adds.
    assert layer0.sum(axis=(1, 2)).min() > 4.0
    assert (layer0[:, :, 0].max(axis=1) > 4.0).all()  # on the axis, in the innermost ring


def test_longitudinal_fluctuations_are_correlated_as_in_gflash():
    rng = np.random.default_rng(0)
    e = np.full(20000, 5e4)
    t_max, alpha, _ = longitudinal_parameters(e, rng.standard_normal((20000, 2)))
    ln_y = np.log(5e4 / PAR04.ec_mev)
    rho = np.corrcoef(np.log(t_max), np.log(alpha))[0, 1]
    assert abs(rho - (0.784 - 0.023 * ln_y)) < 0.03
    assert abs(np.log(t_max).std() - 1 / (-2.5 + 1.25 * ln_y)) < 0.01


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_cli_writes_a_file_the_checker_accepts(tmp_path):
    out = tmp_path / "cli.h5"
    plots = tmp_path / "plots"
    proc = _run(
        "-m",
        "data_prep.synth",
        "--dataset",
        "ds2",
        "--showers",
        "100",
        "--out",
        str(out),
        "--seed",
        "1",
        "--plot",
        str(plots),
    )
    assert proc.returncode == 0, proc.stderr
    check = _run("-m", "hpc_calo.io", "check", str(out), "--dataset", "ds2")
    assert check.returncode == 0, check.stderr
    assert "100 showers" in check.stdout
    names = {p.name for p in plots.iterdir()}
    assert {"average_shower.png", "longitudinal.png", "radial.png", "response.png"} <= names
    for name in names:
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--showers", "0"], "--showers must be an integer >= 1"),
        (["--showers", "-3"], "--showers must be an integer >= 1"),
        (["--showers", "5", "--seed", "-1"], "--seed must be an integer >= 0, not '-1'"),
        (["--showers", "5", "--out", "{tmp}/no/such/dir/x.h5"], "does not exist"),
        (["--showers", "5", "--out", "{tmp}"], "exists and is not a CaloChallenge HDF5 file"),
        (["--showers", "5", "--plot", "{tmp}/f.txt"], "needs a directory"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    (tmp_path / "f.txt").write_text("not a directory")
    if "--out" not in args:
        args += ["--out", str(tmp_path / "x.h5")]
    proc = _run("-m", "data_prep.synth", "--dataset", "ds2", *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]  # nothing written
