"""The product's promises under hostile use (docs/reliability.md): nothing a user owns is deleted or replaced,
every bad input is one line, killed and interrupted commands leave nothing behind and resume.

Every test uses real files and real processes: the commands run as a user runs them, through ``python -m``,
where the exit code, stderr or a signal matters.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from data_prep.convert import main as convert_main
from hpc_calo.data.store import ShardedLoader, open_store
from hpc_calo.errors import UserError
from hpc_calo.geometry import DS2
from hpc_calo.seeding import DEFAULT_SEED

REPO = Path(__file__).resolve().parents[1]
MPIEXEC = Path(sys.executable).parent / "mpiexec"
IS_ROOT = os.geteuid() == 0


def run(module: str, *args: object, timeout: float = 300, cwd: Path = REPO,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def runs(*calls: tuple[object, ...]) -> list[subprocess.CompletedProcess[str]]:
    """``run(*call)`` for each call, two at a time (most of each is interpreter and import start-up, one core's
    work); the results in the calls' order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda call: run(*call), calls))


def one_line(r: subprocess.CompletedProcess[str], *fragments: str, after_progress: bool = False) -> str:
    """Exit 2, no traceback, exactly one stderr line ``error: ...`` holding every fragment (``after_progress``:
    the last line, after the progress bars of a command that has no switch to silence them)."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    if after_progress:
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def calo_file(path: Path, e: np.ndarray, showers: np.ndarray | None = None) -> Path:
    e = np.asarray(e, dtype=np.float64)
    if showers is None:
        showers = np.random.default_rng(0).random((len(e), DS2.n_voxels), dtype=np.float32)
    with h5py.File(path, "w") as f:
        f["incident_energies"] = e.reshape(-1, 1)
        f["showers"] = showers
    return path


@pytest.fixture(scope="module")
def run_copy(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the tiny run (with its store) that tests may point outputs at."""
    root = tmp_path_factory.mktemp("safety_run")
    shutil.copytree(tiny_run.parent, root, dirs_exist_ok=True)
    record = json.loads((root / "run" / "run.json").read_text())
    (root / "run" / "run.json").write_text(json.dumps({**record, "store": str((root / "store.zarr").resolve())}))
    return root / "run"


