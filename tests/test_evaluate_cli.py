"""Sanity of the whole evaluation on real files: a sample against itself, against distorted copies, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hpc_calo.errors import run_cli
from hpc_calo.evaluate import EvaluateRequest, evaluate
from hpc_calo.evaluate.__main__ import main
from hpc_calo.geometry import DS2
from hpc_calo.io import CaloFile, CaloWriter

N = 2000


def _copy(src: Path, dst: Path, rows: slice, transform=None) -> Path:
    with CaloFile(src, DS2) as f:
        b = f.read(rows.start, rows.stop)
    s = b.showers if transform is None else transform(b.showers)
    with CaloWriter(dst, DS2, n_total=len(s), compression="none") as w:
        w.write(b.incident_energies, s)
    return dst


def _shift_one_layer(s: np.ndarray) -> np.ndarray:
    """The whole shower one readout layer deeper (layer 0 empty, layer 44's energy dropped)."""
    layers = DS2.layers(s.copy())
    layers[:, 1:] = layers[:, :-1].copy()
    layers[:, 0] = 0.0
    return layers.reshape(len(s), -1)


@pytest.fixture(scope="module")
def halves(synthetic, tmp_path_factory) -> dict[str, Path]:
    src = synthetic("ds2", N, seed=11)
    d = tmp_path_factory.mktemp("halves")
    a = _copy(src, d / "a.h5", slice(0, N // 2))
    return {
        "a": a,
        "b": _copy(src, d / "b.h5", slice(N // 2, N)),
        "shifted": _copy(src, d / "shifted.h5", slice(0, N // 2), _shift_one_layer),
        "scaled": _copy(src, d / "scaled.h5", slice(0, N // 2), lambda s: s * np.float32(1.1)),
    }


def _run(gen: Path, ref: Path, out: Path) -> dict:
    cfg = EvaluateRequest(
        gen=gen,
        ref=ref,
        dataset="ds2",
        out=out,
        metrics=("hist", "cls-high"),
        epochs=10,
        cls_hidden=128,
        cls_batch=100,
        plots=False,
    )
    return evaluate(cfg)


def _group(r: dict, g: str) -> float:
    return r["histograms"]["groups"][g]["mean_separation_power"]


def _max(r: dict, g: str) -> float:
    return r["histograms"]["groups"][g]["max_separation_power"]


def test_a_sample_against_a_disjoint_half_of_itself_is_indistinguishable(halves, tmp_path) -> None:
    r = _run(halves["b"], halves["a"], tmp_path / "rep")
    assert abs(r["cls_high"]["auc"] - 0.5) < 0.1
    assert abs(r["cls_high"]["jsd"]) < 0.1
    for g in ("etot_einc", "e_layer", "ec_eta", "width_eta", "ec_r"):
        assert _group(r, g) < 0.08, g  # finite-sample noise only (1000 showers per side)
    assert r["incident_energies"]["status"] == "mismatch"  # different showers, different energies


def test_a_copy_shifted_by_one_layer_is_caught(halves, tmp_path) -> None:
    r = _run(halves["shifted"], halves["a"], tmp_path / "rep")
    same = _run(halves["b"], halves["a"], tmp_path / "same")
    assert r["incident_energies"]["status"] == "identical"
    assert r["cls_high"]["auc"] > 0.95
    for g in ("e_layer", "ec_r", "sparsity"):  # the layers around the start of the shower change most
        assert _max(r, g) > 0.25 and _max(r, g) > 4 * _max(same, g), g
    # Transverse shapes hardly move with one layer of depth; energy per shower barely changes either.
    assert _group(r, "etot_einc") < _group(r, "e_layer")


def test_a_copy_with_energies_scaled_by_1_1_is_caught(halves, tmp_path) -> None:
    # Histograms only: the test-sized classifier (1200 training showers, ~100 steps) does not learn the
    # 0.04 offset between log10 E_tot and log10 E_inc; the layer-shift test covers the classifier.
    cfg = EvaluateRequest(
        gen=halves["scaled"], ref=halves["a"], dataset="ds2", out=tmp_path / "rep", metrics=("hist",), plots=False
    )
    r = evaluate(cfg)
    assert _group(r, "etot_einc") > 0.3
    assert _max(r, "e_layer") > 0.08
    # Centres and widths are ratios of energies: a global scale leaves them exactly unchanged... up to voxels
    # pushed over the threshold, so their separation stays at zero or close to it.
    assert _group(r, "ec_eta") < 0.02


def test_cli_end_to_end_writes_every_output(halves, tmp_path, capsys) -> None:
    out = tmp_path / "report"
    args = [str(halves["b"]), str(halves["a"]), "--dataset", "ds2", "--out", str(out)]
    code = main([*args, "--epochs", "2", "--cls-hidden", "32", "--seed", "3"])
    assert code == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and "incident energies" in err
    names = {p.name for p in out.iterdir()}
    assert {"report.json", "report.md", "separation_power.png", "profiles.png", "hist_e_layer.png"} <= names
    assert {"average_shower_gen.png", "average_shower_ref.png", "average_shower_ratio.png", "hist_voxel.png"} <= names
    assert not any(n.startswith("_cls") for n in names)
    assert not list(tmp_path.glob(".report.tmp-*"))  # built under a temporary name, then renamed
    r = json.loads((out / "report.json").read_text())
    for key in ("cls_low", "cls_high", "fpd", "kpd", "histograms", "incident_energies", "timings"):
        assert key in r, key
    assert r["cls_low"]["input_dim"] == 1 + DS2.n_voxels and r["cls_high"]["input_dim"] == 362
    assert len(r["histograms"]["features"]) == 1 + 8 * 45 + 1
    md = (out / "report.md").read_text()
    assert "WARNING: incident energies do not match" in md and "| classifier low-level" in md
    for p in out.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["missing.h5", "{a}", "--dataset", "ds2"], "no such file"),
        (["{a}", "{a}", "--dataset", "ds3"], "ds3 needs"),
        (["{a}", "{a}", "--dataset", "ds9"], "unknown dataset"),
        (["{a}", "{a}", "--dataset", "ds2", "--metrics", "hist,magic"], "unknown magic"),
        (["{a}", "{a}", "--dataset", "ds2", "--epochs", "0"], "--epochs"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(halves, tmp_path, capsys, args, needle) -> None:
    argv = [a.format(a=halves["a"]) for a in args] + ["--out", str(tmp_path / "r")]
    with pytest.raises(SystemExit) as exc:
        run_cli(main, argv)
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines
    assert not (tmp_path / "r").exists()
