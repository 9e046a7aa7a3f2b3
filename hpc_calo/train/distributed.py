"""Data-parallel training on a Ray cluster: Ray Train (V2) ``TorchTrainer`` + DDP around THE training loop.

Each Ray Train worker runs :func:`train_worker`, which builds the job's model and its rank's loaders, wraps the
model in ``DistributedDataParallel`` (NCCL on GPUs, gloo on CPUs) and calls the same ``fit`` as the
single-worker command. Nothing about the optimisation depends on the worker count:

- ``TrainConfig.batch_size`` is the GLOBAL batch; each of N workers takes ``batch_size // N`` of it and DDP
  averages their gradients, so one optimiser step sees the same examples (and, per example, the same loss) as
  one worker with the whole batch. Steps per epoch and the OneCycle schedule therefore stay the same, and the
  learning rate needs no rescaling when N changes.
- each worker reads only its disjoint share of the pair store (``ShardedLoader``), preloaded when the share
  fits the worker's memory (``--memory-gb-per-worker``, also reserved as Ray's ``memory`` resource) and
  streamed otherwise; every rank runs the same number of steps, so the DDP all-reduce and
  ``ray.train.report`` (a barrier) never wait for a rank that ran out of data.

Fault tolerance and resume rest on the run folder, not on Ray's checkpoint store: ``fit`` writes the full
training state (``checkpoint.pt``: weights, optimiser, scheduler, epoch, step in the epoch, every rank's RNG
state) atomically from rank 0, every ``checkpoint_every`` steps and at each epoch end, and resumes from it
when present. A worker group that ``FailureConfig(max_failures)`` restarts after a worker died, and a run
started again by hand with the same command, therefore continue at the saved step, exactly. We do not also
hand Ray a ``ray.train.Checkpoint``: V2 does not need one to restart a worker group, and a copy per report
would double the checkpoint I/O while only covering epoch ends (ours also covers mid-epoch steps). Ray's own
run record (``RunConfig(name, storage_path)``) lives in ``RUN_DIR/ray/``. On a multi-node cluster ``RUN_DIR``
must be on storage every node sees (NFS, Lustre): rank 0 may land on another node after a restart.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from hpc_calo.atomic import atomic_path
from hpc_calo.errors import UserError
from hpc_calo.flags import number, positive_float, positive_int
from hpc_calo.train.config import TrainConfig
from hpc_calo.train.loop import fit

# Share of --memory-gb-per-worker given to the data loaders; the rest is for the interpreter, torch, the
# model, the optimiser and the activations.
LOADER_MEMORY_SHARE = 0.75
WORKERS_DIR = "workers"  # RUN_DIR/flow<k>/workers/rank<r>.json: pid, host, shard and loader mode of each rank
RAY_DIR = "ray"  # RUN_DIR/ray/<run name>: Ray Train's own run record
# Test hook (also handy to rehearse a failure on a real cluster): "RANK:STEP" makes that rank stop before
# global step STEP (once per run folder and RANK:STEP), write its pid to workers/hold-rank<RANK>.pid and wait to
# be killed from outside (kill -9 PID). The run then fails or, with --max-failures >= 1, restarts from its
# last checkpoint.
HOLD_ENV = "HPC_CALO_HOLD_AT_STEP"
HOLD_SECONDS = 300.0


class TrainJob(Protocol):
    """What a worker needs (``hpc_calo.train.__main__.Job`` and the distillation job provide it)."""

    cfg: TrainConfig

    @property
    def out_dir(self) -> Path: ...

    def prepare(self) -> None: ...

    def make_model(self) -> nn.Module: ...

    def make_loaders(self, rank: int = 0, world_size: int = 1, memory_gb: float | None = None) -> tuple[Any, Any]: ...


@dataclass(frozen=True)
class RayConfig:
    """How many Ray Train workers, what each reserves, where the cluster is, how many failures to survive."""

    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    memory_gb_per_worker: float | None = None  # None: no Ray reservation; loaders keep the job's budget
    address: str | None = None  # None: the cluster of RAY_ADDRESS (inside a Ray job) or a new local one
    max_failures: int = 0
    run_name: str | None = None  # None: "<run folder name>-<flow folder name>"
    hold: tuple[int, int] | None = None  # (rank, step): see HOLD_ENV

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise UserError(f"--workers must be at least 1, not {self.workers}")
        if self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise UserError("--gpus-per-worker must be >= 0 and --cpus-per-worker > 0")
        if self.memory_gb_per_worker is not None and self.memory_gb_per_worker <= 0:
            raise UserError(f"--memory-gb-per-worker must be positive, not {self.memory_gb_per_worker}")
        if self.max_failures < -1:
            raise UserError(f"--max-failures must be -1 (no limit) or >= 0, not {self.max_failures}")

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    def resources_per_worker(self) -> dict[str, float]:
        res: dict[str, float] = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            res["GPU"] = self.gpus_per_worker
        if self.memory_gb_per_worker is not None:
            res["memory"] = self.memory_gb_per_worker * 2**30  # Ray counts memory in bytes
        return res


def parse_hold(value: str | None) -> tuple[int, int] | None:
    if not value:
        return None
    try:
        rank, step = (int(v) for v in value.split(":"))
    except ValueError:
        raise UserError(f"{HOLD_ENV}={value!r}: expected RANK:STEP") from None
    return rank, step


# ----------------------------------------------------------------------------------------------- worker


class _Tap:
    """The worker's train loader, passed through; counts global steps to stop at the hold point."""

    def __init__(self, loader: Any, rank: int, hold: tuple[int, int] | None, marker: Path, pid_file: Path) -> None:
        self.loader, self.rank, self.hold, self.marker, self.pid_file = loader, rank, hold, marker, pid_file
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.loader.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.loader):
            step = self.epoch * len(self.loader) + i  # the global step this batch is for (0-based)
            if self.hold is not None and self.hold == (self.rank, step) and not self.marker.exists():
                self.marker.touch()  # once per run folder: the restarted group must run through
                with atomic_path(self.pid_file) as tmp:
                    tmp.write_text(f"{os.getpid()}\n")
                time.sleep(HOLD_SECONDS)
                raise RuntimeError(f"{HOLD_ENV}: rank {self.rank} was not killed within {HOLD_SECONDS:.0f} s")
            yield batch


