"""The pipeline's stages, declared once: what each one calls, with which typed requests, on what resources.

Every stage is a list of :class:`Step` s, each a library function and the typed request the pipeline
configuration resolves for it (the same function and request type a command's ``main(argv)`` builds), so the
launchers add orchestration and nothing else. ``--cluster local`` (``launch.submit``), SLURM
(``launch.slurm``) and ``ray job submit`` (``launch.ray_job``) all run stages through :func:`run` and size
their jobs from :data:`REGISTRY`. Every stage is safe to re-run: finished work is skipped and interrupted work
resumes (the converter, the training loop and the sampler all resume by themselves).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpc_calo.cpus import owned_cpus
from hpc_calo.errors import UserError
from hpc_calo.mpi import mpi_module
from launch.config import STAGES, PipelineConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Where:
    """How this process runs a stage: as every rank of an MPI job, and/or beside a Ray cluster."""

    mpi: bool = False
    address: str | None = None


@dataclass(frozen=True)
class Step:
    """``fn(request)``; ``rank0`` steps run once, on rank 0, when the stage runs as an MPI job."""

    fn: Callable[[Any], Any]
    request: Any
    rank0: bool = False


@dataclass(frozen=True)
class Stage:
    name: str
    steps: Callable[[PipelineConfig, Where], list[Step]]
    outputs: Callable[[PipelineConfig], list[Path]]
    tasks: Callable[[PipelineConfig], int]  # MPI ranks per job (1: a single process)
    nodes: Callable[[PipelineConfig], int]
    ray: bool  # flow-3 training goes through Ray Train (a Ray cluster inside a multi-node SLURM job)
    gpu: bool  # computes on cfg.compute_device (SLURM asks GPUs for it only then)
    independent: bool = False  # no step needs another's output: with cfg.jobs > 1 they run side by side


# ---- requests from the configuration ------------------------------------------------------------------------


def _threads(cfg: PipelineConfig, default: int) -> int:
    return default if cfg.threads is None else cfg.threads


def _training_threads(cfg: PipelineConfig) -> int:
    """Per training process: the cores shared out between side-by-side jobs (oversubscribed torch threads make
    training many times slower); 0, the CPUs this process owns, for a single job."""
    if cfg.jobs == 1:
        return _threads(cfg, 0)
    return _threads(cfg, max(1, owned_cpus() // cfg.jobs))


def _ray(cfg: PipelineConfig, where: Where) -> Any:
    """Ray Train for flow-3 when there are several workers or a cluster to use; None: in this process."""
    from hpc_calo.train.distributed import RayConfig

    if cfg.workers == 1 and where.address is None:
        return None
    return RayConfig(workers=cfg.workers, gpus_per_worker=1.0 if cfg.compute_device == "cuda" else 0.0,
                     cpus_per_worker=float(_threads(cfg, 1)), address=where.address)


def _training_options(cfg: PipelineConfig, flow: int, student: bool = False) -> Any:
    """The flow's budget (its own, else ``epochs``, else the preset's) and the pipeline's device settings."""
    from hpc_calo.train.job import TrainingOptions

    budget = {unit: n if unit == "minutes" else int(n) for unit, n in cfg.budget_for(flow, student).items()}
    return TrainingOptions(**budget, seed=cfg.seed, device=cfg.compute_device, dtype=cfg.dtype, amp=cfg.amp,
                           threads=_training_threads(cfg))


