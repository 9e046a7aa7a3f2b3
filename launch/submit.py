"""``python -m launch.submit``: take a dataset from raw files to an evaluated production file.

``--cluster local`` runs the stages one after the other on this machine; ``--cluster slurm`` submits them as
dependent SLURM jobs through submitit and follows them until the report is written (or a stage fails).
"""

from __future__ import annotations

import argparse
import logging
import shutil
from collections.abc import Sequence
from typing import Any

from hpc_calo.errors import UserError, run_cli
from hpc_calo.flags import noise_kev, non_negative_int, positive_int
from hpc_calo.precision import PRECISIONS
from hpc_calo.seeding import DEFAULT_SEED
from launch import stages
from launch.config import STAGES, PipelineConfig, explain, load_file, resolve, site_file


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default where it has one; the help text says what an unset flag means."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return super()._get_help_string(action) if action.default is not None else action.help or ""


DESCRIPTION = (
    "Run the iCaloFlow pipeline: prep (synthetic data, Zarr pair store) -> teacher (flows 1-3) -> "
    "student (distilled flows 2-3) -> sample (production HDF5) -> evaluate (report). Re-running with "
    "the same --out resumes: finished stages are skipped, interrupted ones continue."
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.submit", description=DESCRIPTION, formatter_class=_Help)
    p.add_argument("--cluster", choices=("local", "slurm"), required=True,
                   help="local: run here, stage after stage; slurm: submit dependent jobs with submitit")
    add_pipeline_arguments(p)
    return p


def add_pipeline_arguments(p: argparse.ArgumentParser) -> None:
    """Every pipeline setting as a flag (shared with ``launch.ray_job``); None means not given."""
    p.add_argument("--dataset", choices=("ds2", "ds3"), help="CaloChallenge dataset geometry")
    p.add_argument("--out", help="run folder (config, data, store, models, production file, report, logs); "
                                 "default runs/<dataset>-<preset>")
    p.add_argument("--stage", choices=(*STAGES, "all"), default="all", help="run one stage, or all of them")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", nargs="+", metavar="FILE",
                     help="CaloChallenge training HDF5 files (default: the official ones in --data-dir: "
                          "dataset_2_1.hdf5; dataset_3_1.hdf5 and dataset_3_2.hdf5)")
    src.add_argument("--synthetic", type=positive_int("--synthetic"), metavar="N",
                     help="make N synthetic training showers instead")
    p.add_argument("--reference", metavar="REF",
                   help="held-out CaloChallenge file for the evaluation and the production energies (default: "
                        "the official one in --data-dir: dataset_2_2.hdf5; for DS3 dataset_3_3.hdf5)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="folder of the official files, as python -m data_prep.download writes them "
                        "(default: $HPC_CALO_DATA, else ./data)")
    p.add_argument("--showers", type=positive_int("--showers"),
                   help="showers to produce (default: as many as the reference)")
    p.add_argument("--preset", help="model preset: tiny, small, or the reference ds2 / ds3 (default: the "
                                    "dataset's reference preset)")
    p.add_argument("--epochs", type=positive_int("--epochs"), help="override the preset's epochs for every flow")
    p.add_argument("--budget", action="append", metavar="FLOW=UNIT:N", type=parse_budget,
                   help="training budget of one flow, repeatable: FLOW is flow1, flow2, flow3, flow2_student or "
                        "flow3_student; UNIT is epochs, steps or minutes (e.g. --budget flow1=epochs:300 --budget "
                        "flow3=minutes:120). In a config file: [budget.flow3] minutes = 120. Re-running with a "
                        "larger budget extends that flow's training")
    p.add_argument("--eval-epochs", type=positive_int("--eval-epochs"),
                   help="classifier epochs in the evaluation (official 50)")
    p.add_argument("--eval-metrics", type=_metric_list, metavar="M1,M2",
                   help="the evaluation's metrics, a comma-separated subset of hist, cls-low, cls-high, cls-boost, "
                        "fpd (default: all)")
    p.add_argument("--eval-plots", action=argparse.BooleanOptionalAction,
                   help="write the evaluation's PNG figures (default: yes)")
    p.add_argument("--workers", type=positive_int("--workers"),
                   help="Ray Train workers for flow-3 (teacher and student)")
    p.add_argument("--prep-ranks", type=positive_int("--prep-ranks"), help="MPI ranks of the store conversion")
    p.add_argument("--sample-backend", choices=("local", "mpi", "ray"), help="how production fans out")
    p.add_argument("--sample-workers", type=positive_int("--sample-workers"),
                   help="sampler workers (MPI ranks or Ray actors)")
    p.add_argument("--seed", type=non_negative_int("--seed"), help=f"seed of every stage (default {DEFAULT_SEED})")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   help="where training, sampling and the evaluation classifiers run (default: cuda when "
                        "--gpus-per-node > 0, else cpu)")
    p.add_argument("--dtype", choices=("float32", "float64"), help="model precision of training and sampling")
    p.add_argument("--sample-dtype", choices=PRECISIONS, help="production precision (default: --dtype)")
    p.add_argument("--sample-compile", action="store_true", default=None,
                   help="production with the students' spline under torch.compile (hpc_calo.sample --compile): "
                        "faster on the CPU after a one-time compilation per worker")
    p.add_argument("--amp", choices=("off", "tf32", "bf16"), help="GPU training mixed precision (default off)")
    p.add_argument("--noise-kev", type=noise_kev, metavar="KEV",
                   help="width of the teachers' uniform dequantisation noise, keV (default: the preset's: 0.5 for "
                        "small and quickstart, the reference's 5 otherwise; students inherit it)")
    p.add_argument("--threads", type=positive_int("--threads"),
                   help="torch CPU threads per process (default: each command's own)")
    p.add_argument("--jobs", type=positive_int("--jobs"), help="training processes at a time on one machine "
                   "(default 1): the three teachers, then the two students, side by side, each with cores/JOBS "
                   "threads")
    p.add_argument("--config", metavar="FILE",
                   help="TOML or JSON file with any of these settings ([resources] table for the SLURM ones); "
                        "it overrides the site file ($HPC_CALO_CONFIG, else ~/.config/hpc-calo/config.toml)")
    slurm = p.add_argument_group("SLURM resources (per job; a site sets its usual ones in the site file's "
                                 "[resources] table)")
    slurm.add_argument("--nodes", type=positive_int("--nodes"), help="nodes of the training jobs (Ray spans them)")
    slurm.add_argument("--gpus-per-node", type=non_negative_int("--gpus-per-node"),
                       help="GPUs of each training and sampling node (default 0)")
    slurm.add_argument("--cpus-per-task", type=positive_int("--cpus-per-task"), help="CPUs of each task (default 2)")
    slurm.add_argument("--partition", help="SLURM partition(s) (default: the cluster's default; letters, digits, "
                       "_ . - + and commas)")
    slurm.add_argument("--account", help="SLURM account to charge (letters, digits, _ . - +)")
    slurm.add_argument("--qos", help="SLURM quality of service (letters, digits, _ . - +)")
    slurm.add_argument("--time", metavar="HH:MM:SS", help="time limit of each job; training requeues past it")
    slurm.add_argument("--signal-delay-s", type=non_negative_int("--signal-delay-s"),
                       help="checkpoint signal this long before the limit")
    slurm.add_argument("--max-requeues", type=non_negative_int("--max-requeues"),
                       help="requeues a training job may use (default 20)")
    p.add_argument("--dry-run", action="store_true",
                   help="print every resolved setting and where it came from, and what would run or be "
                        "submitted, and stop")
    p.add_argument("--no-wait", action="store_true", help="slurm: submit and return without following")


