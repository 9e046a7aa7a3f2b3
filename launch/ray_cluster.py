"""A Ray cluster inside a SLURM allocation: head on the first task's node, one worker per other node.

The training stage runs in every task of its job. Task 0 starts the head, waits for every node to join and
runs the trainer against it; the other tasks start a blocking Ray worker and return once task 0 marks the
work done in the (shared) log folder. Temp dirs are short on purpose: Ray's AF_UNIX socket paths must stay
under 107 bytes.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hpc_calo.ray_session import NICENESS_ENV, WORKER_NICENESS

log = logging.getLogger(__name__)


def _ray_bin() -> str:
    cand = Path(sys.executable).parent / "ray"
    return str(cand) if cand.exists() else (shutil.which("ray") or "ray")


def _port(job_id: str) -> int:
    # Distinct jobs sharing a node must not collide on the GCS port.
    digits = "".join(c for c in job_id if c.isdigit()) or "0"
    return 20000 + int(digits) % 20000


@contextmanager
def ray_in_allocation(
    hostnames: list[str], rank: int, job_id: str, done_dir: Path, cpus: int, gpus: int
) -> Iterator[str | None]:
    """Yield the head address on task 0; on other tasks serve as a worker and yield None when done."""
    port = _port(job_id)
    temp = f"/tmp/ray-{job_id}"
    head = f"{hostnames[0]}:{port}"
    done = done_dir / f"ray-{job_id}.done"
    env = {NICENESS_ENV: WORKER_NICENESS, **os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    common = [f"--num-cpus={cpus}", f"--num-gpus={gpus}", "--disable-usage-stats"]
    if rank == 0:
        done.unlink(missing_ok=True)
        # --block keeps the head a child of this task: SLURM (which may track jobs without cgroups) and this
        # function can stop exactly this cluster, where `ray stop` would stop every Ray on the node.
        head_proc = subprocess.Popen([_ray_bin(), "start", "--head", "--block", f"--port={port}",
                                      f"--temp-dir={temp}", "--include-dashboard=false", *common], env=env)
        try:
            _wait_for_nodes(head, len(hostnames))
            yield head
        finally:
            done_dir.mkdir(parents=True, exist_ok=True)
            done.touch()
            head_proc.terminate()
            head_proc.wait(timeout=60)
    else:
        worker = subprocess.Popen([_ray_bin(), "start", f"--address={head}", "--block", *common], env=env)
        try:
            while not done.exists() and worker.poll() is None:
                time.sleep(2)
        finally:
            worker.terminate()
            worker.wait(timeout=60)
        yield None


def _wait_for_nodes(address: str, n: int, timeout_s: float = 300) -> None:
    import ray

    deadline = time.monotonic() + timeout_s
    while True:  # the head started in the background: retry until its GCS answers
        try:
            ray.init(address=address, logging_level=logging.WARNING)
            break
        except ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)
    try:
        while sum(node["Alive"] for node in ray.nodes()) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {sum(x['Alive'] for x in ray.nodes())} of {n} Ray nodes joined")
            time.sleep(1)
    finally:
        ray.shutdown()
