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
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import replace
from itertools import islice
from multiprocessing import get_context
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_any
from pathlib import Path
from typing import Any, TypeVar

from hpc_calo.cpus import torch_threads
from hpc_calo.errors import UserError, abort_world
from hpc_calo.mpi import mpi_module, plan_on_rank0
from hpc_calo.ray_session import ray_session
from hpc_calo.sample.job import (
    Launch,
    Outcome,
    Output,
    SampleRequest,
    Startup,
    finish,
    precheck,
    prepare,
    progress_bar,
)
from hpc_calo.sample.parts import PartsDir
from hpc_calo.sample.plan import Plan, Request, ShardSet
from hpc_calo.sample.worker import Ready, Worker, load_chain

W = TypeVar("W")
H = TypeVar("H", bound=Hashable)
RERUN = "finished shards are kept: re-run the same command to generate the rest"


def _plan(req: Request, output: Output, device: str | None = None) -> tuple[Any, Plan, PartsDir, ShardSet, Startup]:
    """Check, load the chain, plan: what the planning process does before any worker starts."""
    precheck(req, output)
    torch_threads(req.threads)
    t0 = time.perf_counter()
    chain = load_chain(req, device)
    t1 = time.perf_counter()
    plan, parts, todo = prepare(req, output, chain)
    return chain, plan, parts, todo, Startup(load=t1 - t0, plan=time.perf_counter() - t1)


def _started(startup: Startup, since: float, ready: Sequence[Ready]) -> Startup:
    return replace(startup, workers=time.perf_counter() - since, worker_load=max(r.load_seconds for r in ready),
                   torch_threads=max(r.torch_threads for r in ready))


def _feed(workers: Sequence[W], shards: Iterator[int], submit: Callable[[W, int], H],
          collect: Callable[[list[H]], Sequence[tuple[H, int | None]]], bar: Any) -> None:
    """Keep one shard in flight on every worker until none is left: a fast worker takes more shards. A worker
    that is lost (``collect`` gives None for its count) takes no more; its shard goes to the next free one."""
    running: dict[H, tuple[W, int]] = {}
    retry: deque[int] = deque()
    idle: list[W] = []

    def give(worker: W) -> None:
        index = retry.popleft() if retry else next(shards, None)
        if index is None:
            idle.append(worker)
        else:
            running[submit(worker, index)] = (worker, index)

    for worker in workers:
        give(worker)
    while running:
        for handle, count in collect(list(running)):
            worker, index = running.pop(handle)
            if count is None:
                retry.append(index)
                if idle:
                    give(idle.pop())
            else:
                bar.update(count)
                give(worker)
    if retry:
        raise UserError(f"every worker was lost; {RERUN}")


# ---- local ---------------------------------------------------------------------------------------------------


def _serve(conn: Connection, plan: Plan, parts_dir: Path) -> None:
    """A local worker process: load the chain, report ready, then turn shard indices into parts until None."""
    worker = Worker(plan, parts_dir)
    conn.send(worker.ready())
    while (index := conn.recv()) is not None:
        conn.send(worker.run(index))


def _send(conn: Connection, index: int) -> Connection:
    conn.send(index)
    return conn


def _recv(conn: Connection) -> Any:
    try:
        return conn.recv()
    except EOFError:
        raise UserError(f"a local worker process died (see its error above); {RERUN}") from None


@contextmanager
def _processes(plan: Plan, parts_dir: Path, n: int) -> Iterator[tuple[list[Connection], list[Ready]]]:
    """``n`` spawned worker processes, each holding its chain; stopped on leaving (killed on an error)."""
    ctx = get_context("spawn")
    procs, conns = [], []
    try:
        for _ in range(n):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(theirs, plan, parts_dir), daemon=True)
            proc.start()
            theirs.close()
            procs.append(proc)
            conns.append(ours)
        yield conns, [_recv(c) for c in conns]
        for c in conns:
            c.send(None)
        for proc in procs:
            proc.join()
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()


