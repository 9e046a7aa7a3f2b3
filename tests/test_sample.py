"""The distributed sampler: exact and reproducible across backends, resumable after a killed worker, a gather
whose memory does not grow with N, and one clear line for each bad request.

Generation uses the real chain of a tiny trained run (``tiny_run``); Ray and MPI are real (a local Ray with
2 CPU slots, ``mpiexec -n 2`` from the mpich wheel).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpc_calo import rundir
from hpc_calo.errors import UserError
from hpc_calo.geometry import DS2, DS3, Geometry
from hpc_calo.io import CaloWriter
from hpc_calo.ray_session import thread_policy
from hpc_calo.sample.__main__ import main
from hpc_calo.sample.gather import gather
from hpc_calo.sample.parts import PartsDir
from hpc_calo.sample.plan import Request, make_plan
from hpc_calo.sample.worker import run_digest

BIN = Path(sys.executable).parent
N, SHARD, SEED = 120, 10, 3  # 12 shards
N_SHARDS = N // SHARD


def args(run: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--run", str(run), "--showers", str(N), "--shard-size", str(SHARD), "--seed", str(SEED),
        "--out", str(out), "--compression", "none", "--no-progress", *extra,
    ]  # fmt: skip


def read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(path, "r") as f:
        return f["incident_energies"][:], f["showers"][:]


def assert_same(a: Path, b: Path) -> None:
    (ea, sa), (eb, sb) = read(a), read(b)
    assert ea.shape == eb.shape == (N, 1) and sa.shape == sb.shape == (N, DS2.n_voxels)
    assert np.array_equal(ea, eb)
    assert np.array_equal(sa, sb)


def mpi_cmd(*argv: str) -> list[str]:
    return [str(BIN / "mpiexec"), "-n", "2", sys.executable, "-m", "hpc_calo.sample", *argv, "--backend", "mpi"]


def energy_file(path: Path, energies: np.ndarray, geometry: Geometry = DS2) -> Path:
    with CaloWriter(path, geometry, n_total=len(energies), compression="none") as w:
        w.write(energies, np.zeros((len(energies), geometry.n_voxels), np.float32))
    return path


@pytest.fixture(scope="module")
def trained_range(tiny_run: Path) -> tuple[float, float]:
    return tuple(rundir.read_run(tiny_run)["energy_range"])


@pytest.fixture(scope="module")
def reference(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted local-backend output every other run must equal bit for bit."""
    out = tmp_path_factory.mktemp("reference") / "local.h5"
    assert main(args(tiny_run, out)) == 0
    return out


# ---- plan ----------------------------------------------------------------------------------------------------


def test_plan_seeds_energies_and_fingerprint(tmp_path: Path) -> None:
    plan = make_plan(Request(run_dir=tmp_path, n=25, seed=5, shard_size=10), DS2, (1e3, 1e6), "w")
    assert [(s.start, s.count) for s in plan.shards] == [(0, 10), (10, 10), (20, 5)]
    e = [plan.energies(s) for s in plan.shards]
    assert all(np.all((x >= 1e3) & (x <= 1e6)) for x in e)
    assert np.array_equal(e[0], plan.energies(plan.shards[0]))  # recomputed, not stored
    assert not np.array_equal(e[0], e[1])
    # A row's energy depends on (seed, row) only: not on the shard size nor on how many shards there are.
    big = make_plan(Request(run_dir=tmp_path, n=1000, seed=5, shard_size=7), DS2, (1e3, 1e6), "w")
    assert np.array_equal(np.concatenate([big.energies(s) for s in big.shards])[:25], np.concatenate(e))
    fp = {
        make_plan(Request(run_dir=tmp_path, n=25, seed=seed, shard_size=10, device=dev), DS2, (1e3, 1e6), w).fingerprint
        for seed, dev, w in [(5, "cpu", "w"), (5, "cpu", "other weights"), (6, "cpu", "w"), (5, "cuda:0", "w")]
    }
    assert len(fp) == 4
    same = make_plan(Request(run_dir=tmp_path, n=25, seed=5, shard_size=10, device="cuda:1"), DS2, (1e3, 1e6), "w")
    assert same.fingerprint in fp  # the device index does not change the bits


