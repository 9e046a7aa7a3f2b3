"""The local SLURM cluster (slurm/local_cluster.sh) does what the launchers rely on.

Needs the cluster up (`slurm/local_cluster.sh up`, as root). Without it these tests skip, unless
HPC_CALO_REQUIRE_SLURM=1 (CI), where a missing cluster is a failure.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
# Jobs run the repository's interpreter, as the launchers' jobs will.
PYTHON = REPO / ".venv" / "bin" / "python"
if not PYTHON.exists():
    PYTHON = Path(sys.executable)
UP = "slurm/local_cluster.sh up"
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED"}


def _run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def _cluster_problem() -> str | None:
    """Why the cluster cannot be used, or None when it can."""
    if shutil.which("sinfo") is None:
        return f"SLURM is not installed (no sinfo on PATH): run `{UP}` as root"
    try:
        info = _run(["sinfo", "-h", "-o", "%T"], timeout=60)
    except subprocess.TimeoutExpired:
        return f"sinfo did not answer in 60 s: is the cluster up? run `{UP}`"
    if info.returncode != 0:
        return f"sinfo failed ({_last_line(info.stderr)}): run `{UP}`"
    states = info.stdout.split()
    if not any(s.rstrip("*~#$@").lower() in {"idle", "mixed", "allocated", "completing"} for s in states):
        return f"no usable SLURM node (states: {states}): run `{UP}`"
    acct = _run(["sacct", "-n", "-X", "-S", "now-1hour"], timeout=60)
    if acct.returncode != 0:
        return f"sacct does not answer ({_last_line(acct.stderr)}): accounting (slurmdbd) is not up"
    return None


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster() -> None:
    problem = _cluster_problem()
    if problem is None:
        return
    if os.environ.get("HPC_CALO_REQUIRE_SLURM") == "1":
        pytest.fail(f"HPC_CALO_REQUIRE_SLURM=1 but the SLURM cluster is unusable: {problem}")
    pytest.skip(problem)


def _sacct_state(job_id: str, timeout: float = 30) -> str:
    """The job's final state as accounting records it (slurmctld reports to slurmdbd asynchronously)."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        out = _run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id]).stdout.split()
        state = out[0] if out else ""
        if state and state.split()[0] in FINISHED:
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not finished in accounting after {timeout} s (last state {state!r})")


def test_batch_job_completes_and_is_accounted(tmp_path: Path) -> None:
    out = tmp_path / "job.out"
    # --wait: sbatch returns when the job ends, with the job's exit code.
    sub = _run(
        [
            "sbatch",
            "--parsable",
            "--wait",
            "-J",
            "hpccalo-test",
            "-o",
            str(out),
            "--time=00:02:00",
            "--wrap",
            f"echo job=$SLURM_JOB_ID; {PYTHON} -c 'print(6 * 7)'",
        ],
        timeout=120,
    )
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().split(";")[0]
    assert job_id.isdigit()
    assert out.read_text().split() == [f"job={job_id}", "42"]
    assert _sacct_state(job_id) == "COMPLETED"


def test_srun_wires_two_mpi_ranks() -> None:
    code = (
        "from mpi4py import MPI; c = MPI.COMM_WORLD; "
        "print(c.Get_rank(), c.Get_size(), c.allreduce(c.Get_rank() + 1), flush=True)"
    )
    run = _run(["srun", "-n", "2", "--mpi=pmi2", "--time=00:02:00", str(PYTHON), "-c", code], timeout=120)
    assert run.returncode == 0, run.stderr
    # Two ranks of one world of size 2 that can talk: 1 + 2 = 3 on both (singletons would say "0 1 1").
    assert sorted(run.stdout.splitlines()) == ["0 2 3", "1 2 3"]


def _executor(folder: Path):  # -> submitit.AutoExecutor
    submitit = pytest.importorskip("submitit")
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_python=str(PYTHON))
    # submitit asks for its timeout signal 90 s before the limit, and SLURM may send it up to 60 s early: with a
    # 2-minute limit a job was signalled 3 s after it started and failed (not checkpointable). 10 minutes is safe.
    executor.update_parameters(timeout_min=10, nodes=1, tasks_per_node=1, cpus_per_task=1)
    return executor


def test_submitit_job_returns_result(tmp_path: Path) -> None:
    job = _executor(tmp_path).submit(math.sqrt, 1764.0)
    assert job.job_id.isdigit()
    assert job.result() == 42.0
    assert _sacct_state(job.job_id) == "COMPLETED"


def test_submitit_sees_cancelled_job(tmp_path: Path) -> None:
    from submitit.core.utils import UncompletedJobError

    job = _executor(tmp_path).submit(time.sleep, 300)
    deadline = time.monotonic() + 60
    while job.get_info(mode="force").get("State") != "RUNNING":
        assert time.monotonic() < deadline, f"job {job.job_id} never started: {job.get_info()}"
        time.sleep(0.5)
    job.cancel(check=True)
    assert _sacct_state(job.job_id).startswith("CANCELLED")
    assert job.done(force_check=True)
    assert job.state.startswith("CANCELLED")
    # No result was written; don't wait submitit's default 15 s for one to appear on a slow filesystem.
    job._results_timeout_s = 1
    assert isinstance(job.exception(), UncompletedJobError)
    with pytest.raises(UncompletedJobError):
        job.result()


@pytest.mark.skipif(
    os.environ.get("HPC_CALO_SLURM_SLOW") != "1",
    reason="takes 60-100 s (SLURM's shortest limit is 1 min, checked every 30 s); set HPC_CALO_SLURM_SLOW=1",
)
def test_time_limit_is_enforced(tmp_path: Path) -> None:
    sub = _run(
        ["sbatch", "--parsable", "--wait", "-o", str(tmp_path / "slow.out"), "--time=00:01:00", "--wrap", "sleep 600"],
        timeout=240,
    )
    job_id = sub.stdout.strip().split(";")[0]
    assert sub.returncode != 0
    assert _sacct_state(job_id) == "TIMEOUT"
