"""Who generates which missing shard: this process (or a process pool), Ray actors, or MPI ranks.

Each backend runs the whole pipeline (check, plan, generate the missing shards, gather) and returns an
:class:`Outcome` (MPI: on rank 0; other ranks return None). Workers load the chain once and receive only
shard indices; only counts come back — shower arrays go through the parts directory, never through Ray or
MPI. ``ray`` and ``mpi4py`` are imported inside their backend so the local backend needs neither.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from hpc_calo.cpus import torch_threads
from hpc_calo.errors import UserError, abort_world
from hpc_calo.mpi import plan_on_rank0
from hpc_calo.ray_session import ray_session
from hpc_calo.sample.job import Launch, Outcome, Output, SampleRequest, finish, precheck, prepare, progress_bar
from hpc_calo.sample.plan import Plan, Request
from hpc_calo.sample.worker import Worker, load_chain

# ---- local ---------------------------------------------------------------------------------------------------

_POOL_WORKER: Worker | None = None


def _pool_init(plan: Plan, parts_dir: Path) -> None:
    global _POOL_WORKER
    _POOL_WORKER = Worker(plan, parts_dir)


def _pool_run(index: int) -> int:
    assert _POOL_WORKER is not None
    return _POOL_WORKER.run(index)


def run_local(req: Request, output: Output, launch: Launch) -> Outcome:
    """In this process; with ``--workers W > 1`` in W spawned processes, each loading the chain once."""
    precheck(req, output)
    workers = launch.workers or 1
    torch_threads(req.threads)
    chain = load_chain(req)
    plan, parts, todo = prepare(req, output, chain)
    t0 = time.perf_counter()
    with progress_bar(plan, todo, launch.progress) as bar:
        if workers == 1 or len(todo) <= 1:
            worker = Worker(plan, parts.path, chain=chain)
            for i in todo:
                bar.update(worker.run(i))
        elif todo:
            del chain
            with ProcessPoolExecutor(
                min(workers, len(todo)),
                mp_context=get_context("spawn"),
                initializer=_pool_init,
                initargs=(plan, parts.path),
            ) as pool:
                pending = {pool.submit(_pool_run, i) for i in todo}
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        bar.update(fut.result())
    return finish(plan, parts, output, todo, time.perf_counter() - t0, launch.progress)


# ---- Ray -----------------------------------------------------------------------------------------------------


def run_ray(req: Request, output: Output, launch: Launch) -> Outcome:
    """One actor per GPU (``--device cuda``) or per CPU slot; shards are handed out one at a time.

    The driver loads the chain on the CPU only to validate the request; the parts directory must be on a
    filesystem every node sees.
    """
    import ray

    precheck(req, output)
    plan, parts, todo = prepare(req, output, load_chain(req, device="cpu"))
    seconds = 0.0
    if todo:
        with ray_session(launch.address, num_cpus=launch.workers * req.threads if launch.workers else None):
            t0 = time.perf_counter()  # from here: actor start (model loading) + generation, not Ray's own start
            _ray_generate(ray, plan, parts.path, todo, launch)
            seconds = time.perf_counter() - t0
    return finish(plan, parts, output, todo, seconds, launch.progress)


def _ray_generate(ray: Any, plan: Plan, parts_dir: Path, todo: list[int], launch: Launch) -> None:
    gpu = plan.request.device.startswith("cuda")
    res = ray.cluster_resources()
    slots = int(res.get("GPU", 0) if gpu else res.get("CPU", 0) // plan.request.threads)
    n = min(launch.workers or max(1, slots), len(todo))
    if gpu and slots == 0:
        raise UserError("--device cuda: the Ray cluster has no GPUs")
    # No restarts: an actor on a node that died would be restarted only where its resources are free, and its
    # retried shard would wait for that (forever on a cluster that lost the node). Instead the driver hands a
    # dead actor's shard to the surviving actors; parts make a shard written twice harmless (same bytes).
    cpus = 1 if gpu else plan.request.threads
    actor_cls = ray.remote(num_cpus=cpus, num_gpus=1 if gpu else 0, max_restarts=0)(Worker)
    device = "cuda" if gpu else plan.request.device  # Ray pins each actor to its own GPU
    actors = [actor_cls.remote(plan, parts_dir, None, device) for _ in range(n)]
    queue, idle, running = deque(todo), deque(actors), {}
    alive = len(actors)
    try:
        with progress_bar(plan, todo, launch.progress) as bar:
            while queue or running:
                while idle and queue:
                    actor, index = idle.popleft(), queue.popleft()
                    running[actor.run.remote(index)] = (actor, index)
                ready, _ = ray.wait(list(running), num_returns=1)
                for ref in ready:
                    actor, index = running.pop(ref)
                    try:
                        bar.update(ray.get(ref))
                    except ray.exceptions.RayActorError as err:  # its process or its node died
                        alive -= 1
                        if not alive:
                            raise UserError(
                                f"every Ray worker died (last: {_first_line(err)}); finished shards are kept: "
                                "re-run the same command to generate the rest"
                            ) from None
                        queue.appendleft(index)
                        print(f"warning: a Ray worker died ({_first_line(err)}); shard {index} goes to the "
                              f"{alive} remaining", file=sys.stderr, flush=True)
                        continue
                    except ray.exceptions.RayError as err:  # the shard itself failed: retrying would too
                        raise UserError(
                            f"a Ray worker failed ({_first_line(err)}); finished shards are kept: re-run the same "
                            "command to generate the rest"
                        ) from None
                    idle.append(actor)
    finally:
        for actor in actors:
            ray.kill(actor)


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"


# ---- MPI -----------------------------------------------------------------------------------------------------


def run_mpi(req: Request, output: Output, launch: Launch) -> Outcome | None:
    """SPMD under mpiexec/srun: rank 0 plans, every rank generates shards r, r+W, ..., rank 0 gathers.

    Only the plan (no arrays) is broadcast. A rank that crashes aborts the job (MPI cannot continue with a
    dead rank); its finished parts stay and a re-run generates the rest.
    """
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    try:
        return _mpi_body(MPI, comm, req, output, launch)
    except UserError:
        # Before the plan's broadcast (every rank then returns) or in rank 0's gather (the others are done).
        if comm.Get_rank() == 0:
            raise
        return None
    except BaseException as err:
        # Ctrl-C or a bug on one rank: the others would wait in a collective forever.
        abort_world(comm, err)
        raise


def _mpi_body(MPI: Any, comm: Any, req: Request, output: Output, launch: Launch) -> Outcome | None:
    import hpc_calo.generate  # noqa: F401 - every rank pays the torch import while rank 0 plans, not after

    rank, size = comm.Get_rank(), comm.Get_size()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    device = _rank_device(req.device, node.Get_rank())
    chain = None

    def plan_here() -> tuple[Plan, list[int]]:
        nonlocal chain
        precheck(req, output)
        torch_threads(req.threads)
        chain = load_chain(req, device=device)
        plan, _, todo = prepare(req, output, chain)
        return plan, todo

    planned, error = plan_on_rank0(comm, plan_here)
    if planned is None:
        if rank == 0:
            raise UserError(str(error))
        return None
    plan, todo = planned
    parts = output.parts
    mine = todo[rank::size]
    t0 = time.perf_counter()
    bar = progress_bar(plan, todo, launch.progress and rank == 0)
    try:
        if mine:
            worker = Worker(plan, parts.path, chain=chain, device=device)
            for i in mine:
                worker.run(i)
                if rank == 0:
                    _refresh(bar, plan, parts.finished_indices())
    except BaseException as err:
        # The other ranks would wait at the barrier forever: stop the whole job (finished parts stay).
        abort_world(comm, err)
    # Non-blocking barrier polled with sleeps: a blocking one would spin a core that other ranks need.
    barrier = comm.Ibarrier()
    while not barrier.Test():
        if rank == 0:
            _refresh(bar, plan, parts.finished_indices())
        time.sleep(0.1)
    if rank != 0:
        return None
    _refresh(bar, plan, parts.finished_indices())
    bar.close()
    return finish(plan, parts, output, todo, time.perf_counter() - t0, launch.progress)


def _rank_device(device: str, local_rank: int) -> str:
    if not device.startswith("cuda"):
        return device
    import torch

    n = torch.cuda.device_count()
    return f"cuda:{local_rank % n}" if n else device  # load_chain reports a missing GPU


def _refresh(bar: Any, plan: Plan, finished: set[int]) -> None:
    bar.n = sum(plan.shards[i].count for i in finished if i < len(plan.shards))
    bar.refresh()


BACKENDS: dict[str, Callable[[Request, Output, Launch], Outcome | None]] = {
    "local": run_local,
    "ray": run_ray,
    "mpi": run_mpi,
}


def sample(req: SampleRequest) -> Outcome | None:
    """Run a production on its backend; the Outcome (MPI: on rank 0, None on the other ranks)."""
    return BACKENDS[req.launch.backend](req.request, req.output, req.launch)
