"""The one way hpc-calo connects to Ray: attach to a cluster, or start a local one for the duration."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hpc_calo.errors import UserError


@contextmanager
def ray_session(address: str | None, num_cpus: int | None = None) -> Iterator[bool]:
    """Connect to Ray for the body of the ``with``; yields True when the cluster was started here.

    A connection the caller already holds (a notebook, a test, ``launch.ray_job``) is used as it is and left
    open. Otherwise ``address`` (``host:port`` or ``auto``) is attached to; without one, ``RAY_ADDRESS`` when it
    is set (inside ``ray job submit``), else a local Ray of ``num_cpus`` CPUs is started in a short temporary
    directory (Ray's AF_UNIX socket paths must stay under 107 bytes) and stopped at the end. A cluster started
    here has a fixed size, which callers use to refuse requests it can never place.
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
        ray.init(include_dashboard=False, _temp_dir=temp_dir, log_to_driver=True, **kw)
    try:
        yield temp_dir is not None
    finally:
        ray.shutdown()
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
