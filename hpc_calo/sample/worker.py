"""One generation worker: loads the chain once, then turns shard indices into part files.

The same class runs in the local process, in a process pool, inside a Ray actor and on every MPI rank, so
the bits of a shard never depend on the backend.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpc_calo import rundir
from hpc_calo.cpus import torch_threads
from hpc_calo.digest import files_digest
from hpc_calo.errors import UserError
from hpc_calo.ray_session import reclaim_cpu
from hpc_calo.sample.parts import PartsDir
from hpc_calo.sample.plan import Plan, Request


def run_digest(run_dir: Path) -> str:
    """The digest of the model files whose bytes decide the output."""
    return files_digest(rundir.weight_files(run_dir))


def load_chain(req: Request, device: str | None = None) -> Any:
    import torch

    from hpc_calo.generate import Chain
    from hpc_calo.precision import resolve

    device = device or req.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {req.device}: CUDA is not available on {_host()}")
    rundir.require_run(req.run_dir)
    dtype, matmul_dtype = resolve(req.dtype)
    return Chain.load(req.run_dir, device=device, dtype=dtype, students=req.students, matmul_dtype=matmul_dtype,
                      renormalise=req.renormalise, compile=req.compile)


def _host() -> str:
    import socket

    return socket.gethostname()


@dataclass(frozen=True)
class Ready:
    """What a started worker reports before its first shard."""

    load_seconds: float  # its own chain load (0: it was handed a loaded chain)
    torch_threads: int  # the CPUs it uses: batches side by side, and torch threads within (cpus.batch_lanes)


class Worker:
    """Holds one loaded chain; ``run(i)`` generates shard ``i`` and records its part. Returns the count."""

    def __init__(self, plan: Plan, parts_dir: Path, chain: Any = None, device: str | None = None) -> None:
        reclaim_cpu()  # a Ray actor runs its methods in this thread: the shards' compute
        self.plan = plan
        self.parts = PartsDir(parts_dir)
        self.threads = torch_threads(plan.request.threads)
        t0 = time.perf_counter()
        self.chain = chain if chain is not None else load_chain(plan.request, device)
        self._ready = Ready(time.perf_counter() - t0 if chain is None else 0.0, self.threads)

    def ready(self) -> Ready:
        return self._ready

    def run(self, index: int) -> int:
        shard = self.plan.shards[index]
        energies = self.plan.energies(shard)
        req = self.plan.request
        # Batch by batch straight into the part file: worker memory follows --batch-size, not the shard size.
        batches = (s for _, s in self.chain.sample_iter(energies, req.seed, req.batch_size, start=shard.start,
                                                        threads=self.threads))
        self.parts.write(self.plan, shard, energies, batches)
        return shard.count
