"""``python -m hpc_calo.distill``: train the IAF student of flow 2 or 3 from its trained teacher, resumably.

The teacher is ``RUN_DIR/flow{k}/best.pt``; the student trains in ``RUN_DIR/flow{k}_student/`` through the
same training loop (``hpc_calo.train.loop.fit``) and, with ``--workers``, the same Ray Train path as the
teachers. Its ``best.pt`` is the student with the lowest validation KL; the generation chain picks it up.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hpc_calo.atomic import atomic_path
from hpc_calo.data.store import open_store
from hpc_calo.distill.pdd import DistillModel, PDDConfig
from hpc_calo.errors import UserError, run_cli
from hpc_calo.flags import non_negative_int, number
from hpc_calo.flows.presets import get_preset
from hpc_calo.models import FlowModel, load_flow_model
from hpc_calo.train.__main__ import Job, add_training_arguments, execute, flow_dir_name, train_config
from hpc_calo.train.checkpoint import read_run


@dataclass
class DistillJob(Job):
    """A training Job whose model is teacher + student (``make_model``); loaders and run folder as for training."""

    pdd: PDDConfig = field(default_factory=PDDConfig)

    @property
    def teacher_path(self) -> Path:
        return self.run_dir / flow_dir_name(self.flow) / "best.pt"

    def describe(self) -> str:
        return f"{self.geometry.name} preset {self.preset}: distilling {self.teacher_path}"

    def model_meta(self) -> dict[str, Any]:
        """What a resumed checkpoint must match: the distillation's identity, not the bare student's."""
        return self.make_model().meta()

    def make_model(self) -> DistillModel:  # type: ignore[override]
        dtype = self.cfg.torch_dtype
        teacher = load_flow_model(self.teacher_path, "cpu", dtype, dataset=self.geometry.name, flow=self.flow)
        torch.manual_seed(self.cfg.seed)  # the same initial student on every rank
        student = FlowModel.from_preset(self.flow, self.geometry, self.preset, student=True).to(dtype)
        return DistillModel(teacher, student, self.pdd)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hpc_calo.distill",
        description=(
            "Distil the IAF student of flow 2 or 3 from its trained teacher MAF (Probability Density "
            "Distillation). Writes RUN_DIR/flow<k>_student/ (checkpoint.pt, best.pt = lowest validation KL); "
            "re-running the same command resumes."
        ),
    )
    p.add_argument("--run", type=Path, required=True, help="run folder holding the trained teacher flow<k>/best.pt")
    p.add_argument("--flow", type=int, required=True, choices=(2, 3), help="which flow's student (flow-1 stays a MAF)")
    p.add_argument("--store", type=Path, help="pair store (default: the one recorded in RUN_DIR/run.json)")
    p.add_argument("--beta", type=number(float, "--beta", 0, 1), default=0.5,
                   help="weight of the x-pass; the z-pass gets 1-beta (default 0.5)")
    p.add_argument("--diagnostic-samples", type=non_negative_int("--diagnostic-samples"), default=10_000,
                   help="after distilling, score the best student on this many validation rows: the teacher's "
                        "log-likelihood of student vs teacher samples and a student-vs-teacher classifier AUC "
                        "(written to flow<k>_student/diagnostics.json); 0: skip (default 10000)")
    add_training_arguments(p)
    return p


def build_job(args: argparse.Namespace) -> DistillJob:
    """Validate the run folder, teacher and store; no file is written here."""
    run = read_run(args.run)
    preset = get_preset(run["preset"])
    teacher = args.run / flow_dir_name(args.flow) / "best.pt"
    if not teacher.is_file():
        raise UserError(f"{args.run}: no trained flow-{args.flow} teacher ({teacher}); train it first")
    store_path = args.store or (Path(run["store"]) if run.get("store") else None)
    if store_path is None:
        raise UserError(f"{args.run}: run.json records no store; pass --store")
    store = open_store(store_path)
    if store.geometry.name != run["dataset"]:
        raise UserError(f"{store_path}: a {store.geometry.name} store, but the run is {run['dataset']}")
    cfg = train_config(args, preset, f"flow-{args.flow}-student", student=True)
    energy_range = store.energy_range()
    return DistillJob(args.flow, run["preset"], Path(store_path), store.geometry, Path(args.run), cfg, args.memory_gb,
                      student=True, energy_range=energy_range, extra={"pdd": {"beta": args.beta}},
                      pdd=PDDConfig(beta=args.beta))


def report_quality(job: DistillJob, n: int) -> dict[str, Any]:
    """Score the saved best student against its teacher (hpc_calo.distill.diagnose) and record it."""
    from hpc_calo.distill.diagnose import diagnose

    teacher = load_flow_model(job.teacher_path, dataset=job.geometry.name, flow=job.flow)
    student = load_flow_model(job.out_dir / "best.pt", dataset=job.geometry.name, flow=job.flow)
    train, val = job.make_loaders(0, 1)
    result = diagnose(teacher, student, val if val is not None else train, n, seed=job.cfg.seed)
    with atomic_path(job.out_dir / "diagnostics.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")

    def f(key: str) -> str:
        return "n/a" if result[key] is None else f"{result[key]:.2f}"

    print(f"[{job.cfg.name}] quality on {result['samples']} rows: teacher log-likelihood of student samples "
          f"{f('teacher_loglik_student_samples')}, of its own samples {f('teacher_loglik_teacher_samples')}, of the "
          f"data {f('teacher_loglik_data')}; student-vs-teacher AUC {result['student_vs_teacher_auc']:.3f}",
          file=sys.stderr)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.diagnostic_samples < 0:
        raise UserError(f"--diagnostic-samples must be >= 0, not {args.diagnostic_samples}")
    job = build_job(args)
    code = execute(job, args)
    if args.diagnostic_samples and (job.out_dir / "best.pt").is_file():
        report_quality(job, args.diagnostic_samples)
    return code


if __name__ == "__main__":
    run_cli(main)
