"""Submit the stages to SLURM as dependent jobs through submitit, and follow them to the end.

Prep (and MPI sampling) run as one srun task per MPI rank; teacher and student run one task per node with a
Ray cluster started inside the allocation. Training jobs are ``Checkpointable``: on timeout or preemption
submitit requeues them with the same arguments, and the training loop resumes from the run's last
checkpoint. Dependants use ``afterok`` with ``kill-on-invalid-dep``, so a failed stage cancels the rest.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import submitit

from launch import stages
from launch.config import PipelineConfig

log = logging.getLogger(__name__)

DONE_STATES = {"COMPLETED"}
FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}


class StageJob(submitit.helpers.Checkpointable):
    """One stage as a SLURM job; requeued with the same arguments when its time runs out."""

    def __init__(self, stage: str) -> None:
        self.stage = stage

    def __call__(self, cfg_dict: dict[str, Any]) -> str:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        cfg = PipelineConfig.from_dict(cfg_dict)
        env = submitit.JobEnvironment()
        if stages.REGISTRY[self.stage].ray:
            self._with_ray(cfg, env)
        else:
            stages.run(self.stage, cfg, stages.Where(mpi=env.num_tasks > 1))
        # The work is done: a checkpoint signal that lands now (while submitit pickles the result or the
        # interpreter shuts down, when Python's handler is gone) would kill the task and fail a finished job.
        signal.signal(getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG), signal.SIG_IGN)
        return self.stage

    def _with_ray(self, cfg: PipelineConfig, env: submitit.JobEnvironment) -> None:
        """Training stages: a Ray cluster inside the allocation when several nodes or workers train flow-3."""
        if env.num_nodes == 1 and cfg.workers == 1:
            stages.run(self.stage, cfg)
            return
        from launch.ray_cluster import ray_in_allocation

        with ray_in_allocation(
            hostnames=list(env.hostnames), rank=env.global_rank, job_id=str(env.job_id),
            done_dir=cfg.path("logs"), cpus=cfg.resources.cpus_per_task, gpus=_gpus(cfg, self.stage),
        ) as address:
            if address is not None:
                stages.run(self.stage, cfg, stages.Where(address=address))


@dataclass
class Planned:
    stage: str
    tasks_per_node: int
    nodes: int
    mpi: bool
    checkpointable: bool
    gpus: int


def _gpus(cfg: PipelineConfig, stage: str) -> int:
    """GPUs per node of a stage's job: only for stages that compute, and only when they compute on a GPU."""
    if not stages.REGISTRY[stage].gpu or cfg.compute_device != "cuda":
        return 0
    return cfg.resources.gpus_per_node or 1


def plan(cfg: PipelineConfig, selected: list[str]) -> list[Planned]:
    out = []
    for name in selected:
        stage = stages.REGISTRY[name]
        tasks = stage.tasks(cfg)
        out.append(Planned(name, tasks, stage.nodes(cfg), tasks > 1, stage.ray, _gpus(cfg, name)))
    return out


def _executor(cfg: PipelineConfig, p: Planned, dependency: str | None) -> submitit.AutoExecutor:
    res = cfg.resources
    ex = submitit.AutoExecutor(folder=cfg.path("logs") / p.stage, cluster="slurm",
                               slurm_max_num_timeout=res.max_requeues)
    extra: dict[str, Any] = {}
    if dependency:
        extra = {"dependency": f"afterok:{dependency}", "kill-on-invalid-dep": "yes"}
    params: dict[str, Any] = {
        "name": f"hpc-calo-{p.stage}",
        "timeout_min": res.minutes(),
        "nodes": p.nodes,
        "tasks_per_node": p.tasks_per_node,
        "cpus_per_task": res.cpus_per_task if p.tasks_per_node == 1 else 1,
        "slurm_signal_delay_s": res.signal_delay_s,
        "slurm_additional_parameters": extra,
    }
    if p.gpus:
        params["gpus_per_node"] = p.gpus
    if res.mem_gb:
        params["mem_gb"] = res.mem_gb
    for key, value in (("slurm_partition", res.partition), ("slurm_account", res.account),
                       ("slurm_qos", res.qos)):
        if value:
            params[key] = value
    if p.mpi:
        params["slurm_srun_args"] = ["--mpi=pmi2"]
    ex.update_parameters(**params)
    return ex


def describe(cfg: PipelineConfig, planned: list[Planned]) -> str:
    lines = [f"{'stage':9} {'nodes':>5} {'tasks/node':>10} {'gpus/node':>9} {'time':>9}  kind"]
    for p in planned:
        kind = "MPI (srun --mpi=pmi2)" if p.mpi else ("Ray in allocation, requeue+resume" if p.checkpointable
                                                       else "single task")
        lines.append(f"{p.stage:9} {p.nodes:>5} {p.tasks_per_node:>10} {p.gpus:>9} {cfg.resources.time:>9}  {kind}")
    lines.append("each stage depends on the previous one (afterok; a failure cancels the rest)")
    return "\n".join(lines)


def submit(cfg: PipelineConfig, selected: list[str]) -> list[tuple[str, submitit.Job]]:
    jobs: list[tuple[str, submitit.Job]] = []
    previous: str | None = None
    cfg_dict = asdict(cfg)
    for p in plan(cfg, selected):
        job = _executor(cfg, p, previous).submit(StageJob(p.stage), cfg_dict)
        jobs.append((p.stage, job))
        previous = job.job_id
        print(f"submitted {p.stage:9} job {job.job_id}  logs {Path(job.paths.stdout).parent}", flush=True)
    return jobs


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"(no log at {path})"


def follow(jobs: list[tuple[str, submitit.Job]], max_poll_s: float = 10.0) -> tuple[bool, str]:
    """Wait for every job; on the first failure cancel the rest and return its stage and log tail.

    The poll interval starts at 1 s after each change of state and doubles up to ``max_poll_s``: a short stage
    is seen to end within a second or two, a long one costs sacct a query every ``max_poll_s``."""
    last: dict[str, str] = {}
    pending = list(jobs)
    poll_s = 1.0
    while pending:
        stage, job = pending[0]
        # Forced: submitit's own cache refreshes an old job's state only every 1-10 minutes.
        state = job.watcher.get_state(job.job_id, mode="force").split()[0].upper()
        if last.get(stage) != state:
            print(f"  {stage:9} job {job.job_id}: {state}", flush=True)
            last[stage], poll_s = state, 1.0
        if state in DONE_STATES:
            pending.pop(0)
            continue
        if state in FAILED_STATES:
            for _, other in pending[1:]:
                other.cancel(check=False)
            msg = (f"stage {stage!r} (job {job.job_id}) ended {state}; the stages after it were cancelled.\n"
                   f"--- tail of {job.paths.stderr} ---\n{_tail(Path(job.paths.stderr))}")
            return False, msg
        time.sleep(poll_s)
        poll_s = min(2 * poll_s, max_poll_s)
    return True, ""
