"""Distillation as a library: a typed :class:`DistillRequest` in, :func:`distill` trains the IAF student of
flow 2 or 3 from its trained teacher through the same Job, loop and Ray path as the teachers."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hpc_calo import rundir
from hpc_calo.data.store import open_store
from hpc_calo.digest import files_digest
from hpc_calo.distill.pdd import DistillModel, PDDConfig
from hpc_calo.errors import UserError
from hpc_calo.flows import FlowSpec
from hpc_calo.flows.presets import get_preset
from hpc_calo.geometry import get_geometry
from hpc_calo.models import FlowModel, load_flow_model
from hpc_calo.train.distributed import RayConfig
from hpc_calo.train.job import Job, TrainingOptions, run_job, train_config


@dataclass(frozen=True)
class DistillRequest:
    """Distil the student of ``flow`` in run folder ``run``; ``store`` None: the one run.json records."""

    run: Path
    flow: int
    store: Path | None = None
    beta: float = 0.5  # weight of the x-pass; the z-pass gets 1 - beta
    diagnostic_samples: int = 10_000  # validation rows the best student is scored on afterwards; 0: skip
    options: TrainingOptions = field(default_factory=TrainingOptions)
    ray: RayConfig | None = None

    def __post_init__(self) -> None:
        if self.flow not in (2, 3):
            raise UserError(f"--flow must be 2 or 3 (flow-1 stays a MAF), not {self.flow}")
        if not 0.0 <= self.beta <= 1.0:
            raise UserError(f"--beta must lie in [0, 1], not {self.beta}")
        if self.diagnostic_samples < 0:
            raise UserError(f"--diagnostic-samples must be >= 0, not {self.diagnostic_samples}")


@dataclass
class DistillJob(Job):
    """A training Job whose model is teacher + student (``make_model``); loaders and run folder as for training."""

    pdd: PDDConfig = field(default_factory=PDDConfig)

    @property
    def teacher_path(self) -> Path:
        return rundir.weights(self.run_dir, self.flow)

    def describe(self) -> str:
        return f"{self.geometry.name} preset {self.preset}: distilling {self.teacher_path}"

    def model_meta(self) -> dict[str, Any]:
        """What a resumed checkpoint must match: the distillation's identity, not the bare student's."""
        return self.make_model().meta()

    def make_model(self) -> DistillModel:  # type: ignore[override]
        dtype = self.cfg.torch_dtype
        teacher = load_flow_model(self.teacher_path, "cpu", dtype, dataset=self.geometry.name, flow=self.flow)
        torch.manual_seed(self.cfg.seed)  # the same initial student on every rank
        # The student sees what its teacher saw: the same dequantisation noise.
        student = FlowModel.from_preset(self.flow, self.geometry, self.preset, True, teacher.noise_mev).to(dtype)
        return DistillModel(teacher, student, self.pdd)


def build_job(req: DistillRequest) -> DistillJob:
    """Validate the run folder, teacher and store; no file is written here."""
    run = rundir.read_run(req.run)
    preset = get_preset(run["preset"])
    teacher = rundir.weights(req.run, req.flow)
    if not teacher.is_file():
        raise UserError(f"{req.run}: no trained flow-{req.flow} teacher ({teacher}); train it first")
    _check_layout(teacher, preset.spec(req.flow, get_geometry(run["dataset"]), student=True), run["preset"])
    store_path = req.store or (Path(run["store"]) if run.get("store") else None)
    if store_path is None:
        raise UserError(f"{req.run}: run.json records no store; pass --store")
    store = open_store(store_path)
    if store.geometry.name != run["dataset"]:
        raise UserError(f"{store_path}: a {store.geometry.name} store, but the run is {run['dataset']}")
    cfg = train_config(req.options, preset, req.flow, f"flow-{req.flow}-student", student=True)
    return DistillJob(req.flow, run["preset"], Path(store_path), store.geometry, Path(req.run), cfg,
                      req.options.memory_gb, student=True, energy_range=store.energy_range(),
                      extra={"pdd": {"beta": req.beta}}, pdd=PDDConfig(beta=req.beta))


def _check_layout(teacher_path: Path, student: FlowSpec, preset: str) -> None:
    """PDD matches the two flows block by block: a teacher laid out otherwise than the run preset's student (a model
    file copied in from another run) is refused here, not met as an index error mid-loss. Widths may differ."""
    spec = load_flow_model(teacher_path).spec
    fields = ("features", "context", "blocks", "bins", "tail_bound", "perm_seed")
    differ = [f"{f} {getattr(spec, f)} against {getattr(student, f)}" for f in fields
              if getattr(spec, f) != getattr(student, f)]
    if differ:
        raise UserError(f"{teacher_path}: this teacher is not laid out as the student of preset {preset!r} "
                        f"({', '.join(differ)}); distil it in a run folder of the preset it was trained with")


def report_quality(job: DistillJob, n: int) -> dict[str, Any]:
    """Score the saved best student against its teacher (hpc_calo.distill.diagnose) and record it. A record of
    the same two weight files, rows and seed is reported again, not recomputed: sampling a teacher 10k times
    takes minutes, and a re-run of a finished pipeline passes here."""
    from hpc_calo.distill.diagnose import diagnose

    weights = rundir.weights_in(job.out_dir)
    # "check": the version of hpc_calo.distill.diagnose; a record of an earlier one (its AUC read low) is made again.
    of = {"weights": files_digest([job.teacher_path, weights]), "rows_asked": n, "seed": job.cfg.seed, "check": 2}
    path = rundir.diagnostics_in(job.out_dir)
    result = json.loads(path.read_text()) if path.is_file() else {}
    if result.get("of") != of:
        teacher = load_flow_model(job.teacher_path, dataset=job.geometry.name, flow=job.flow)
        student = load_flow_model(weights, dataset=job.geometry.name, flow=job.flow)
        train, val = job.make_loaders(0, 1)
        result = {**diagnose(teacher, student, val if val is not None else train, n, seed=job.cfg.seed), "of": of}
        rundir.write_json(path, result)

    def f(key: str) -> str:
        return "n/a" if result[key] is None else f"{result[key]:.2f}"

    print(f"[{job.cfg.name}] quality on {result['samples']} rows: teacher log-likelihood of student samples "
          f"{f('teacher_loglik_student_samples')}, of its own samples {f('teacher_loglik_teacher_samples')}, of the "
          f"data {f('teacher_loglik_data')}; student-vs-teacher AUC {result['student_vs_teacher_auc']:.3f}",
          file=sys.stderr)
    return result


def distill(req: DistillRequest) -> dict[str, Any]:
    """Train (or resume) the student, then score the best one; returns the training summary."""
    job = build_job(req)
    summary = run_job(job, req.ray)
    if req.diagnostic_samples and rundir.weights_in(job.out_dir).is_file():
        report_quality(job, req.diagnostic_samples)
    return summary