def _metric_list(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def parse_budget(text: str) -> tuple[str, dict[str, float]]:
    try:
        name, rest = text.split("=", 1)
        unit, amount = rest.split(":", 1)
        return name.strip(), {unit.strip(): float(amount) if unit.strip() == "minutes" else int(amount)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FLOW=UNIT:N (e.g. flow3=minutes:120), not {text!r}") from None


def config_from_args(args: argparse.Namespace) -> tuple[PipelineConfig, dict[str, str]]:
    """The configuration, and where each setting came from: defaults < site file < --config < flags."""
    layers: list[tuple[str, dict[str, Any]]] = []
    site = site_file()
    if site:
        layers.append((f"site file {site}", load_file(site)))
    if args.config:
        layers.append((f"config file {args.config}", load_file(args.config)))
    flags: dict[str, Any] = {
        k: getattr(args, k) for k in ("dataset", "out", "data", "synthetic", "reference", "data_dir", "showers",
                                      "preset", "epochs", "eval_epochs", "eval_metrics", "eval_plots", "workers",
                                      "prep_ranks", "sample_backend", "sample_workers", "seed", "device", "dtype",
                                      "sample_dtype", "sample_compile", "amp", "threads", "jobs", "noise_kev")
    }
    flags["budget"] = dict(args.budget) if args.budget else None
    flags["resources"] = {k: getattr(args, k) for k in ("nodes", "gpus_per_node", "cpus_per_task", "partition",
                                                         "account", "qos", "time", "signal_delay_s",
                                                         "max_requeues")}
    layers.append(("flag", flags))
    return resolve(layers)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    cfg, sources = config_from_args(args)
    selected = list(STAGES) if args.stage == "all" else [args.stage]
    if args.dry_run:
        print(explain(cfg, sources))
    print(f"run folder: {cfg.root}", flush=True)
    if args.cluster == "slurm":
        from launch import slurm

        if args.dry_run:
            print(slurm.describe(cfg, slurm.plan(cfg, selected)))
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
            print(f"would run on this machine: {' -> '.join(selected)}")
            return 0
        cfg.save()
        stages.run_stages(cfg, selected)
    print(f"production file: {cfg.path('production')}")
    print(f"report:          {cfg.path('report') / 'report.md'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
