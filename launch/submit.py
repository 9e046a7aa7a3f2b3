"""``python -m launch.submit``: take a dataset from raw files to an evaluated production file.

``--cluster local`` runs the stages one after the other on this machine; ``--cluster slurm`` submits them as
dependent SLURM jobs through submitit and follows them until the report is written (or a stage fails).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from collections.abc import Sequence
from typing import Any

from hpc_calo.errors import UserError, run_cli
from hpc_calo.flags import non_negative_int, positive_int
from launch import stages
from launch.config import STAGES, PipelineConfig, load_file, resolve


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.submit",
        description=(
            "Run the iCaloFlow pipeline: prep (synthetic data, Zarr pair store) -> teacher (flows 1-3) -> "
            "student (distilled flows 2-3) -> sample (production HDF5) -> evaluate (report). Re-running with "
            "the same --out resumes: finished stages are skipped, interrupted ones continue."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--cluster", choices=("local", "slurm"), required=True,
                   help="local: run here, stage after stage; slurm: submit dependent jobs with submitit")
    p.add_argument("--dataset", choices=("ds2", "ds3"), help="CaloChallenge dataset geometry")
    p.add_argument("--out", help="run folder (config, data, store, models, production file, report, logs)")
    p.add_argument("--stage", choices=(*STAGES, "all"), default="all", help="run one stage, or all of them")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", nargs="+", metavar="FILE", help="CaloChallenge training HDF5 files")
    src.add_argument("--synthetic", type=positive_int("--synthetic"), metavar="N",
                     help="make N synthetic training showers instead")
    p.add_argument("--reference", metavar="REF", help="held-out CaloChallenge file (needed with --data)")
    p.add_argument("--showers", type=positive_int("--showers"),
                   help="showers to produce (default: as many as the reference)")
    p.add_argument("--preset", help="model preset: tiny, small, or the reference ds2 / ds3 (default tiny)")
    p.add_argument("--epochs", type=positive_int("--epochs"), help="override the preset's epochs for every flow")
    p.add_argument("--budget", action="append", metavar="FLOW=UNIT:N", type=_budget,
                   help="training budget of one flow, repeatable: FLOW is flow1, flow2, flow3, flow2_student or "
                        "flow3_student; UNIT is epochs, steps or minutes (e.g. --budget flow1=epochs:300 --budget "
                        "flow3=minutes:120). In a config file: [budget.flow3] minutes = 120. Re-running with a "
                        "larger budget extends that flow's training")
    p.add_argument("--eval-epochs", type=positive_int("--eval-epochs"),
                   help="classifier epochs in the evaluation (official 50)")
    p.add_argument("--workers", type=positive_int("--workers"),
                   help="Ray Train workers for flow-3 (teacher and student)")
    p.add_argument("--prep-ranks", type=positive_int("--prep-ranks"), help="MPI ranks of the store conversion")
    p.add_argument("--sample-backend", choices=("local", "mpi", "ray"), help="how production fans out")
    p.add_argument("--sample-workers", type=positive_int("--sample-workers"),
                   help="sampler workers (MPI ranks or Ray actors)")
    p.add_argument("--seed", type=non_negative_int("--seed"), help="seed of every stage")
    p.add_argument("--config", metavar="FILE", help="TOML or JSON file with any of these settings")
    slurm = p.add_argument_group("SLURM resources (per job)")
    slurm.add_argument("--nodes", type=positive_int("--nodes"), help="nodes of the training jobs (Ray spans them)")
    slurm.add_argument("--gpus-per-node", type=non_negative_int("--gpus-per-node"),
                       help="GPUs per node of the training and sampling jobs (0: CPU)")
    slurm.add_argument("--cpus-per-task", type=positive_int("--cpus-per-task"), help="CPUs of each task")
    slurm.add_argument("--partition", help="SLURM partition(s), e.g. gpu (letters, digits, _ . - + and commas)")
    slurm.add_argument("--account", help="SLURM account to charge (letters, digits, _ . - +)")
    slurm.add_argument("--qos", help="SLURM quality of service (letters, digits, _ . - +)")
    slurm.add_argument("--time", metavar="HH:MM:SS", help="time limit of each job; training requeues past it")
    slurm.add_argument("--signal-delay-s", type=non_negative_int("--signal-delay-s"),
                       help="checkpoint signal this long before the limit")
    slurm.add_argument("--max-requeues", type=non_negative_int("--max-requeues"),
                       help="requeues a training job may use (default 20)")
    p.add_argument("--dry-run", action="store_true", help="print what would run or be submitted, and stop")
    p.add_argument("--no-wait", action="store_true", help="slurm: submit and return without following")
    return p


def _budget(text: str) -> tuple[str, dict[str, float]]:
    try:
        name, rest = text.split("=", 1)
        unit, amount = rest.split(":", 1)
        return name.strip(), {unit.strip(): float(amount) if unit.strip() == "minutes" else int(amount)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FLOW=UNIT:N (e.g. flow3=minutes:120), not {text!r}") from None


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    file_values: dict[str, Any] = load_file(args.config) if args.config else {}
    flags: dict[str, Any] = {
        k: getattr(args, k) for k in ("dataset", "out", "data", "synthetic", "reference", "showers", "preset",
                                      "epochs", "eval_epochs", "workers", "prep_ranks", "sample_backend",
                                      "sample_workers", "seed")
    }
    flags["budget"] = dict(args.budget) if args.budget else None
    flags["resources"] = {k: getattr(args, k) for k in ("nodes", "gpus_per_node", "cpus_per_task", "partition",
                                                         "account", "qos", "time", "signal_delay_s",
                                                         "max_requeues")}
    return resolve(file_values, flags)


def run_local(cfg: PipelineConfig, selected: list[str]) -> None:
    total = time.perf_counter()
    for stage in selected:
        t0 = time.perf_counter()
        print(f"== {stage} ==", flush=True)
        getattr(stages, stage)(cfg)
        print(f"== {stage} done in {time.perf_counter() - t0:.0f} s ==", flush=True)
    print(f"pipeline done in {time.perf_counter() - total:.0f} s")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    cfg = config_from_args(args)
    selected = list(STAGES) if args.stage == "all" else [args.stage]
    if args.cluster == "slurm":
        from launch import slurm

        if args.dry_run:
            print(slurm.describe(cfg, slurm.plan(cfg, selected)))
            print(f"run folder: {cfg.root}")
            return 0
        if shutil.which("sbatch") is None:
            raise UserError("--cluster slurm needs sbatch on PATH (see slurm/README.md for a local cluster)")
        cfg.save()
        jobs = slurm.submit(cfg, selected)
        if args.no_wait:
            return 0
        ok, msg = slurm.follow(jobs)
        if not ok:
            raise UserError(msg)
    else:
        if args.dry_run:
            print(f"would run on this machine: {' -> '.join(selected)}; run folder {cfg.root}")
            return 0
        cfg.save()
        run_local(cfg, selected)
    print(f"production file: {cfg.path('production')}")
    print(f"report:          {cfg.path('report') / 'report.md'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