def run_local(req: Request, output: Output, launch: Launch) -> Outcome:
    """In this process; with ``--workers W > 1`` in W spawned processes, each loading the chain once."""
    chain, plan, parts, todo, startup = _plan(req, output)
    workers = min(launch.workers or 1, len(todo))
    with progress_bar(plan, todo, launch.progress) as bar:
        t0 = time.perf_counter()
        if workers <= 1:
            worker = Worker(plan, parts.path, chain=chain)
            startup = _started(startup, t0, [worker.ready()])
            t0 = time.perf_counter()
            for i in todo:
                bar.update(worker.run(i))
        else:
            del chain
            with _processes(plan, parts.path, workers) as (conns, ready):
                startup = _started(startup, t0, ready)
                t0 = time.perf_counter()
                _feed(conns, iter(todo), _send, lambda cs: [(c, _recv(c)) for c in wait_any(cs)], bar)
    return finish(plan, parts, output, todo, time.perf_counter() - t0, startup, launch.progress)


# ---- Ray -----------------------------------------------------------------------------------------------------


def run_ray(req: Request, output: Output, launch: Launch) -> Outcome:
    """One actor per GPU (``--device cuda``) or per CPU slot; shards are handed out one at a time.

    The driver loads the chain on the CPU only to validate the request; the parts directory must be on a
    filesystem every node sees.
    """
    import ray

    _, plan, parts, todo, startup = _plan(req, output, device="cpu")
    seconds = 0.0
    if todo:
        t0 = time.perf_counter()  # workers' start: Ray's own, the actors', their chains
        with ray_session(launch.address, num_cpus=launch.workers * req.threads if launch.workers else None):
            actors = _ray_actors(ray, plan, parts.path, len(todo), launch)
            try:
                startup = _started(startup, t0, _ray_get(ray, [a.ready.remote() for a in actors]))
                t0 = time.perf_counter()
                with progress_bar(plan, todo, launch.progress) as bar:
                    _feed(actors, iter(todo), lambda a, i: a.run.remote(i),
                          lambda refs: _ray_collect(ray, refs), bar)
                seconds = time.perf_counter() - t0
            finally:
                for actor in actors:
                    ray.kill(actor)
    return finish(plan, parts, output, todo, seconds, startup, launch.progress)