@pytest.fixture(scope="module")
def ref(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Incident energies inside the run's trained range, as a reference file (20 showers)."""
    lo, hi = json.loads((tiny_run / "run.json").read_text())["energy_range"]
    return calo_file(tmp_path_factory.mktemp("ref") / "ref.h5", np.geomspace(lo, hi, 20))


# ---- 1, 3: outputs of another kind and outputs that are inputs -----------------------------------------------


def test_generate_and_evaluate_never_replace_what_is_not_theirs(run_copy: Path, ref: Path, tmp_path: Path) -> None:
    before = tree(run_copy)
    one_line(run("hpc_calo.generate", "--run", run_copy, "--showers", "10", "--out", run_copy),
             "is also an input of this command")
    one_line(run("hpc_calo.generate", "--run", run_copy, "--showers", "10", "--out", run_copy / "flow1"),
             "exists and is not a CaloChallenge HDF5 file; remove it or choose another --out")
    one_line(run("hpc_calo.evaluate", ref, ref, "--dataset", "ds2", "--out", run_copy, "--metrics", "hist",
                 "--no-plots"), "is not an hpc-calo report directory")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("keep")
    one_line(run("hpc_calo.evaluate", ref, ref, "--dataset", "ds2", "--out", notes, "--metrics", "hist",
                 "--no-plots"), "is not an hpc-calo report directory")
    text = tmp_path / "text.h5"
    text.write_text("not hdf5")
    one_line(run("data_prep.synth", "--dataset", "ds2", "--showers", "5", "--out", text),
             "is not a CaloChallenge HDF5 file")
    assert tree(run_copy) == before and (notes / "mine.txt").read_text() == "keep" and text.read_text() == "not hdf5"

    # Its own kind is replaced: a second evaluation into the same report directory.
    report = tmp_path / "report"
    for _ in range(2):
        r = run("hpc_calo.evaluate", ref, ref, "--dataset", "ds2", "--out", report, "--metrics", "hist", "--no-plots")
        assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((report / "report.json").read_text())["format"] == "hpc-calo-report"


def test_an_output_that_is_an_input_is_refused_before_any_work(run_copy: Path, ref: Path, tmp_path: Path) -> None:
    before = ref.read_bytes()
    t0 = time.perf_counter()
    for r in runs(("hpc_calo.generate", "--run", run_copy, "--energies", ref, "--out", ref),
                  ("hpc_calo.sample", "--run", run_copy, "--showers", "10", "--energies", ref, "--out", ref),
                  ("hpc_calo.evaluate", ref, ref, "--dataset", "ds2", "--out", ref),
                  ("data_prep.convert", "--dataset", "ds2", ref, "--out", ref)):
        one_line(r, "is also an input of this command")
    assert time.perf_counter() - t0 < 60  # all four together: refused before any work
    # A report directory holding one of the inputs would delete it when replaced.
    holder = tmp_path / "holder"
    holder.mkdir()
    gen = shutil.copy(ref, holder / "gen.h5")
    one_line(run("hpc_calo.evaluate", gen, ref, "--dataset", "ds2", "--out", holder), "holds the input")
    one_line(run("hpc_calo.train", "--flow", "1", "--store", run_copy.parent / "store.zarr", "--preset", "tiny",
                 "--out", run_copy.parent / "store.zarr"), "is also an input")
    assert ref.read_bytes() == before and Path(gen).read_bytes() == before
    assert not [p for p in ref.parent.iterdir() if ".tmp-" in p.name]


# ---- 2, 11: the parts directory and temporaries ----------------------------------------------------------------


def test_sample_removes_only_what_it_wrote_in_the_parts_dir(run_copy: Path, tmp_path: Path) -> None:
    parts = tmp_path / "d"
    parts.mkdir()
    (parts / "notes.txt").write_text("mine")
    (parts / ".notes.txt.tmp-x-1").write_text("mine too")
    r = run("hpc_calo.sample", "--run", run_copy, "--showers", "30", "--shard-size", "10", "--out",
            tmp_path / "o.h5", "--parts-dir", parts, "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in parts.iterdir()) == [".notes.txt.tmp-x-1", "notes.txt"]


def test_a_gather_killed_with_sigkill_leaves_a_temporary_the_rerun_removes(run_copy: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.h5"
    # A real writer of the gathered file, killed with SIGKILL while its temporary is open.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom hpc_calo.io import CaloWriter\nfrom hpc_calo.geometry import DS2\n"
         f"w = CaloWriter({str(out)!r}, DS2, n_total=30).__enter__()\nprint('open', flush=True)\ntime.sleep(600)"],
        stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    finally:
        holder.kill()
    left = tmp_path / f".o.h5.tmp-{socket.gethostname()}-{holder.pid}"
    assert left.exists()
    r = run("hpc_calo.sample", "--run", run_copy, "--showers", "30", "--shard-size", "10", "--out", out,
            "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    assert not left.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["o.h5"]


# ---- 4: checkpoints load no code -------------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_checkpoint_is_refused_without_running_its_code(run_copy: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(run_copy, run_dir)
    marker = tmp_path / "pwned"
    torch.save({"format": "hpc-calo-checkpoint", "version": 1, "evil": _Payload(marker)},
               run_dir / "flow1" / "checkpoint.pt")
    one_line(run("hpc_calo.train", "--flow", "1", "--store", run_copy.parent / "store.zarr", "--preset", "tiny",
                 "--out", run_dir, "--epochs", "2"), "checkpoint cannot be read", "flow1/checkpoint.pt")
    assert not marker.exists()
    # Our own checkpoints hold tensors and plain values only: they load with weights_only=True.
    ck = torch.load(run_copy / "flow1" / "checkpoint.pt", weights_only=True)
    assert isinstance(ck["rng"][0]["numpy"]["keys"], torch.Tensor)


# ---- 5: the pair store knows its chunks ------------------------------------------------------------------------


def test_a_missing_or_corrupt_chunk_is_named_and_convert_repairs_it(synthetic: Callable[..., Path],
                                                                   tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    argv = ["--dataset", "ds2", str(synthetic("ds2", 60, 3)), "--out", str(store), "--chunk-showers", "10",
            "--quiet"]
    assert convert_main(argv) == 0

    def read_all() -> np.ndarray:
        loader = ShardedLoader(open_store(store), "train", "layer0", 1000, memory_gb=1.0)
        return loader._read_chunks(loader._chunk_ids).voxels

    good = read_all()
    (store / "train" / "voxels" / "c" / "1" / "0" / "0").unlink()
    with pytest.raises(UserError, match=r"chunk file train/voxels/c/1/0/0 \(showers 10-20 of train\) is missing; "
                                        r"repair .* data_prep.convert .* --repair"):
        read_all()
    e_chunk = store / "train" / "e_inc" / "c" / "2"
    e_chunk.write_bytes(e_chunk.read_bytes()[:13])
    assert convert_main(argv) == 0  # without --repair: the store is complete, nothing to do
    with pytest.raises(UserError, match="is missing"):
        read_all()
    assert convert_main([*argv, "--repair"]) == 0
    assert np.array_equal(read_all(), good)
    # The same refusal for a corrupt (truncated) chunk, named as such.
    (store / "train" / "layer_e" / "c" / "3" / "0").write_bytes(b"\0" * 7)
    with pytest.raises(UserError, match=r"chunk file train/layer_e/c/3/0 .* is corrupt"):
        read_all()


# ---- 6: the launcher owns its run folder -----------------------------------------------------------------------


def test_launch_keeps_foreign_files_and_refuses_another_request(tmp_path: Path) -> None:
    from launch.submit import main as submit

    out = tmp_path / "run"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    base = ["--cluster", "local", "--dataset", "ds2", "--synthetic", "100", "--out", str(out), "--stage", "prep"]
    with pytest.raises(UserError, match="exists and is not an hpc-calo run folder"):
        submit(base)
    (out / "mine.txt").unlink()
    assert submit([*base, "--prep-ranks", "1"]) == 0
    config = (out / "config.json").read_text()
    # A re-run removes the temporary a dead process of this host left for a target it writes again; one of
    # another host (whose stage may still be running) or the user's survives.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / "data" / f".reference.h5.tmp-{socket.gethostname()}-{int(dead.stdout)}"
    other_host = out / "data" / ".reference.h5.tmp-elsewhere-1"
    for p in (stale, other_host):
        p.write_text("left over")
    (out / "data" / "reference.h5").unlink()
    assert submit([*base, "--prep-ranks", "1"]) == 0
    assert not stale.exists() and other_host.read_text() == "left over"
    assert (out / "data" / "reference.h5").is_file()
    with pytest.raises(UserError, match=rf"holds a run of a different request \(seed {DEFAULT_SEED} there vs 7 now\)"):
        submit([*base, "--seed", "7"])
    assert (out / "config.json").read_text() == config
    assert submit([*base, "--prep-ranks", "1", "--cpus-per-task", "4"]) == 0  # resources may change


# ---- 7, 13, 16: one validation path, one line ------------------------------------------------------------------


def test_every_reader_applies_the_io_check_rules(run_copy: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    low = calo_file(tmp_path / "low.h5", np.r_[np.full(5, 2e3), 500.0, np.full(14, 2e3)])
    one_line(run("hpc_calo.io", "check", low), "incident energy 500 MeV at row 5 is outside [1000, 1000000] MeV")
    one_line(run("data_prep.convert", "--dataset", "ds2", low, "--out", tmp_path / "s.zarr", "--quiet"),
             "incident energy 500 MeV at row 5 is outside [1000, 1000000] MeV")
    one_line(run("hpc_calo.generate", "--run", run_copy, "--energies", low, "--out", tmp_path / "g.h5",
                 "--no-progress"),
             "incident energy 500 MeV at row 5 is outside")
    # Valid energies well outside what the run records as trained (narrowed: the tiny run spans nearly 1 GeV-1 TeV).
    narrow = tmp_path / "narrow"
    shutil.copytree(run_copy, narrow)
    record = json.loads((narrow / "run.json").read_text())
    (narrow / "run.json").write_text(json.dumps({**record, "energy_range": [1e4, 1e5]}))
    outside = calo_file(tmp_path / "outside.h5", np.full(20, 5e5))
    for module in ("hpc_calo.generate", "hpc_calo.sample"):
        one_line(run(module, "--run", narrow, "--energies", outside, "--showers", "20", "--out",
                     tmp_path / "g.h5", "--no-progress"), "outside the trained range")

    good = calo_file(tmp_path / "good.h5", np.full(20, 5e3))
    nan = rng.random((20, DS2.n_voxels), dtype=np.float32)
    nan[7, 3] = np.nan
    bad_gen = calo_file(tmp_path / "nan.h5", np.full(20, 5e3), nan)
    zero_ref = calo_file(tmp_path / "zero.h5", np.r_[np.full(19, 5e3), 0.0])
    for gen, reference, message in ((bad_gen, good, "showers contain NaN or inf (first at row 7)"),
                                    (good, zero_ref, "incident energy 0 MeV at row 19 is outside")):
        one_line(run("hpc_calo.evaluate", gen, reference, "--dataset", "ds2", "--out", tmp_path / "rep"), message)
        assert not [p for p in tmp_path.iterdir() if p.name.startswith((".rep", "rep"))]


def test_one_line_for_odd_arguments(tmp_path: Path, run_copy: Path, ref: Path) -> None:
    one_line(run("hpc_calo.evaluate", ref, ref, "--dataset", "ds2", "--out", ".", cwd=tmp_path),
             f"{tmp_path}: exists and is not an hpc-calo report directory")
    d = tmp_path / "adir.h5"
    d.mkdir()
    lr, batch, *directory = runs(
        ("hpc_calo.train", "--flow", "1", "--store", run_copy.parent / "store.zarr", "--preset", "tiny", "--out",
         tmp_path / "r", "--lr", "nan"),
        ("hpc_calo.train", "--flow", "1", "--store", "s", "--preset", "tiny", "--out", "r", "--batch-size", "0"),
        ("hpc_calo.io", "check", d),
        ("hpc_calo.evaluate", d, ref, "--dataset", "ds2", "--out", tmp_path / "rep"),
        ("data_prep.convert", "--dataset", "ds2", d, "--out", tmp_path / "s.zarr"))
    one_line(lr, "--lr must be a number > 0, not 'nan'")
    one_line(batch, "--batch-size must be an integer >= 1, not '0'")
    for r in directory:
        one_line(r, "adir.h5: is a directory, not a CaloChallenge HDF5 file")


# ---- 8: every flag is validated or reaches its code ------------------------------------------------------------


def _parsers() -> dict[str, object]:
    from data_prep.convert import build_parser as convert
    from data_prep.synth import build_parser as synth
    from hpc_calo.distill.__main__ import build_parser as distill
    from hpc_calo.evaluate.__main__ import build_parser as evaluate
    from hpc_calo.generate import build_parser as generate
    from hpc_calo.io.__main__ import build_parser as io
    from hpc_calo.sample.__main__ import parser as sample
    from hpc_calo.train.__main__ import build_parser as train
    from launch.submit import build_parser as submit

    return {"convert": convert(), "synth": synth(), "distill": distill(), "evaluate": evaluate(),
            "generate": generate(), "io check": io()._subparsers._group_actions[0].choices["check"],  # type: ignore
            "sample": sample(), "train": train(), "submit": submit()}


def test_every_numeric_flag_of_every_command_is_checked_where_it_is_parsed() -> None:
    checked = 0
    for name, parser in _parsers().items():
        for action in parser._actions:  # type: ignore[attr-defined]
            if not action.option_strings or action.nargs == 0:
                continue
            flag = action.option_strings[0]
            if action.choices is None:  # argparse itself checks a choice
                assert action.type not in (int, float), f"{name} {flag}: a bare {action.type.__name__} is unchecked"
            assert action.help, f"{name} {flag}: --help must explain it"
            bad = getattr(action.type, "bad", None)
            if bad is None:
                continue  # a path, a choice or a string: checked by the command that uses it
            required = []
            for other in parser._actions:  # type: ignore[attr-defined]
                if other.required and other is not action:
                    value = str(other.choices[0]) if other.choices else (
                        "1" if getattr(other.type, "bad", None) else "x")
                    required += [other.option_strings[0], value] if other.option_strings else [value]
            with pytest.raises(UserError, match=f"^{flag} must be "):
                parser.parse_args([*required, flag, bad])  # type: ignore[attr-defined]
            checked += 1
    assert checked >= 40


def test_sample_threads_and_train_batch_size_reach_their_code(run_copy: Path, tmp_path: Path) -> None:
    r = run("hpc_calo.sample", "--run", run_copy, "--showers", "10", "--out", tmp_path / "o.h5", "--threads", "2",
            "--keep-parts", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "o.h5.parts" / "request.json").read_text())["request"]["threads"] == 2
    one_line(run("hpc_calo.sample", "--run", run_copy, "--showers", "10", "--out", tmp_path / "p.h5",
                 "--threads", "0"), "--threads must be an integer >= 1, not '0'")
    run_dir = tmp_path / "r"
    r = run("hpc_calo.train", "--flow", "1", "--store", run_copy.parent / "store.zarr", "--preset", "tiny",
            "--out", run_dir, "--batch-size", "12", "--epochs", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((run_dir / "flow1" / "config.json").read_text())["train"]["batch_size"] == 12


# ---- 9: Ctrl-C on MPI ranks ------------------------------------------------------------------------------------


@pytest.mark.integration
def test_ctrl_c_on_mpi_convert_ends_every_rank(synthetic: Callable[..., Path], tmp_path: Path) -> None:
    """SIGINT to the process group of ``mpiexec -n 2`` (what Ctrl-C sends), at varied moments, 8 times: four
    trials at a time, each signalled at its own moment (the waits overlap). The earliest moments land while the
    ranks import or sit in MPI_Init, where a rank once waited forever for a peer Ctrl-C had already ended."""
    if not MPIEXEC.exists():
        pytest.skip("no mpiexec in the environment")
    data = synthetic("ds2", 2000, 5)
    delays = np.random.default_rng(0).uniform(0.3, 6.0, 8)

    def start(trial: int) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [str(MPIEXEC), "-n", "2", sys.executable, "-m", "data_prep.convert", "--dataset", "ds2", str(data),
             "--out", str(tmp_path / f"s{trial}.zarr"), "--chunk-showers", "10", "--block-showers", "10", "--quiet"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(REPO)})

    for first in range(0, len(delays), 4):
        trials = {trial: start(trial) for trial in range(first, min(first + 4, len(delays)))}
        t0 = time.monotonic()
        for trial in sorted(trials, key=lambda t: delays[t]):
            time.sleep(max(0.0, t0 + delays[trial] - time.monotonic()))
            os.killpg(trials[trial].pid, signal.SIGINT)
        for trial, proc in trials.items():
            try:
                _, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                for other in trials.values():
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(other.pid, signal.SIGKILL)
                    other.communicate()
                pytest.fail(f"trial {trial}: mpiexec still running 60 s after Ctrl-C at {delays[trial]:.1f} s "
                            "(a rank hangs)")
            # Interrupted (non-zero) or, when the signal came after the end, finished; never a hang.
            assert proc.returncode != 0 or "complete" in err, (trial, proc.returncode, err[-2000:])


@pytest.mark.integration
def test_ctrl_c_ends_a_rank_waiting_in_mpi_init() -> None:
    """Ctrl-C while one rank waits in MPI_Init for a peer that has already ended (as Ctrl-C during its imports
    does): MPI_Init runs in C, where Python's handler only sets a flag, so without care the rank waits forever."""
    if not MPIEXEC.exists():
        pytest.skip("no mpiexec in the environment")
    program = ("import os, sys\n"
               "if os.environ.get('PMI_RANK') == '1':\n    sys.exit(130)\n"
               "from hpc_calo.mpi import mpi_module\nmpi_module()\n")
    proc = subprocess.Popen([str(MPIEXEC), "-n", "2", sys.executable, "-c", program], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    time.sleep(3)
    assert proc.poll() is None, "rank 0 was expected to wait in MPI_Init for the ended rank 1"
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("mpiexec still running 30 s after Ctrl-C: the rank in MPI_Init ignored it")
    assert proc.returncode != 0


# ---- 10: requests that cannot fit ------------------------------------------------------------------------------


def test_requests_that_cannot_fit_are_refused_up_front(run_copy: Path, tmp_path: Path) -> None:
    free_mb = shutil.disk_usage(tmp_path).free / 1e6
    t0 = time.perf_counter()
    results = runs(*[(module, "--run", run_copy, "--showers", n, "--out", tmp_path / "o.h5")
                     for n in (10**12, 10**9) for module in ("hpc_calo.sample", "hpc_calo.generate")],
                   ("hpc_calo.sample", "--run", run_copy, "--showers", 2_000_000, "--shard-size", "1", "--out",
                    tmp_path / "o.h5"))
    assert time.perf_counter() - t0 < 60  # all five together: refused up front
    for r in results[:2]:
        one_line(r, "--showers must be an integer >= 1 and <= 1e+09")
    for r in results[2:4]:
        line = one_line(r, f"no space left on {tmp_path}", "(needed ~")
        assert free_mb < float(line.split("~")[1].split()[0].replace(",", ""))
    one_line(results[4], "more than the 1000000 a request may have")
    assert list(tmp_path.iterdir()) == []


# ---- 12: training stopped by a signal ---------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_train_checkpoints_when_stopped_by_a_signal(run_copy: Path, tmp_path: Path, sig: signal.Signals) -> None:
    args = [sys.executable, "-m", "hpc_calo.train", "--flow", "1", "--store", str(run_copy.parent / "store.zarr"),
            "--preset", "tiny", "--out", str(tmp_path / "r"), "--epochs", "100000", "--batch-size", "4",
            "--log-every", "1", "--checkpoint-every", "100000", "--threads", "1"]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stderr is not None
    for line in proc.stderr:
        if " step 3/" in line:
            break
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()  # what it was doing when it did not stop, for the failure's report
        pytest.fail(f"still running 120 s after {sig.name}; its last output:\n{proc.communicate()[1][-3000:]}")
    assert proc.returncode == 128 + sig, err
    assert f"{sig.name}: checkpoint written at step" in err and "Traceback" not in err
    ck = torch.load(tmp_path / "r" / "flow1" / "checkpoint.pt", weights_only=True)
    assert ck["global_step"] >= 3
    # The same command resumes from there.
    proc = subprocess.run([*args[:-6], "--epochs", "100000", "--max-steps", str(ck["global_step"] + 1)],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and f"step {ck['global_step']}/" in proc.stderr, proc.stderr[-2000:]


# ---- 14, 15: full and read-only file systems -------------------------------------------------------------------


@contextmanager
def mounted_tmpfs(path: Path, options: str) -> Iterator[Path]:
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.skipif(not IS_ROOT, reason="mounting a 20 MB tmpfs needs root")
def test_a_full_disk_is_one_line_and_leaves_no_partial_output(run_copy: Path, synthetic: Callable[..., Path],
                                                              tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "full", "size=20m") as full:
        # Found up front: the estimate does not fit.
        for r in runs(*((module, "--run", run_copy, "--showers", n, "--out", full / "o.h5", "--no-progress")
                        for module, n in (("hpc_calo.sample", 2000), ("hpc_calo.generate", 4000)))):
            one_line(r, f"no space left on {full} (needed ~", "MB free)")
        assert list(full.iterdir()) == []
        # Found while writing (the estimate passed, the bytes did not fit): no segfault, nothing left.
        script = ("import numpy as np\nfrom hpc_calo.errors import run_cli\nfrom hpc_calo.io import CaloWriter\n"
                  "from hpc_calo.geometry import DS2\ndef main(argv):\n"
                  f"    with CaloWriter({str(full / 'w.h5')!r}, DS2, n_total=2000) as w:\n"
                  "        for _ in range(20):\n"
                  "            w.write(np.full(100, 5e3), np.random.default_rng(0).random((100, DS2.n_voxels), "
                  "dtype=np.float32))\nrun_cli(main)\n")
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
        one_line(r, f"no space left on {full} (needed ~52 MB)")
        assert list(full.iterdir()) == []
        one_line(run("data_prep.convert", "--dataset", "ds2", synthetic("ds2", 6000, 8), "--out", full / "s.zarr",
                     "--quiet"), f"no space left on {full}", "stays incomplete")
        shutil.rmtree(full / "s.zarr")
        big = synthetic("ds2", 1000, 9)
        one_line(run("hpc_calo.evaluate", big, big, "--dataset", "ds2", "--out", full / "rep", "--epochs", "1",
                     "--metrics", "cls-low"), f"no space left on {full} (needed ~", after_progress=True)
        assert list(full.iterdir()) == []


@pytest.mark.skipif(not IS_ROOT, reason="a read-only mount needs root (root ignores permission bits)")
def test_a_read_only_output_directory_is_one_line(run_copy: Path, ref: Path, tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        store = run_copy.parent / "store.zarr"
        for r in runs(("data_prep.convert", "--dataset", "ds2", ref, "--out", ro / "s.zarr"),
                      ("hpc_calo.train", "--flow", "1", "--store", store, "--preset", "tiny", "--out", ro / "r"),
                      ("hpc_calo.evaluate", ref, ref, "--dataset", "ds2", "--out", ro / "rep"),
                      ("hpc_calo.generate", "--run", run_copy, "--showers", "5", "--out", ro / "g.h5"),
                      ("hpc_calo.sample", "--run", run_copy, "--showers", "5", "--out", ro / "g.h5")):
            one_line(r, "read-only file system")


# ---- 17: strings that reach sbatch scripts ---------------------------------------------------------------------


def test_strings_that_reach_sbatch_scripts_are_validated(tmp_path: Path) -> None:
    base = ["launch.submit", "--cluster", "slurm", "--dry-run", "--dataset", "ds2", "--synthetic", "100"]
    for flag, value, message in (
        ("--partition", "gpu\n#SBATCH --wrap=evil", "--partition"),
        ("--account", "proj;rm -rf x", "--account"),
        ("--qos", "normal high", "--qos"),
        ("--time", "01:00:00\n#SBATCH --x", "--time must be HH:MM:SS"),
    ):
        one_line(run(*base, "--out", tmp_path / "r", flag, value), message)
    one_line(run(*base, "--out", f"{tmp_path}/r\n#SBATCH --x"), "may not hold spaces or control characters")
    config = tmp_path / "c.toml"
    config.write_text('[resources]\npartition = "a\\nb"\n')
    one_line(run(*base, "--out", tmp_path / "r", "--config", config), "--partition")
    ok = run(*base, "--out", tmp_path / "r", "--partition", "gpu,cpu", "--account", "my-proj_1", "--qos", "high")
    assert ok.returncode == 0, ok.stderr


# ---- 18: a resumed training keeps its store --------------------------------------------------------------------


def test_resuming_a_run_with_another_store_is_refused(run_copy: Path, tmp_path: Path) -> None:
    other = shutil.copytree(run_copy.parent / "store.zarr", tmp_path / "other.zarr")
    before = (run_copy / "run.json").read_text()
    one_line(run("hpc_calo.train", "--flow", "1", "--store", other, "--preset", "tiny", "--out", run_copy,
                 "--epochs", "1"), "holds a store", f"pass --store {(run_copy.parent / 'store.zarr').resolve()} or")
    one_line(run("hpc_calo.distill", "--run", run_copy, "--flow", "2", "--store", other, "--epochs", "1"),
             "holds a store")
    assert (run_copy / "run.json").read_text() == before
