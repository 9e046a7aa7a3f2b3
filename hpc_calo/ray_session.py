"""The one way hpc-calo connects to Ray: attach to a cluster, or start a local one for the duration."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hpc_calo.errors import UserError

# Ray starts its workers at niceness 15, below its own daemons and helper actors (GCS, raylet, the Train controller).
# hpc-calo reserves a CPU for every worker, so the workers fill the CPUs and the daemons only wake up on them; at
# equal niceness two DDP workers on two cores trained 5 % faster (BENCHMARKS, "Distributed training").
NICENESS_ENV = "RAY_worker_niceness"
WORKER_NICENESS = "0"
CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
BATCH_ENV = "HPC_CALO_RAY_BATCH"  # "0": leave Ray's scheduling as Ray does (normal for every thread)


_lowered = False  # in a worker process: setup_worker put its main thread under SCHED_BATCH


def _lower() -> bool:
    """Put the calling thread, and the threads it starts later, under SCHED_BATCH; True when it did. Not with
    ``HPC_CALO_RAY_BATCH=0``, off Linux, or in a sandbox that forbids the call (Ray then runs as it starts)."""
    if not hasattr(os, "SCHED_BATCH") or os.environ.get(BATCH_ENV) == "0":
        return False
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))  # pid 0: the calling thread
    except OSError:
        return False
    return True


@contextmanager
def _daemons_as_batch() -> Iterator[None]:
    """Start the local cluster's daemons under SCHED_BATCH: they inherit the policy of the thread that starts them.

    The GCS, the raylet and its agents (and every worker the raylet forks) wake hundreds of times a second between
    them, each wake-up a preemption of a rank on cores the ranks fill. The calling thread returns to its own
    policy at the end; the threads ``ray.init`` starts in this process keep SCHED_BATCH, as they only wait.
    """
    before = (os.sched_getscheduler(0), os.sched_getparam(0)) if hasattr(os, "sched_getscheduler") else None
    lowered = _lower()
    try:
        yield
    finally:
        if lowered and before is not None:
            os.sched_setscheduler(0, *before)


def setup_worker() -> None:
    """Start-up hook of the worker processes of a cluster started here (``worker_process_setup_hook``).

    Ray Train's placement-group cleaner asks the State API, which lives in the dashboard, whether the Train
    controller is still alive, and logs a warning every time it cannot: every few seconds of every run on a
    cluster without a dashboard. It matters only when a controller dies and its cluster lives on; a cluster
    started here ends with the command. The hook keeps it quiet.

    Every Ray worker process also wakes every 10 ms (the core worker's signal check, fixed in Ray), and Ray Train
    adds half a dozen helper actors that do little else. On cores the ranks fill, each wake-up preempts a rank,
    and one late rank holds up the others at every all-reduce. The hook puts the main thread, where that check and
    the actors' code run, and the threads it starts later under SCHED_BATCH, which never preempts on waking (a
    tick or an idle CPU serves it); the compute of hpc-calo's ranks and sampler actors returns to normal
    scheduling with :func:`reclaim_cpu`. ``HPC_CALO_RAY_BATCH=0`` in the environment of the command that starts
    the cluster leaves every thread under normal scheduling.
    """
    global _lowered
    logging.getLogger(CLEANER_LOGGER).setLevel(logging.ERROR)
    _lowered = _lower()


def reclaim_cpu() -> None:
    """Normal scheduling for the calling thread (and the threads it starts) where :func:`setup_worker` lowered
    its process; elsewhere nothing. A thread may always return from SCHED_BATCH to SCHED_OTHER at its niceness."""
    if _lowered:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def thread_policy() -> str:
    """The calling thread's scheduling policy, as a worker records it."""
    if not hasattr(os, "sched_getscheduler"):
        return "unknown"
    policy = os.sched_getscheduler(0)
    names = {getattr(os, f"SCHED_{n.upper()}", None): n for n in ("other", "batch", "idle", "fifo", "rr")}
    return names.get(policy, str(policy))


@contextmanager
def ray_session(address: str | None, num_cpus: int | None = None) -> Iterator[bool]:
    """Connect to Ray for the body of the ``with``; yields True when the cluster was started here.

    A connection the caller already holds (a notebook, a test, ``launch.ray_job``) is used as it is and left
    open. Otherwise ``address`` (``host:port`` or ``auto``) is attached to; without one, ``RAY_ADDRESS`` when it
    is set (inside ``ray job submit``), else a local Ray of ``num_cpus`` CPUs is started in a short temporary
    directory (Ray's AF_UNIX socket paths must stay under 107 bytes) and stopped at the end. A cluster started
    here has a fixed size, which callers use to refuse requests it can never place, runs its workers at
    ``WORKER_NICENESS`` unless ``RAY_worker_niceness`` says otherwise, starts each with :func:`setup_worker`, and
    runs its daemons under SCHED_BATCH (:func:`_daemons_as_batch`).
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray Train V2 otherwise echoes every print of the workers a second time through its logger.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if ray.is_initialized():
        yield False
        return
    address = address or ("auto" if os.environ.get("RAY_ADDRESS") else None)
    temp_dir = None
    if address is not None:
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise UserError(f"cannot attach to the Ray cluster at {address!r}: {err}") from None
    else:
        temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
        kw: dict[str, Any] = {} if num_cpus is None else {"num_cpus": num_cpus}
        # The raylet reads its settings from the environment it inherits when ray.init starts it.
        before = os.environ.get(NICENESS_ENV)
        os.environ.setdefault(NICENESS_ENV, WORKER_NICENESS)
        try:
            with _daemons_as_batch():
                ray.init(include_dashboard=False, _temp_dir=temp_dir, log_to_driver=True,
                         runtime_env={"worker_process_setup_hook": setup_worker}, **kw)
        finally:
            if before is None:
                os.environ.pop(NICENESS_ENV, None)
    try:
        yield temp_dir is not None
    finally:
        ray.shutdown()
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
