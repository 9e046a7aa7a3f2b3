"""Thread sizing: the CPUs a process owns, and OpenMP told to wait passively before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hpc_calo import cpus


@pytest.fixture
def cpu_limits(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """Set (affinity CPUs, SLURM_CPUS_PER_TASK or None, cgroup cpu.max text or None)."""

    def limit(affinity: int, slurm: str | None, cpu_max: str | None) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)))
        if slurm is None:
            monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
        else:
            monkeypatch.setenv("SLURM_CPUS_PER_TASK", slurm)
        path = tmp_path / "cpu.max"
        if cpu_max is not None:
            path.write_text(cpu_max + "\n")
        monkeypatch.setattr(cpus, "CGROUP_CPU_MAX", str(path))

    return limit


@pytest.mark.parametrize(
    ("affinity", "slurm", "cpu_max", "owned"),
    [
        (8, None, None, 8),  # only the affinity mask
        (8, "3", None, 3),  # a SLURM task's share
        (8, None, "150000 100000", 2),  # a quota of 1.5 CPUs: a second thread still gets half a CPU
        (8, None, "max 100000", 8),  # no quota
        (2, "4", "400000 100000", 2),  # the mask is the smallest
        (8, "", "garbage", 8),  # unreadable values limit nothing
        (8, None, "50000 100000", 1),  # never below one
    ],
)
def test_owned_cpus_is_the_smallest_limit(cpu_limits, affinity, slurm, cpu_max, owned):
    cpu_limits(affinity, slurm, cpu_max)
    assert cpus.owned_cpus() == owned


@pytest.mark.parametrize(
    ("threads", "batches", "split"),
    [
        (2, 10, (2, 1)),  # a batch per thread
        (2, 1, (1, 2)),  # one batch: both threads inside it
        (8, 2, (2, 4)),
        (4, 3, (3, 1)),  # a leftover thread stays idle rather than unbalance the lanes
        (1, 5, (1, 1)),
    ],
)
def test_batch_lanes_prefer_whole_batches_per_thread(threads, batches, split):
    assert cpus.batch_lanes(threads, batches) == split


def test_torch_threads_follow_the_owned_cpus_unless_given(cpu_limits):
    import torch

    before = torch.get_num_threads()
    try:
        cpu_limits(8, "3", None)
        assert cpus.torch_threads() == 3 == torch.get_num_threads()
        assert cpus.torch_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(("given", "seen"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_importing_hpc_calo_sets_the_wait_policy_before_torch_loads(given, seen):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = "import os, sys, hpc_calo; print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.split() == [seen, "False"]
