"""The generation chain: a valid CaloChallenge file with the requested showers and energies, deterministically."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hpc_calo import generate as gen_module
from hpc_calo import preprocess as pp
from hpc_calo import rundir
from hpc_calo.errors import UserError, run_cli
from hpc_calo.flows.build import FlowSpec
from hpc_calo.flows.presets import get_preset
from hpc_calo.generate import Chain, _RowNoise
from hpc_calo.generate import main as generate_main
from hpc_calo.geometry import DS2, THRESHOLD_MEV
from hpc_calo.io import check_file
from hpc_calo.models import FlowModel

pytestmark = pytest.mark.usefixtures("one_thread")


def micro(flow: int, student: bool = False) -> FlowModel:
    """A one-block flow: the MAF samples 144 sequential passes per layer, so keep each pass cheap."""
    full = get_preset("tiny").spec(flow, DS2)
    spec = FlowSpec(full.features, full.context, hidden=8, layers=1, blocks=1, bins=2, perm_seed=flow)
    torch.manual_seed(flow)
    return FlowModel(flow, DS2, spec, student=student, preset="tiny")


def save(model: FlowModel, run: Path, k: int, student: bool = False) -> None:
    path = rundir.weights(run, k, student)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)


def copy_flow(src: Path, dst: Path, k: int) -> None:
    path = rundir.weights(dst, k)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(rundir.weights(src, k).read_bytes())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with (untrained) flows: the chain's mechanics do not depend on the weights."""
    run = tmp_path_factory.mktemp("gen") / "run"
    for k in (1, 2, 3):
        save(micro(k), run, k)
    for k in (2, 3):  # one-pass students keep the determinism test fast; the CLI test runs the teachers
        save(micro(k, student=True), run, k, student=True)
    rundir.write_run(run, {"dataset": "ds2", "preset": "tiny", "energy_range": [1e3, 1e6]})
    return run


def test_cli_writes_a_valid_file_with_the_reference_energies(
    run_dir: Path, synthetic: Callable[..., Path], tmp_path: Path
) -> None:
    ref = synthetic("ds2", 1500)
    out = tmp_path / "gen.h5"
    with pytest.raises(SystemExit) as done:
        run_cli(generate_main, ["--run", str(run_dir), "--showers", "6", "--out", str(out), "--energies", str(ref),
                                "--batch-size", "6", "--seed", "3", "--students", "no", "--no-progress"])
    assert done.value.code == 0
    summary = check_file(out, DS2)  # what python -m hpc_calo.io check runs
    assert summary.n == 6
    with h5py.File(out) as g, h5py.File(ref) as r:
        assert np.array_equal(g["incident_energies"][:], r["incident_energies"][:6])
        showers = g["showers"][:]
    assert showers.min() >= 0 and np.all((showers == 0) | (showers >= THRESHOLD_MEV))
    assert (showers > 0).any()
    # The layer renormalisation choice is recorded in the output (the reference's: without).
    for flag, value in (("--renormalise", True), ("--no-renormalise", False)):
        with pytest.raises(SystemExit) as done:
            run_cli(generate_main, ["--run", str(run_dir), "--showers", "2", "--out", str(tmp_path / f"{flag}.h5"),
                                    "--seed", "3", "--no-progress", flag])
        assert done.value.code == 0
        with h5py.File(tmp_path / f"{flag}.h5") as g:
            assert bool(g.attrs["renormalise"]) is value


@pytest.mark.parametrize("encoding", pp.ENERGY_ENCODINGS)
def test_each_flow1_encoding_generates_showers_that_carry_its_layer_energies(
    run_dir: Path, tmp_path: Path, encoding: str
) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    spec = dataclasses.replace(micro(1).spec, features=pp.flow1_features(encoding))
    torch.manual_seed(1)
    save(FlowModel(1, DS2, spec, preset="tiny", energies=encoding), run, 1)
    chain = Chain.load(run)
    e = np.geomspace(1e3, 1e6, 6)
    noise = _RowNoise(4, 0, len(e), chain.device, chain.dtype)  # the random numbers sample() draws for these rows
    layer_e = chain.head(torch.as_tensor(e, dtype=chain.dtype), noise)[0]
    assert layer_e.shape == (6, 45) and torch.all((layer_e == 0) | (layer_e >= THRESHOLD_MEV))
    showers = chain.sample(e, seed=4).reshape(6, 45, -1)
    assert np.all((showers == 0) | (showers >= THRESHOLD_MEV))
    # renormalised (the default): every generated layer carries flow-1's energy
    np.testing.assert_allclose(showers.sum(-1), layer_e.numpy(), rtol=1e-4, atol=1e-3)