def _ray_actors(ray: Any, plan: Plan, parts_dir: Path, shards: int, launch: Launch) -> list[Any]:
    gpu = plan.request.device.startswith("cuda")
    res = ray.cluster_resources()
    slots = int(res.get("GPU", 0) if gpu else res.get("CPU", 0) // plan.request.threads)
    if gpu and slots == 0:
        raise UserError("--device cuda: the Ray cluster has no GPUs")
    # Ray gives each CPU actor OMP_NUM_THREADS = num_cpus, and the Worker sets torch's threads to the same.
    cpus = 1 if gpu else plan.request.threads
    # No restarts: an actor on a node that died would be restarted only where its resources are free, and its
    # retried shard would wait for that (forever on a cluster that lost the node). Instead ``_feed`` hands a dead
    # actor's shard to the surviving actors; parts make a shard written twice harmless (same bytes).
    actor_cls = ray.remote(num_cpus=cpus, num_gpus=1 if gpu else 0, max_restarts=0)(Worker)
    device = "cuda" if gpu else plan.request.device  # Ray pins each actor to its own GPU
    n = min(launch.workers or max(1, slots), shards)
    return [actor_cls.remote(plan, parts_dir, None, device) for _ in range(n)]


def _ray_get(ray: Any, ref: Any) -> Any:
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as err:  # the shard itself failed: retrying it would fail too
        raise UserError(f"a Ray worker failed ({_first_line(err)}); {RERUN}") from None


def _ray_collect(ray: Any, refs: list[Any]) -> list[tuple[Any, int | None]]:
    """Finished shards' counts; None for a shard whose actor died (its process or its node)."""
    out: list[tuple[Any, int | None]] = []
    for ref in ray.wait(refs, num_returns=1)[0]:
        try:
            out.append((ref, ray.get(ref)))
        except ray.exceptions.RayActorError as err:
            print(f"warning: a Ray worker died ({_first_line(err)}); its shard goes to the remaining workers",
                  file=sys.stderr, flush=True)
            out.append((ref, None))
        except ray.exceptions.RayError as err:
            raise UserError(f"a Ray worker failed ({_first_line(err)}); {RERUN}") from None
    return out


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"


# ---- MPI -----------------------------------------------------------------------------------------------------


def run_mpi(req: Request, output: Output, launch: Launch) -> Outcome | None:
    """SPMD under mpiexec/srun: rank 0 plans, every rank generates shards r, r+W, ..., rank 0 gathers.

    Only the plan (no arrays) is broadcast. A rank that crashes aborts the job (MPI cannot continue with a
    dead rank); its finished parts stay and a re-run generates the rest.
    """
    MPI = mpi_module()
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
    rank, size = comm.Get_rank(), comm.Get_size()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    device = _rank_device(req.device, node.Get_rank())
    t0 = time.perf_counter()
    chain = None
    if rank != 0:
        # The other ranks load the chain while rank 0 plans; a bad request is rank 0's to report, after its plan.
        with suppress(UserError):
            chain = load_chain(req, device=device)
    load_seconds = time.perf_counter() - t0

    def plan_here() -> tuple[Plan, ShardSet, Startup]:
        nonlocal chain
        chain, plan, _, todo, startup = _plan(req, output, device)
        return plan, todo, startup

    planned, error = plan_on_rank0(comm, plan_here)
    if planned is None:
        if rank == 0:
            raise UserError(str(error))
        return None
    plan, todo, startup = planned
    parts = output.parts
    t0 = time.perf_counter()
    try:
        worker = Worker(plan, parts.path, chain=chain, device=device)
    except BaseException as err:
        abort_world(comm, err)  # the others would wait in the gather below forever
    ready = worker.ready()
    everyone = comm.gather(replace(ready, load_seconds=ready.load_seconds + load_seconds), root=0)
    if rank == 0:
        startup = _started(startup, t0, everyone)
    t0 = time.perf_counter()
    bar = progress_bar(plan, todo, launch.progress and rank == 0)
    last_refresh = 0.0

    def refresh() -> None:
        nonlocal last_refresh
        if bar.disable or time.perf_counter() - last_refresh < 1:
            return  # one directory scan a second at most: it costs O(shards)
        bar.n = min(plan.n, parts.recorded_count() * plan.shards.size)
        bar.refresh()
        last_refresh = time.perf_counter()

    try:
        for i in islice(iter(todo), rank, None, size):
            worker.run(i)
            if rank == 0:
                refresh()
    except BaseException as err:
        # The other ranks would wait at the barrier forever: stop the whole job (finished parts stay).
        abort_world(comm, err)
    _barrier(comm, refresh if rank == 0 else None)
    if rank != 0:
        # Wait out rank 0's gather asleep here: ranks that went on to exit would spin in MPI_Finalize on the
        # cores the gather needs.
        _barrier(comm)
        return None
    seconds = time.perf_counter() - t0
    bar.n = plan.n
    bar.close()
    try:
        return finish(plan, parts, output, todo, seconds, startup, launch.progress)
    finally:
        _barrier(comm)


def _barrier(comm: Any, tick: Callable[[], None] | None = None) -> None:
    """A barrier polled with sleeps: a blocking one would spin a core that other ranks need."""
    barrier = comm.Ibarrier()
    while not barrier.Test():
        if tick is not None:
            tick()
        time.sleep(0.02)


def _rank_device(device: str, local_rank: int) -> str:
    if not device.startswith("cuda"):
        return device
    import torch

    n = torch.cuda.device_count()
    return f"cuda:{local_rank % n}" if n else device  # load_chain reports a missing GPU


BACKENDS: dict[str, Callable[[Request, Output, Launch], Outcome | None]] = {
    "local": run_local,
    "ray": run_ray,
    "mpi": run_mpi,
}


def sample(req: SampleRequest) -> Outcome | None:
    """Run a production on its backend; the Outcome (MPI: on rank 0, None on the other ranks)."""
    return BACKENDS[req.launch.backend](req.request, req.output, req.launch)