def _device(ray_cfg: RayConfig) -> torch.device:
    if not ray_cfg.use_gpu:
        return torch.device("cpu")
    import ray.train.torch

    # Ray sets CUDA_VISIBLE_DEVICES per worker and (TorchConfig's context) the current CUDA device.
    return ray.train.torch.get_device()


def _write_worker_record(path: Path, record: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")


def train_worker(config: dict[str, Any]) -> dict[str, Any]:
    """The per-worker function of the TorchTrainer: this rank's share of ``fit``.

    ``config`` holds the picklable job and RayConfig. The process group is already set up by Ray
    (``TorchConfig``); the model is built identically on every rank (seeded) and DDP broadcasts rank 0's
    weights once more at construction, so all replicas start equal.
    """
    import ray.train

    job: TrainJob = config["job"]
    ray_cfg: RayConfig = config["ray"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    out_dir = job.out_dir
    if not out_dir.is_dir():
        # The driver made it (Job.prepare): a worker that cannot see it is on a node without the shared disk.
        raise UserError(f"{out_dir}: run folder not visible on {socket.gethostname()}; put --out on shared storage")

    device = _device(ray_cfg)
    cfg = replace(
        job.cfg,
        device=device.type,
        # Ray sets OMP_NUM_THREADS=1; give torch the CPUs this worker reserved instead.
        num_threads=job.cfg.num_threads or max(1, int(ray_cfg.cpus_per_worker)),
    )
    memory = None if ray_cfg.memory_gb_per_worker is None else ray_cfg.memory_gb_per_worker * LOADER_MEMORY_SHARE
    train, val = job.make_loaders(rank, world, memory)

    workers = out_dir / WORKERS_DIR
    workers.mkdir(exist_ok=True)
    shard = [getattr(train, "start", None), getattr(train, "stop", None)]
    mode = getattr(train, "mode", "?")
    _write_worker_record(workers / f"rank{rank}.json", {
        "rank": rank, "world_size": world, "pid": os.getpid(), "host": socket.gethostname(),
        "device": str(device), "steps_per_epoch": len(train), "loader_mode": mode, "shard": shard,
        "items": getattr(train, "n_items", None), "batch_size": getattr(train, "batch_size", None),
    })
    # One line per rank at start-up (which share, preloaded or streamed); progress lines come from rank 0 only.
    print(f"[{cfg.name}] rank {rank}/{world} on {device}: showers {shard[0]}..{shard[1]} of the train split, "
          f"{len(train)} steps/epoch, batch {getattr(train, 'batch_size', '?')} of global {cfg.batch_size}, "
          f"loader {mode}", file=sys.stderr, flush=True)

    hold = ray_cfg.hold
    tag = "" if hold is None else f"rank{hold[0]}-step{hold[1]}"
    loader = _Tap(train, rank, hold, workers / f"hold-{tag}.done", workers / f"hold-rank{rank}.pid")

    model = job.make_model().to(device=device, dtype=cfg.torch_dtype)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def report(metrics: dict[str, Any]) -> None:
        if device.type == "cuda":
            metrics = {**metrics, "peak_gpu_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30}
        ray.train.report(metrics)

    cpu0 = time.process_time()
    result = fit(ddp, loader, val, cfg, out_dir, rank=rank, world_size=world, report=report)
    result["cpu_s"] = time.process_time() - cpu0  # this process's CPU time in fit (a contention-free cost)
    if device.type == "cuda":
        result["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    result.update(world_size=world, steps_per_epoch=len(train), loader_mode=mode)
    return result


# ----------------------------------------------------------------------------------------------- command line


def add_ray_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that send a training command through Ray Train (shared by train and distill CLIs)."""
    g = p.add_argument_group(
        "distributed training (Ray Train)",
        "Given --workers or --address, the job runs data-parallel on Ray Train workers (DDP: NCCL on GPUs, gloo "
        "on CPUs) with the same loop; --batch-size stays the GLOBAL batch, split evenly over the workers.",
    )
    g.add_argument("--workers", type=positive_int("--workers"), default=None,
                   help="number of Ray Train workers (DDP ranks); without it (and --address) train in this process")
    g.add_argument("--gpus-per-worker", type=number(float, "--gpus-per-worker", 0), default=0.0,
                   help="GPUs reserved per worker; > 0 trains on them with NCCL (default 0: CPU with gloo)")
    g.add_argument("--cpus-per-worker", type=positive_float("--cpus-per-worker"), default=1.0,
                   help="CPUs reserved per worker; also its torch thread count (default 1)")
    g.add_argument("--memory-gb-per-worker", type=positive_float("--memory-gb-per-worker"), default=None,
                   help=f"memory reserved per worker in GB; {LOADER_MEMORY_SHARE * 100:.0f}%% of it is the worker's "
                        "data budget (preload its shard if it fits, else stream). Default: no reservation, "
                        "the loaders use --memory-gb")
    g.add_argument("--address", default=None,
                   help="Ray cluster to attach to (host:port or 'auto'); default: RAY_ADDRESS when set (inside a "
                        "Ray job), else start a local Ray")
    g.add_argument("--max-failures", type=number(int, "--max-failures", -1), default=0,
                   help="worker-group restarts after a worker dies, each resuming from the last checkpoint "
                        "(-1: no limit; default 0)")
    g.add_argument("--run-name", default=None,
                   help="name of Ray's run record under RUN_DIR/ray/ (default: <run folder>-<flow folder>); the "
                        "training state itself resumes from RUN_DIR whatever the name")


def ray_config(args: argparse.Namespace) -> RayConfig | None:
    """The RayConfig the flags ask for, or None for the single-process path."""
    if args.workers is None and args.address is None:
        return None
    return RayConfig(
        workers=args.workers or 1,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
        memory_gb_per_worker=args.memory_gb_per_worker,
        address=args.address,
        max_failures=args.max_failures,
        run_name=args.run_name,
        hold=parse_hold(os.environ.get(HOLD_ENV)),
    )


# ----------------------------------------------------------------------------------------------- driver


def _resolve_address(address: str | None) -> str | None:
    """The cluster to attach to: --address, else "auto" when RAY_ADDRESS is set (inside a Ray job, where Ray
    resolves it), else None: start a local Ray."""
    if address:
        return address
    return "auto" if os.environ.get("RAY_ADDRESS") else None


class _RaySession:
    """Attach to a cluster, or start a local one in a short temp dir (AF_UNIX paths are limited to 107 bytes)."""

    def __init__(self, ray_cfg: RayConfig) -> None:
        self.ray_cfg = ray_cfg
        self.started = False
        self.temp_dir: str | None = None  # set when this session started a local Ray

    @property
    def local(self) -> bool:
        return self.temp_dir is not None

    def __enter__(self) -> _RaySession:
        import ray

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Ray Train V2 otherwise echoes every print of the workers a second time through its logger.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
        if ray.is_initialized():  # the caller (a notebook, a test, launch.ray_job) owns the connection
            return self
        address = _resolve_address(self.ray_cfg.address)
        if address is not None:
            try:
                ray.init(address=address, log_to_driver=True)
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise UserError(f"cannot attach to the Ray cluster at {address!r}: {err}") from None
        else:
            self.temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
            need_cpus = self.ray_cfg.workers * self.ray_cfg.cpus_per_worker
            ray.init(num_cpus=max(1, int(-(-need_cpus // 1))), include_dashboard=False, _temp_dir=self.temp_dir,
                     log_to_driver=True)
        self.started = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self.started:
            import ray

            ray.shutdown()
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def _check_resources(ray_cfg: RayConfig, fixed: bool) -> None:
    """Refuse a request a cluster of ``fixed`` size can never place (Ray would wait for it forever).

    An attached cluster may autoscale, so there a shortfall is only announced.
    """
    import ray

    total = ray.cluster_resources()
    for key, per in ray_cfg.resources_per_worker().items():
        have = float(total.get(key, 0.0))
        if per * ray_cfg.workers > have + 1e-9:
            unit, scale = ("GB", 2**30) if key == "memory" else ("", 1)
            msg = (f"Ray cluster has {have / scale:g}{unit} {key} in all, but {ray_cfg.workers} workers x "
                   f"{per / scale:g}{unit} were requested")
            if fixed:
                raise UserError(f"{msg}; lower --workers or the per-worker resources")
            print(f"warning: {msg}; waiting for the cluster to grow", file=sys.stderr, flush=True)


def _failure_message(err: BaseException) -> str:
    """One line for a failed run: the first worker's own error when it is a UserError, else its last line."""
    failures = getattr(err, "worker_failures", None) or {}
    for rank in sorted(failures):
        e: BaseException | None = failures[rank]
        while e is not None:
            if isinstance(e, UserError):
                return str(e)
            e = getattr(e, "cause", None) or e.__cause__
        lines = [ln.strip() for ln in str(failures[rank]).splitlines() if ln.strip()]
        return f"rank {rank}: {lines[-1] if lines else type(failures[rank]).__name__}"
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


def run_name(job: TrainJob, ray_cfg: RayConfig) -> str:
    return ray_cfg.run_name or f"{job.out_dir.parent.name}-{job.out_dir.name}"


def run_ray(job: TrainJob, ray_cfg: RayConfig) -> dict[str, Any]:
    """Train ``job`` on ``ray_cfg.workers`` Ray Train workers; returns rank 0's ``fit`` summary.

    Raises UserError (one line) when the run fails for good: a worker error after ``max_failures`` restarts,
    or a resource request the cluster cannot satisfy. The run folder keeps the last checkpoint either way,
    and the same command resumes from it.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = job.cfg
    cfg.per_worker_batch(ray_cfg.workers)  # a global batch that does not divide fails here, not in N workers
    if cfg.device == "cuda" and not ray_cfg.use_gpu:
        raise UserError("--device cuda under Ray needs --gpus-per-worker > 0 (Ray assigns the GPUs)")
    job.prepare()
    storage = (job.out_dir.parent / RAY_DIR).resolve()
    with _RaySession(ray_cfg) as session:
        _check_resources(ray_cfg, fixed=session.local)
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"job": job, "ray": ray_cfg},
            torch_config=TorchConfig(backend="nccl" if ray_cfg.use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(
                num_workers=ray_cfg.workers, use_gpu=ray_cfg.use_gpu,
                resources_per_worker=ray_cfg.resources_per_worker(),
            ),
            run_config=ray.train.RunConfig(
                name=run_name(job, ray_cfg), storage_path=str(storage),
                failure_config=ray.train.FailureConfig(max_failures=ray_cfg.max_failures),
            ),
        )
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as err:
            raise UserError(
                f"{job.out_dir}: distributed training failed ({_failure_message(err)}); the last checkpoint "
                f"is kept, run the same command again to resume"
            ) from None
    summary = dict(result.return_value or {})
    summary.update(workers=ray_cfg.workers, run_name=run_name(job, ray_cfg), ray_path=str(result.path))
    return summary
