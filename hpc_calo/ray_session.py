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


def quiet_cleaner() -> None:
    """Start-up hook of the worker processes of a cluster started here (``worker_process_setup_hook``).

    Ray Train's placement-group cleaner asks the State API, which lives in the dashboard, whether the Train
    controller is still alive, and logs a warning every time it cannot: every few seconds of every run on a
    cluster without a dashboard. It matters only when a controller dies and its cluster lives on; a cluster
    started here ends with the command.
    """
    logging.getLogger(CLEANER_LOGGER).setLevel(logging.ERROR)


@contextmanager
def ray_session(address: str | None, num_cpus: int | None = None) -> Iterator[bool]:
    """Connect to Ray for the body of the ``with``; yields True when the cluster was started here.

    A connection the caller already holds (a notebook, a test, ``launch.ray_job``) is used as it is and left
    open. Otherwise ``address`` (``host:port`` or ``auto``) is attached to; without one, ``RAY_ADDRESS`` when it
    is set (inside ``ray job submit``), else a local Ray of ``num_cpus`` CPUs is started in a short temporary
    directory (Ray's AF_UNIX socket paths must stay under 107 bytes) and stopped at the end. A cluster started
    here has a fixed size, which callers use to refuse requests it can never place, and runs its workers at
    ``WORKER_NICENESS`` unless ``RAY_worker_niceness`` says otherwise.
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
            ray.init(include_dashboard=False, _temp_dir=temp_dir, log_to_driver=True,
                     runtime_env={"worker_process_setup_hook": quiet_cleaner}, **kw)
        finally:
            if before is None:
                os.environ.pop(NICENESS_ENV, None)
    try:
        yield temp_dir is not None
    finally:
        ray.shutdown()
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