def test_generate_and_sample_give_the_same_showers_for_the_same_seed(reference: Path, tiny_run: Path,
                                                                     tmp_path: Path) -> None:
    """One seeding rule: row i's randomness depends on (seed, i) only, so one pass of generate equals the
    sharded production (whose Ray and MPI runs equal the local one, see below), bit for bit when the batch
    boundaries coincide with the shards', to rounding otherwise."""
    from hpc_calo.generate import main as generate_main

    common = ["--run", str(tiny_run), "--showers", str(N), "--seed", str(SEED), "--threads", "1", "--no-progress"]
    aligned = tmp_path / "aligned.h5"
    assert generate_main([*common, "--out", str(aligned), "--batch-size", str(SHARD)]) == 0
    assert_same(reference, aligned)
    one_batch = tmp_path / "one_batch.h5"
    assert generate_main([*common, "--out", str(one_batch), "--batch-size", str(N)]) == 0
    (e_ref, s_ref), (e, s) = read(reference), read(one_batch)
    assert np.array_equal(e_ref, e)
    np.testing.assert_allclose(s, s_ref, rtol=1e-4, atol=1e-3)


# ---- local backend, errors -----------------------------------------------------------------------------------


def test_local_output_is_a_valid_file(reference: Path, tiny_run: Path, trained_range: tuple[float, float]) -> None:
    e, s = read(reference)
    assert e.shape == (N, 1) and s.shape == (N, DS2.n_voxels) and s.dtype == np.float32
    assert np.all((e >= trained_range[0]) & (e <= trained_range[1]))
    assert np.all(np.isfinite(s)) and s.min() >= 0 and (s.sum(axis=1) > 0).all()
    assert not reference.with_name(reference.name + ".parts").exists()  # parts deleted after the gather


def test_energies_file_conditions_the_showers(
    tiny_run: Path, trained_range: tuple[float, float], tmp_path: Path
) -> None:
    lo, hi = trained_range
    ref = energy_file(tmp_path / "ref.h5", np.geomspace(lo, hi, N + 5)[::-1].copy())
    out = tmp_path / "gen.h5"
    argv = ["--run", str(tiny_run), "--showers", "25", "--shard-size", "10", "--energies", str(ref)]
    assert main([*argv, "--out", str(out), "--no-progress", "--keep-parts"]) == 0
    e, s = read(out)
    assert np.array_equal(e[:, 0], np.geomspace(lo, hi, N + 5)[::-1][:25])  # the first N, in order
    assert s.shape == (25, DS2.n_voxels)
    assert sorted(p.name for p in out.with_name("gen.h5.parts").glob("part-*")) == [
        f"part-{i:06d}.{x}" for i in range(3) for x in ("h5", "json")
    ]


