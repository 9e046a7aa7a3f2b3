"""The CPUs this process owns, and torch's threads sized to them and to what other processes leave free.

torch starts one OpenMP thread per core of the machine. Where some of those cores belong to others (an
affinity mask, a SLURM allocation, a container's CPU quota), or another process keeps one of them busy, every
parallel region waits for the thread that did not get a whole core, and training runs at a fraction of its
speed. :class:`ThreadGovernor` keeps the thread count at the owned CPUs that are free while a loop runs.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"
PROC_STAT = "/proc/stat"


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


def cpu_ticks(cpus: set[int]) -> tuple[int, int] | None:
    """(busy, all) clock ticks since boot summed over ``cpus``, from /proc/stat; None where it cannot be read.

    Busy is user, nice, system, irq and softirq time; waiting for I/O and time the hypervisor took (steal) are not.
    """
    busy = every = 0
    try:
        with open(PROC_STAT) as f:
            for line in f:
                name, *ticks = line.split()
                if not name.startswith("cpu") or name == "cpu":
                    continue
                if int(name[3:]) in cpus:
                    t = [int(x) for x in ticks[:8]]
                    busy += t[0] + t[1] + t[2] + t[5] + t[6]
                    every += sum(t)
    except (OSError, ValueError, IndexError):
        return None
    return (busy, every) if every else None


def own_ticks() -> float:
    """Clock ticks this process (all its threads) has run since it started."""
    t = os.times()
    return (t.user + t.system) * os.sysconf("SC_CLK_TCK")


@dataclass
class ThreadGovernor:
    """torch's intra-op threads, while a loop runs, sized to the owned CPUs that other processes leave free.

    ``start()`` sets the count from a short look at the CPUs before work begins; ``poll()``, called once per
    step, looks again every ``period_s`` and returns the new count when it changed. A CPU counts as taken when
    other processes use more than ``taken_above`` of one (the CPU time of this process is subtracted, so its own
    threads never count). Fewer threads follow at once; more only after ``rise_after`` looks in a row agree, so a
    competitor that pauses briefly does not make the count swing.

    Training gives bit-identical results for any thread count on the CPUs tested (``tests/test_cpus.py``), so a
    run the governor changes keeps resuming bit-exactly. Where /proc/stat cannot be read the count stays at
    ``ceiling``.
    """

    ceiling: int
    governed: bool = True  # False: exactly ``ceiling`` threads, never changed
    period_s: float = 1.0
    taken_above: float = 0.25
    rise_after: int = 3
    set_threads: Callable[[int], None] | None = None  # torch.set_num_threads unless given
    clock: Callable[[], float] = time.monotonic
    threads: int = field(init=False, default=0)
    others: float = field(init=False, default=0.0)  # CPUs the other processes used over the last look
    _cpus: set[int] = field(init=False, default_factory=set)
    _last: tuple[float, int, int, float] | None = field(init=False, default=None)
    _rises: int = field(init=False, default=0)

    def start(self, look_s: float = 0.1) -> int:
        self._cpus = os.sched_getaffinity(0)
        self._set(self.ceiling)
        if self.governed and self.ceiling > 1 and self._look() is not None:
            time.sleep(look_s)
            free = self._free()
            if free is not None and free != self.threads:
                self._set(free)
        return self.threads

    def poll(self) -> int | None:
        if self._last is None or self.clock() - self._last[0] < self.period_s:  # None: not governed, or unreadable
            return None
        free = self._free()
        if free is None or free == self.threads:
            self._rises = 0
            return None
        if free > self.threads:
            self._rises += 1
            if self._rises < self.rise_after:
                return None
        self._rises = 0
        self._set(free)
        return free

    def _look(self) -> tuple[float, int, int, float] | None:
        ticks = cpu_ticks(self._cpus)
        if ticks is None:
            self._last = None
            return None
        self._last = (self.clock(), *ticks, own_ticks())
        return self._last

    def _free(self) -> int | None:
        before = self._last
        now = self._look()
        if before is None or now is None or now[2] <= before[2]:
            return None
        per_cpu = (now[2] - before[2]) / len(self._cpus)
        self.others = max(0.0, (now[1] - before[1]) - (now[3] - before[3])) / per_cpu
        taken = max(0, math.ceil(self.others - self.taken_above))
        return max(1, min(self.ceiling, len(self._cpus) - taken))

    def _set(self, n: int) -> None:
        if self.set_threads is None:
            import torch

            self.set_threads = torch.set_num_threads
        self.set_threads(n)
        self.threads = n


def governed_threads(n: int = 0) -> ThreadGovernor:
    """torch's threads for a loop: exactly ``n`` when given (the governor never changes them), else governed."""
    gov = ThreadGovernor(n or owned_cpus(), governed=not n)
    gov.start()
    return gov
