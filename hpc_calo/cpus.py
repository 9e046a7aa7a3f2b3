"""The CPUs this process owns, and torch's threads sized to them.

torch starts one OpenMP thread per core of the machine. Where some of those cores belong to others (an
affinity mask, a SLURM allocation, a container's CPU quota), every parallel region waits for the threads that
did not get a core, and small models train tens of times slower. Threads that busy-wait at the end of a
region also keep their core from the thread that is late, so OpenMP is told to wait passively.
"""

from __future__ import annotations

import math
import os

CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"


def quiet_openmp() -> None:
    """OpenMP reads its wait policy once, when torch loads it: this must run before ``import torch``.

    A wait policy the environment already sets is kept.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def owned_cpus() -> int:
    """The fewest of: the CPUs in the affinity mask, ``SLURM_CPUS_PER_TASK``, the cgroup quota (rounded up)."""
    n = len(os.sched_getaffinity(0))
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        n = min(n, int(slurm))
    try:
        with open(CGROUP_CPU_MAX) as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota visible: no limit from it
    return max(1, n)


def batch_lanes(threads: int, batches: int) -> tuple[int, int]:
    """Split ``threads`` CPUs into (lanes, torch threads per lane) for ``batches`` independent batches.

    A lane is a thread that runs whole batches, one torch thread each, side by side with the other lanes: the
    ops of a flow on one batch are short parallel regions, so two batches at once on one thread each go nearly
    twice as fast as one batch on two threads. Only where there are fewer batches than CPUs do the leftover CPUs
    become torch threads inside each lane.
    """
    lanes = max(1, min(threads, batches))
    return lanes, max(1, threads // lanes)


def torch_threads(n: int = 0) -> int:
    """Give torch ``n`` intra-op threads (0: the CPUs this process owns) and return the number."""
    import torch

    n = n or owned_cpus()
    torch.set_num_threads(n)
    return n
