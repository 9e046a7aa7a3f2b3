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

import functools
import os
import resource
import socket
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from hpc_calo import rundir
from hpc_calo.errors import UserError
from hpc_calo.ray_session import ray_session, reclaim_cpu, thread_policy
from hpc_calo.train.config import TrainConfig
from hpc_calo.train.loop import finished, fit

# Share of --memory-gb-per-worker given to the data loaders; the rest is for the interpreter, torch, the
# model, the optimiser and the activations.
LOADER_MEMORY_SHARE = 0.75


class TrainJob(Protocol):
    """What a worker needs (``hpc_calo.train.job.Job`` and the distillation job provide it)."""

    cfg: TrainConfig

    @property
    def out_dir(self) -> Path: ...

    def prepare(self) -> None: ...

    def make_model(self) -> nn.Module: ...

    def make_loaders(self, rank: int = 0, world_size: int = 1, memory_gb: float | None = None,
                     pin: bool | None = None) -> tuple[Any, Any]: ...


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
    # step_hook(rank, global_step) runs on every worker before each optimisation step: a place to observe
    # a run, or (the tests do) to stop a chosen rank at a chosen step and kill it. It must pickle.
    step_hook: Callable[[int, int], None] | None = None

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


# ----------------------------------------------------------------------------------------------- worker


def _device(ray_cfg: RayConfig) -> torch.device:
    if not ray_cfg.use_gpu:
        return torch.device("cpu")
    import ray.train.torch

    # Ray sets CUDA_VISIBLE_DEVICES per worker and (TorchConfig's context) the current CUDA device.
    return ray.train.torch.get_device()


def train_worker(config: dict[str, Any]) -> dict[str, Any]:
    """The per-worker function of the TorchTrainer: this rank's :func:`fit_shard`.

    ``config`` holds the picklable job and RayConfig. The process group is already set up by Ray
    (``TorchConfig``).
    """
    import ray.train

    job: TrainJob = config["job"]
    ray_cfg: RayConfig = config["ray"]
    reclaim_cpu()  # this thread is the rank's compute; Ray's plumbing in this process stays SCHED_BATCH
    ctx = ray.train.get_context()
    device = _device(ray_cfg)

    def report(metrics: dict[str, Any]) -> None:
        if device.type == "cuda":
            metrics = {**metrics, "peak_gpu_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30}
        ray.train.report(metrics)

    return fit_shard(job, ray_cfg, ctx.get_world_rank(), ctx.get_world_size(), device, report)


def fit_shard(job: TrainJob, ray_cfg: RayConfig, rank: int, world: int, device: torch.device,
              report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Rank ``rank``'s share of ``fit`` in an initialised process group of ``world`` ranks.

    The model is built identically on every rank (seeded) and DDP broadcasts rank 0's weights once more at
    construction, so all replicas start equal. Returns ``fit``'s summary with this process's costs.
    """
    out_dir = job.out_dir
    if not out_dir.is_dir():
        # The driver made it (Job.prepare): a worker that cannot see it is on a node without the shared disk.
        raise UserError(f"{out_dir}: run folder not visible on {socket.gethostname()}; put --out on shared storage")

    cfg = replace(
        job.cfg,
        device=device.type,
        # Ray sets OMP_NUM_THREADS=1; give torch the CPUs this worker reserved instead.
        num_threads=job.cfg.num_threads or max(1, int(ray_cfg.cpus_per_worker)),
    )
    memory = None if ray_cfg.memory_gb_per_worker is None else ray_cfg.memory_gb_per_worker * LOADER_MEMORY_SHARE
    train, val = job.make_loaders(rank, world, memory, pin=device.type == "cuda")

    shard = [getattr(train, "start", None), getattr(train, "stop", None)]
    mode = getattr(train, "mode", "?")
    rundir.write_json(rundir.worker_record(out_dir, rank), {
        "rank": rank, "world_size": world, "pid": os.getpid(), "host": socket.gethostname(),
        "device": str(device), "steps_per_epoch": len(train), "loader_mode": mode, "shard": shard,
        "items": getattr(train, "n_items", None), "batch_size": getattr(train, "batch_size", None),
        "sched_policy": thread_policy(), "niceness": os.getpriority(os.PRIO_PROCESS, 0),
    })
    # One line per rank at start-up (which share, preloaded or streamed); progress lines come from rank 0 only.
    print(f"[{cfg.name}] rank {rank}/{world} on {device}: showers {shard[0]}..{shard[1]} of the train split, "
          f"{len(train)} steps/epoch, batch {getattr(train, 'batch_size', '?')} of global {cfg.batch_size}, "
          f"loader {mode}", file=sys.stderr, flush=True)

    model = job.make_model().to(device=device, dtype=cfg.torch_dtype)
    # The flows' buffers are constant (MADE masks, permutations: as many numbers as the weights), so DDP need not
    # broadcast them from rank 0 before every forward pass; the gradients all-reduce straight from their buckets.
    with warnings.catch_warnings():
        # torch 2.13 renames the flag (forward_sync_buffers); torch before 2.13 knows only this name.
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                  broadcast_buffers=False, gradient_as_bucket_view=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    cpu0, preempted0 = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw
    hook = ray_cfg.step_hook
    before_step = None if hook is None else functools.partial(hook, rank)
    result = fit(ddp, train, val, cfg, out_dir, rank=rank, world_size=world, report=report, before_step=before_step)
    result["cpu_s"] = time.process_time() - cpu0  # this process's CPU time in fit (a contention-free cost)
    # Involuntary context switches in fit: how often something else took this process's CPU.
    result["preemptions"] = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw - preempted0
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # this worker's (Linux: KB)
    if device.type == "cuda":
        result["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    result.update(world_size=world, steps_per_epoch=len(train), loader_mode=mode)
    return result


# ----------------------------------------------------------------------------------------------- driver


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
    done = finished(cfg, job.out_dir)
    if done is not None:
        return {**done, "workers": ray_cfg.workers, "run_name": run_name(job, ray_cfg), "ray_path": None}
    storage = rundir.ray_dir(job.out_dir.parent).resolve()
    need_cpus = ray_cfg.workers * ray_cfg.cpus_per_worker
    with ray_session(ray_cfg.address, num_cpus=max(1, int(-(-need_cpus // 1)))) as local:
        _check_resources(ray_cfg, fixed=local)
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