def _prep_steps(cfg: PipelineConfig, where: Where) -> list[Step]:
    from data_prep.convert import ConvertRequest, convert
    from data_prep.synth import SynthRequest

    steps = []
    if cfg.synthetic:
        data = cfg.path("data")
        n_ref = cfg.showers or max(100, cfg.synthetic // 2)
        # Data seeds apart from the pipeline seed (which seeds the models), and the reference apart from both.
        for name, n, seed in (("train.h5", cfg.synthetic, cfg.seed + 1), ("reference.h5", n_ref, cfg.seed + 1001)):
            if not (data / name).exists():  # the writer is atomic: an existing file is complete
                steps.append(Step(_synthesize, SynthRequest(data / name, cfg.dataset, n, seed), rank0=True))
    req = ConvertRequest(inputs=tuple(map(str, cfg.training_files())), dataset=cfg.dataset, out=cfg.path("store"),
                         val_fraction=cfg.val_fraction)
    return [*steps, Step(_ok(convert), req)]


def _synthesize(req: Any) -> None:
    from data_prep.synth import synthesize

    Path(req.out).parent.mkdir(parents=True, exist_ok=True)
    synthesize(req)


def _teacher_steps(cfg: PipelineConfig, where: Where) -> list[Step]:
    """Flows 1 and 2 in this process; flow-3 (the big one) through Ray Train when there are several workers.
    Flow-3 first: side by side, the longest job starts at once and the short ones share the other cores."""
    from hpc_calo.train.job import TrainRequest, train

    return [Step(train, TrainRequest(flow=flow, store=cfg.path("store"), preset=cfg.preset, out=cfg.path("run"),
                                     options=_training_options(cfg, flow), noise_kev=cfg.noise_kev,
                                     ray=_ray(cfg, where) if flow == 3 else None))
            for flow in (3, 1, 2)]


def _student_steps(cfg: PipelineConfig, where: Where) -> list[Step]:
    """Students for flows 2 and 3 by probability density distillation from the frozen teachers."""
    from hpc_calo.distill.job import DistillRequest, distill

    return [Step(distill, DistillRequest(run=cfg.path("run"), flow=flow, store=cfg.path("store"),
                                         options=_training_options(cfg, flow, student=True),
                                         ray=_ray(cfg, where) if flow == 3 else None))
            for flow in (3, 2)]


def _sample_steps(cfg: PipelineConfig, where: Where) -> list[Step]:
    """Bulk production with the reference file's incident energies (the standard evaluation protocol)."""
    from hpc_calo.sample.backends import sample
    from hpc_calo.sample.job import Launch, Output, SampleRequest
    from hpc_calo.sample.plan import Request

    out = cfg.path("production")
    if out.exists():
        log.info("%s exists: sampling already done", out)
        return []
    backend = "mpi" if where.mpi else cfg.sample_backend
    request = Request(run_dir=cfg.path("run"), n=cfg.showers or _reference_size(cfg), seed=cfg.seed,
                      energies=cfg.reference_file(), device=cfg.compute_device,
                      dtype=cfg.sample_dtype or cfg.dtype, compile=cfg.sample_compile, threads=_threads(cfg, 1))
    launch = Launch(backend=backend, workers=None if backend == "mpi" else cfg.sample_workers,
                    address=where.address if backend == "ray" else None)
    return [Step(sample, SampleRequest(request, Output(out), launch))]


def _reference_size(cfg: PipelineConfig) -> int:
    from hpc_calo.io import CaloFile

    with CaloFile(cfg.reference_file()) as ref:
        return ref.n


def _evaluate_steps(cfg: PipelineConfig, where: Where) -> list[Step]:
    from hpc_calo.evaluate.config import EvaluateRequest

    req = EvaluateRequest(gen=cfg.path("production"), ref=cfg.reference_file(), dataset=cfg.dataset,
                          out=cfg.path("report"), device=cfg.compute_device, epochs=cfg.eval_epochs,
                          seed=cfg.seed, threads=_threads(cfg, 0), plots=cfg.eval_plots,
                          **({"metrics": tuple(cfg.eval_metrics)} if cfg.eval_metrics else {}))
    return [Step(_evaluate_equal_sizes, req)]


def _evaluate_equal_sizes(req: Any) -> None:
    from hpc_calo.evaluate.pipeline import evaluate
    from hpc_calo.io import CaloFile

    with CaloFile(req.gen) as g, CaloFile(req.ref) as r:
        n_gen, n_ref = g.n, r.n
    if n_gen != n_ref:
        raise UserError(f"{req.gen} has {n_gen} showers but the reference {req.ref} has {n_ref}: the classifier "
                        "test needs equal sizes (leave --showers unset to match the reference)")
    evaluate(req)


def _ok(fn: Callable[[Any], int]) -> Callable[[Any], None]:
    """A library function that returns an exit status (the MPI converter) as one that raises."""

    def call(req: Any) -> None:
        if code := fn(req):
            raise RuntimeError(f"{fn.__module__}.{fn.__name__} failed with status {code}")

    call.__name__ = fn.__name__
    return call


# ---- the registry -------------------------------------------------------------------------------------------


def _flows(cfg: PipelineConfig, flows: tuple[int, ...], student: bool) -> list[Path]:
    from hpc_calo import rundir

    return [rundir.weights(cfg.path("run"), k, student) for k in flows]


REGISTRY: dict[str, Stage] = {s.name: s for s in (
    Stage("prep", _prep_steps, lambda c: [*([c.path("data")] if c.synthetic else []), c.path("store")],
          tasks=lambda c: c.prep_ranks, nodes=lambda c: 1, ray=False, gpu=False),
    Stage("teacher", _teacher_steps, lambda c: _flows(c, (1, 2, 3), False),
          tasks=lambda c: 1, nodes=lambda c: c.resources.nodes, ray=True, gpu=True, independent=True),
    Stage("student", _student_steps, lambda c: _flows(c, (2, 3), True),
          tasks=lambda c: 1, nodes=lambda c: c.resources.nodes, ray=True, gpu=True, independent=True),
    Stage("sample", _sample_steps, lambda c: [c.path("production")],
          tasks=lambda c: c.sample_workers if c.sample_backend == "mpi" else 1,
          nodes=lambda c: c.resources.nodes if c.sample_backend == "mpi" else 1, ray=False, gpu=True),
    Stage("evaluate", _evaluate_steps, lambda c: [c.path("report") / "report.md"],
          tasks=lambda c: 1, nodes=lambda c: 1, ray=False, gpu=True),
)}
assert tuple(REGISTRY) == STAGES


# ---- running ------------------------------------------------------------------------------------------------


def run(name: str, cfg: PipelineConfig, where: Where = Where()) -> None:
    """Run one stage here: its steps in order, or all of them under mpiexec when it wants several MPI ranks
    and this process is not already one of them."""
    stage = REGISTRY[name]
    ranks = stage.tasks(cfg)
    if ranks > 1 and not where.mpi and _spawn_mpi(name, cfg, ranks):
        return
    if not where.mpi:
        steps = stage.steps(cfg, where)
        if stage.independent and cfg.jobs > 1 and len(steps) > 1:
            _side_by_side(steps, cfg.jobs)
            return
        for step in steps:
            _call(step)
        return
    comm = mpi_module().COMM_WORLD
    if comm.Get_rank() == 0:  # rank 0 alone makes the synthetic data while the others wait
        for step in stage.steps(cfg, where):
            if step.rank0:
                _call(step)
    comm.Barrier()
    for step in stage.steps(cfg, where):  # resolved again: what rank 0 made is there now
        if not step.rank0:
            _call(step)


def _call(step: Step) -> None:
    log.info("running %s.%s(%s)", step.fn.__module__, step.fn.__name__, step.request)
    step.fn(step.request)


def _side_by_side(steps: list[Step], jobs: int) -> None:
    """Each step in its own process, ``jobs`` at a time, in the given order. A failed step does not stop the
    others (they checkpoint and finish, so a re-run has less to do); the first failure is raised after."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: this process may hold threads (torch's pools, Ray) that a forked child would inherit locked.
    with ProcessPoolExecutor(max_workers=min(jobs, len(steps)), mp_context=multiprocessing.get_context("spawn"),
                             max_tasks_per_child=1) as pool:
        futures = [pool.submit(_call, step) for step in steps]
        errors = [f.exception() for f in futures]
    for err in errors:
        if err is not None:
            raise err


def _spawn_mpi(name: str, cfg: PipelineConfig, ranks: int) -> bool:
    """``mpiexec -n RANKS python -m launch.mpi_stage CONFIG STAGE`` on this machine (no SLURM): the one place a
    stage is spawned. False when the environment has no mpiexec (the stage then runs in this process)."""
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        if name == "sample":
            raise UserError(f"--sample-backend mpi needs mpiexec next to {sys.executable}")
        return False
    cfg.save()
    cmd = [str(mpiexec), "-n", str(ranks), sys.executable, "-m", "launch.mpi_stage", str(cfg.path("config")), name]
    log.info("running %s", " ".join(cmd))
    subprocess.run(cmd, check=True)
    return True


def run_stages(cfg: PipelineConfig, selected: list[str], where: Where = Where()) -> None:
    """The stages one after the other in this process, with their times (``--cluster local``, ``ray job``)."""
    total = time.perf_counter()
    for name in selected:
        t0 = time.perf_counter()
        print(f"== {name} ==", flush=True)
        run(name, cfg, where)
        print(f"== {name} done in {time.perf_counter() - t0:.0f} s ==", flush=True)
    print(f"pipeline done in {time.perf_counter() - total:.0f} s")