def _unwritable_dir(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        return d
    if not os.access("/proc/sys", os.W_OK):  # read-only even for root
        return Path("/proc/sys")
    pytest.skip("running as root with no read-only directory to write into")


def test_bad_requests_have_clear_errors(tiny_run: Path, trained_range: tuple[float, float], tmp_path: Path) -> None:
    lo, hi = trained_range
    out = tmp_path / "o.h5"
    incomplete = tmp_path / "incomplete"
    shutil.copytree(tiny_run, incomplete)
    for student in (False, True):
        rundir.weights(incomplete, 3, student).unlink()
    (tmp_path / "adir.h5").mkdir()
    few = energy_file(tmp_path / "few.h5", np.full(5, lo * 2))
    # Valid CaloChallenge energies (1 GeV - 1 TeV) that reach well outside the range a run was trained on (a
    # copy of the run that records a narrower range: the tiny run's 40 showers span nearly all of it).
    narrow = tmp_path / "narrow"
    shutil.copytree(tiny_run, narrow)
    record = json.loads((narrow / "run.json").read_text())
    (narrow / "run.json").write_text(json.dumps({**record, "energy_range": [1e4, 1e5]}))
    wide = energy_file(tmp_path / "wide.h5", np.geomspace(2e4, 2e5, N))
    ds3 = energy_file(tmp_path / "ds3.h5", np.full(N, lo * 2), DS3)
    cases = {
        "--showers must be an integer >= 1": args(tiny_run, out, "--showers", "0"),
        "no such run directory": args(tmp_path / "nope", out),
        "incomplete run": args(incomplete, out),
        "does not exist": args(tiny_run, tmp_path / "missing" / "o.h5"),
        "exists and is not a CaloChallenge HDF5 file": args(tiny_run, tmp_path / "adir.h5"),
        "is not writable": args(tiny_run, _unwritable_dir(tmp_path) / "o.h5"),
        "outside the trained range": args(tiny_run, out, "--emin", str(lo / 2)),
        "holds 5 showers but 120 were requested": args(tiny_run, out, "--energies", str(few)),
        "reach outside the trained range": args(narrow, out, "--energies", str(wide)),
        "ds2 needs 6480": args(tiny_run, out, "--energies", str(ds3)),
        "either --energies or --emin/--emax": args(tiny_run, out, "--energies", str(few), "--emin", str(lo)),
    }
    for message, argv in cases.items():
        with pytest.raises(UserError, match=re.escape(message)):
            main(argv)
            pytest.fail(f"no error for: {message}")
    assert not out.exists() and not out.with_name("o.h5.parts").exists()

    # A parts directory left by another request (here: another seed) is refused, naming the difference.
    other = make_plan(Request(run_dir=tiny_run, n=N, seed=99, shard_size=SHARD), DS2, (lo, hi), run_digest(tiny_run))
    PartsDir(tmp_path / "o.h5.parts").claim(other)
    with pytest.raises(UserError, match=r"different request .*seed 99 here vs 3 requested"):
        main(args(tiny_run, out))

    # As a command: exit 2 and one line, no traceback.
    proc = subprocess.run(
        [sys.executable, "-m", "hpc_calo.sample", *args(tiny_run, out, "--showers", "-4")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --showers must be an integer >= 1 and <= 1e+09, not '-4'"]


# ---- gather --------------------------------------------------------------------------------------------------


def _synthetic_parts(root: Path, n: int, shard: int = 100) -> tuple:
    """Parts of random showers for a plan, written through the real part writer (no model needed)."""
    plan = make_plan(Request(run_dir=root, n=n, shard_size=shard), DS2, (1e3, 1e6), "synthetic")
    parts = PartsDir(root / "parts")
    parts.claim(plan)
    rng = np.random.default_rng(0)
    for s in plan.shards:
        parts.write(plan, s, plan.energies(s), [rng.random((s.count, DS2.n_voxels), dtype=np.float32)])
    return plan, parts


_GATHER = """
import json, sys, tracemalloc
from pathlib import Path
from hpc_calo.geometry import DS2
from hpc_calo.sample.gather import gather
from hpc_calo.sample.parts import PartsDir
from hpc_calo.sample.plan import Request, make_plan
root, n = Path(sys.argv[1]), int(sys.argv[2])
plan = make_plan(Request(run_dir=root, n=n, shard_size=100), DS2, (1e3, 1e6), "synthetic")
tracemalloc.start()
g = gather(plan, PartsDir(root / "parts"), root / "out.h5", "none", block_bytes=2**20, progress=False)
# VmHWM, not ru_maxrss: the latter keeps the forking parent's RSS across exec.
hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:"))
print(json.dumps({"n": g.n, "traced": tracemalloc.get_traced_memory()[1], "rss": hwm * 1024}))
"""


def test_gather_memory_does_not_grow_with_n(tmp_path: Path) -> None:
    peaks = {}
    for n in (400, 3200):  # 10 MB and 83 MB of showers, in parts of 100 showers
        root = tmp_path / str(n)
        root.mkdir()
        _synthetic_parts(root, n)
        proc = subprocess.run(
            [sys.executable, "-c", _GATHER, str(root), str(n)], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        peaks[n] = json.loads(proc.stdout)
        assert peaks[n]["n"] == n and read(root / "out.h5")[1].shape == (n, DS2.n_voxels)
        assert not (root / "parts").exists()
    data_growth = (3200 - 400) * DS2.n_voxels * 4
    # Python-side allocations: one re-blocking buffer (one 4 MiB chunk of rows here), whatever N.
    assert peaks[3200]["traced"] < 8 * 2**20
    assert peaks[3200]["traced"] - peaks[400]["traced"] < 2**20
    # The whole process (HDF5 caches included): RSS grows by far less than the data (73 MB).
    assert peaks[3200]["rss"] - peaks[400]["rss"] < 0.15 * data_growth, peaks


def test_gather_rejects_a_corrupt_part_and_forgets_it(tmp_path: Path) -> None:
    plan, parts = _synthetic_parts(tmp_path, 300)
    with h5py.File(parts.part_path(1), "r+") as f:
        f["showers"][5, 7] += 1.0
    with pytest.raises(UserError, match=r"part-000001\.h5: contents do not match the sha256"):
        gather(plan, parts, tmp_path / "out.h5", "none", progress=False)
    assert not (tmp_path / "out.h5").exists()
    assert np.flatnonzero(parts.finished(plan)).tolist() == [0, 2]  # shard 1 will be regenerated by the next run
    with pytest.raises(UserError, match="1 of 3 shards are not generated yet"):
        gather(plan, parts, tmp_path / "out.h5", "none", progress=False)


# ---- Ray and MPI ---------------------------------------------------------------------------------------------


@pytest.fixture
def local_ray():
    """The local Ray every hpc-calo command starts when given no cluster."""
    ray = pytest.importorskip("ray")
    from hpc_calo.ray_session import ray_session

    with ray_session(None, num_cpus=2):
        yield ray


@pytest.mark.integration
def test_local_ray_runs_its_workers_at_the_drivers_niceness_and_its_plumbing_as_batch(local_ray) -> None:
    # Not Ray's default of 15, below Ray's own processes: with a CPU reserved for every worker, two DDP workers
    # on two cores trained 5 % faster at equal niceness (BENCHMARKS, "Distributed training").
    niceness = local_ray.remote(lambda: os.getpriority(os.PRIO_PROCESS, 0))
    assert local_ray.get(niceness.remote()) == os.getpriority(os.PRIO_PROCESS, 0)
    assert "RAY_worker_niceness" not in os.environ  # the setting went to the cluster, not to this process

    # Every worker process starts under SCHED_BATCH (its 10 ms wake-ups never preempt a rank); a thread that
    # computes takes normal scheduling back, and the threads it starts inherit it. An actor has a fresh process.
    @local_ray.remote
    class Probe:
        def policies(self) -> tuple[str, str, str]:
            import threading

            from hpc_calo.ray_session import reclaim_cpu, thread_policy

            before = thread_policy()
            reclaim_cpu()
            child: list[str] = []
            t = threading.Thread(target=lambda: child.append(thread_policy()))
            t.start()
            t.join()
            return before, thread_policy(), child[0]

    probe = Probe.remote()
    assert local_ray.get(probe.policies.remote()) == ("batch", "other", "other")
    local_ray.kill(probe)
    assert thread_policy() == "other"  # the driver's own thread is back to normal

    # The cluster's daemons (GCS, raylet and its agents) started from a thread under SCHED_BATCH.
    import psutil  # a dependency of Ray

    daemons = {p.name(): p.pid for p in psutil.Process().children(recursive=True)}
    assert {os.sched_getscheduler(daemons[name]) for name in ("gcs_server", "raylet")} == {os.SCHED_BATCH}, daemons


def test_a_sandbox_that_forbids_changing_the_scheduling_leaves_ray_as_it_starts(monkeypatch) -> None:
    from hpc_calo import ray_session

    def forbidden(*_: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", forbidden)
    monkeypatch.setattr(ray_session, "_lowered", False)
    ray_session.setup_worker()  # no error: the hook must never stop a worker from starting
    assert ray_session._lowered is False
    ray_session.reclaim_cpu()  # and nothing to take back
    before = ray_session.thread_policy()
    with ray_session._daemons_as_batch():  # nor the start of a local cluster
        assert ray_session.thread_policy() == before


def test_a_local_cluster_starts_from_a_batch_thread_that_then_returns_to_its_policy(monkeypatch) -> None:
    from hpc_calo import ray_session

    before = ray_session.thread_policy()
    with ray_session._daemons_as_batch():
        assert ray_session.thread_policy() == "batch"
    assert ray_session.thread_policy() == before
    monkeypatch.setenv(ray_session.BATCH_ENV, "0")
    with ray_session._daemons_as_batch():
        assert ray_session.thread_policy() == before


@pytest.mark.integration
def test_ray_and_mpi_match_local_bit_for_bit(reference: Path, tiny_run: Path, tmp_path: Path, local_ray) -> None:
    ray_out = tmp_path / "ray.h5"
    assert main([*args(tiny_run, ray_out), "--backend", "ray", "--workers", "2", "--keep-parts"]) == 0
    assert_same(reference, ray_out)
    assert len(writers(ray_out)) == 2  # both actors generated shards

    mpi_out = tmp_path / "mpi.h5"
    proc = subprocess.run(
        mpi_cmd(*args(tiny_run, mpi_out), "--keep-parts"), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{N_SHARDS} generated" in proc.stdout
    assert_same(reference, mpi_out)
    assert len(writers(mpi_out)) == 2  # both ranks generated shards


def writers(out: Path) -> set[int]:
    """Process ids recorded in the manifest of a kept parts directory."""
    return {json.loads(p.read_text())["pid"] for p in out.with_name(out.name + ".parts").glob("part-*.json")}


@pytest.mark.integration
def test_killed_mpi_rank_then_rerun_gives_the_uninterrupted_output(
    reference: Path, tiny_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "prod.h5"
    parts = tmp_path / "prod.h5.parts"
    proc = subprocess.Popen(
        mpi_cmd(*args(tiny_run, out)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    killed = None
    try:
        deadline = time.monotonic() + 240
        while killed is None and time.monotonic() < deadline and proc.poll() is None:
            records = list(parts.glob("part-*.json"))
            if records:
                killed = json.loads(records[0].read_text())["pid"]  # the rank that wrote the first part
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.01)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert killed is not None, "no part appeared before the job ended"
    assert proc.returncode != 0  # mpiexec reports the dead rank and stops the job
    assert not out.exists()
    before = {p.name: p.stat().st_mtime_ns for p in parts.glob("part-*.json")}
    assert 0 < len(before) < N_SHARDS, before

    # The same command again (here on the local backend: the request, not the backend, defines the bits).
    lines = subprocess.run(
        [sys.executable, "-m", "hpc_calo.sample", *args(tiny_run, out), "--keep-parts"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    assert f"{N_SHARDS - len(before)} generated" in lines and f"{len(before)} reused" in lines
    after = {p.name: p.stat().st_mtime_ns for p in parts.glob("part-*.json")}
    assert len(after) == N_SHARDS and all(after[k] == v for k, v in before.items())  # finished shards untouched
    assert not list(parts.glob(".*tmp*"))  # a part the kill cut short left no temporary behind
    assert_same(reference, out)