def test_a_layer_0_the_threshold_would_empty_is_redrawn(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chain = Chain.load(run_dir)
    flow2, calls = chain.from_latent[2], []

    def no_hit_first(z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Flow-2, except that its first draw of the odd rows is the "no voxel hit" sample (every voxel ~1e-9)."""
        x = flow2(z, c)
        calls.append(len(z))
        if len(calls) == 1:
            x[1::2] = -20.0
        return x

    chain.from_latent[2] = no_hit_first
    e = np.geomspace(1e3, 1e6, 6)
    layer0 = {}
    for redraws in (0, gen_module.LAYER0_REDRAWS):
        monkeypatch.setattr(gen_module, "LAYER0_REDRAWS", redraws)
        calls.clear()
        layer0[redraws] = chain.sample(e, seed=4).reshape(6, 45, -1)[:, 0]
    assert len(calls) == 2  # one redraw was needed, for the odd rows, and none after it
    without, redrawn = layer0[0], layer0[gen_module.LAYER0_REDRAWS]
    # without a redraw the odd rows fall back to one voxel (the first: all are equal); redrawn, they are the flow's
    assert np.all((without[1::2] > 0).sum(-1) == 1) and np.all(without[1::2, 0] > 0)
    assert not np.array_equal(redrawn[1::2], without[1::2]) and np.all((redrawn[1::2] > 0).sum(-1) >= 1)
    np.testing.assert_array_equal(redrawn[::2], without[::2])  # the rows that had a voxel hit keep their layer 0
    np.testing.assert_allclose(redrawn.sum(-1), without.sum(-1), rtol=1e-5)  # flow-1's energy either way


def test_sampling_is_deterministic_and_independent_of_batch_size(run_dir: Path) -> None:
    chain = Chain.load(run_dir)  # flows 2 and 3: the students, present in this run
    assert chain.geometry is DS2 and chain.energy_range == (1e3, 1e6)
    assert chain.students == {1: False, 2: True, 3: True}
    e = np.geomspace(1e3, 1e6, 7)
    a = chain.sample(e, seed=5, batch_size=7)
    assert a.shape == (7, DS2.n_voxels) and a.dtype == np.float32
    assert np.array_equal(a, chain.sample(e, seed=5, batch_size=7))
    b = chain.sample(e, seed=5, batch_size=3)  # other batch boundaries, same random numbers per row
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert not np.array_equal(a, chain.sample(e, seed=6, batch_size=7))
    # rows are generated independently: the first rows of a longer request are the same showers
    np.testing.assert_allclose(chain.sample(e[:2], seed=5, batch_size=2), a[:2], rtol=1e-4, atol=1e-4)


def test_batches_side_by_side_give_the_same_bits_in_order(run_dir: Path, tmp_path: Path) -> None:
    chain = Chain.load(run_dir)
    e = np.geomspace(1e3, 1e6, 7)
    one = chain.sample(e, seed=5, batch_size=3)  # batches of 3, 3 and 1 rows
    for threads in (2, 4):  # fewer threads than batches, and more
        assert np.array_equal(chain.sample(e, seed=5, batch_size=3, threads=threads), one)
    # the command on 2 CPUs runs its 3 batches on 2 lanes: the file holds the one-thread showers
    out = tmp_path / "lanes.h5"
    with pytest.raises(SystemExit) as done:
        run_cli(generate_main, ["--run", str(run_dir), "--showers", "7", "--out", str(out), "--batch-size", "3",
                                "--seed", "5", "--threads", "2", "--no-progress"])
    assert done.value.code == 0
    with h5py.File(out) as g:
        e_file, showers = g["incident_energies"][:, 0], g["showers"][:]
    assert np.array_equal(showers, chain.sample(e_file, seed=5, batch_size=3))


@pytest.mark.parametrize("students", [True, False])
def test_fast_samplers_give_the_plain_nflows_showers(run_dir: Path, students: bool) -> None:
    e = np.geomspace(1e3, 1e6, 5)
    fast = Chain.load(run_dir, students=students)
    plain = Chain.load(run_dir, students=students, fast=False)
    kinds = {k: type(f).__name__ for k, f in fast.from_latent.items()}
    assert kinds == {1: "FastMAF", 2: "FastStudent" if students else "FastMAF", 3: "FastStudent" if students
                     else "FastMAF"}
    np.testing.assert_allclose(fast.sample(e, seed=2), plain.sample(e, seed=2), rtol=1e-3, atol=1e-3)


def test_bf16_precision_stays_close_to_float32(run_dir: Path, tmp_path: Path) -> None:
    out = {}
    for dtype in ("float32", "bf16"):
        out[dtype] = tmp_path / f"{dtype}.h5"
        with pytest.raises(SystemExit) as done:
            run_cli(generate_main, ["--run", str(run_dir), "--showers", "20", "--out", str(out[dtype]),
                                    "--dtype", dtype, "--seed", "1", "--no-progress"])
        assert done.value.code == 0
    with h5py.File(out["float32"]) as a, h5py.File(out["bf16"]) as b:
        x, y = a["showers"][:], b["showers"][:]
    assert not np.array_equal(x, y)  # the GEMMs did run in bf16
    rel = np.abs(y.sum(1) - x.sum(1)) / x.sum(1)
    assert np.median(rel) < 0.05, rel


def test_compiled_spline_gives_the_eager_showers_to_rounding(run_dir: Path, tmp_path: Path) -> None:
    out = {}
    for flags in ([], ["--compile"]):
        out[bool(flags)] = tmp_path / f"compile_{bool(flags)}.h5"
        with pytest.raises(SystemExit) as done:
            run_cli(generate_main, ["--run", str(run_dir), "--showers", "20", "--out", str(out[bool(flags)]),
                                    "--seed", "1", "--students", "yes", "--no-progress", *flags])
        assert done.value.code == 0
    with h5py.File(out[False]) as a, h5py.File(out[True]) as b:
        assert bool(b.attrs["compile"]) and not bool(a.attrs["compile"])
        np.testing.assert_allclose(b["showers"][:], a["showers"][:], rtol=1e-3, atol=1e-3)


def test_flow3_is_conditioned_with_its_own_noise_width(run_dir: Path, tmp_path: Path) -> None:
    """The generated layer n-1 gets the noise flow-3 was trained with before it conditions layer n."""
    e = np.geomspace(1e3, 1e6, 4)
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    students = Chain.load(run_dir).sample(e, seed=3)  # one-pass students: fast
    assert np.array_equal(students, Chain.load(run).sample(e, seed=3))
    narrow = micro(3, student=True)
    narrow.noise_mev = 5e-4
    save(narrow, run, 3, student=True)
    other = Chain.load(run).sample(e, seed=3)
    assert np.array_equal(other[:, :DS2.voxels_per_layer], students[:, :DS2.voxels_per_layer])  # layer 0: flow-2
    assert not np.array_equal(other, students)


def test_students_are_used_where_present(run_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    for k in (1, 2, 3):
        copy_flow(run_dir, run, k)
    rundir.write_run(run, rundir.read_run(run_dir))
    with pytest.raises(UserError, match="flow2_student"):
        Chain.load(run, students=True)
    save(micro(2, student=True), run, 2, student=True)
    assert Chain.load(run).students == {1: False, 2: True, 3: False}
    assert Chain.load(run, students=False).students == {1: False, 2: False, 3: False}


def test_cli_errors(run_dir: Path, synthetic: Callable[..., Path], tmp_path: Path,
                    capsys: pytest.CaptureFixture[str]) -> None:
    def refused(argv: list[str], match: str) -> None:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(generate_main, [*argv, "--out", str(tmp_path / "x.h5"), "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and match in err[0], err
        assert not (tmp_path / "x.h5").exists()

    refused(["--run", str(tmp_path / "nope"), "--showers", "3"], "not a run folder")
    incomplete = tmp_path / "incomplete"
    copy_flow(run_dir, incomplete, 1)
    rundir.write_run(incomplete, rundir.read_run(run_dir))
    refused(["--run", str(incomplete), "--showers", "3"], "flow2/best.pt is missing")
    refused(["--run", str(run_dir), "--showers", "2000", "--energies", str(synthetic("ds2", 1500))], "fewer than")
    refused(["--run", str(run_dir)], "--showers")
    rundir.flow_dir(incomplete, 2).mkdir()
    rundir.weights(incomplete, 2).write_bytes(b"junk")
    refused(["--run", str(incomplete), "--showers", "3"], "corrupt")
