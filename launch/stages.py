"""The pipeline's stages, each a plain function of the configuration.

Every stage calls the same command-line entry points a user would (``main(argv)`` of each module), so the
launcher adds orchestration and nothing else. Every stage is safe to re-run: finished work is skipped and
interrupted work resumes (the converter, the training loop and the sampler all resume by themselves).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from hpc_calo.errors import UserError
from launch.config import PipelineConfig

log = logging.getLogger(__name__)

Main = Callable[[Sequence[str] | None], int | None]


def _call(main: Main, argv: list[str]) -> None:
    log.info("running %s %s", main.__module__, " ".join(argv))
    code = main(argv)
    if code:
        raise RuntimeError(f"{main.__module__} {' '.join(argv)} exited with {code}")


def _mpi_rank_size() -> tuple[int, int]:
    """This process's MPI rank when SLURM or mpiexec started several; (0, 1) otherwise."""
    for rank_var, size_var in (("PMI_RANK", "PMI_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_var in os.environ and size_var in os.environ:
            return int(os.environ[rank_var]), int(os.environ[size_var])
    return 0, 1


def make_synthetic(cfg: PipelineConfig) -> None:
    from data_prep.synth import main as synth

    data = cfg.path("data")
    data.mkdir(parents=True, exist_ok=True)
    n_ref = cfg.showers or max(100, (cfg.synthetic or 0) // 2)
    for name, n, seed in (("train.h5", cfg.synthetic, cfg.seed), ("reference.h5", n_ref, cfg.seed + 1000)):
        if not (data / name).exists():  # the writer is atomic: an existing file is complete
            _call(synth, ["--dataset", cfg.dataset, "--showers", str(n), "--out", str(data / name),
                          "--seed", str(seed)])


def prep(cfg: PipelineConfig, mpi: bool = False) -> None:
    """Synthetic data (when asked) and the Zarr pair store.

    With ``mpi`` the function runs once per MPI rank (srun tasks): rank 0 makes the synthetic data while the
    others wait, then all ranks convert together.
    """
    from data_prep.convert import main as convert

    if cfg.synthetic:
        if mpi:
            from mpi4py import MPI

            if MPI.COMM_WORLD.Get_rank() == 0:
                make_synthetic(cfg)
            MPI.COMM_WORLD.Barrier()
        else:
            make_synthetic(cfg)
    argv = ["--dataset", cfg.dataset, *map(str, cfg.training_files()), "--out", str(cfg.path("store")),
            "--val-fraction", str(cfg.val_fraction)]
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpi and cfg.prep_ranks > 1 and mpiexec.exists():
        # One machine without SLURM: the converter's own MPI mode through the environment's mpiexec.
        cmd = [str(mpiexec), "-n", str(cfg.prep_ranks), sys.executable, "-m", "data_prep.convert", *argv]
        log.info("running %s", " ".join(cmd))
        subprocess.run(cmd, check=True)
    else:
        _call(convert, argv)


def _budget_argv(cfg: PipelineConfig, flow: int, student: bool = False) -> list[str]:
    return [a for unit, n in cfg.budget_for(flow, student).items()
            for a in (f"--{unit}", str(n if unit == "minutes" else int(n)))]


def _train_argv(cfg: PipelineConfig, flow: int) -> list[str]:
    argv = ["--flow", str(flow), "--store", str(cfg.path("store")), "--preset", cfg.preset,
            "--out", str(cfg.path("run")), "--seed", str(cfg.seed), *_budget_argv(cfg, flow)]
    if cfg.resources.gpus_per_node:
        argv += ["--device", "cuda"]
    return argv


def _ray_argv(cfg: PipelineConfig, address: str | None) -> list[str]:
    argv = ["--workers", str(cfg.workers)]
    if address:
        argv += ["--address", address]
    if cfg.resources.gpus_per_node:
        argv += ["--gpus-per-worker", "1"]
    return argv


def teacher(cfg: PipelineConfig, address: str | None = None) -> None:
    """Flows 1 and 2 on one worker; flow-3 (the big one) through Ray Train when there are several workers."""
    from hpc_calo.train.__main__ import main as train

    for flow in (1, 2, 3):
        argv = _train_argv(cfg, flow)
        if flow == 3 and (cfg.workers > 1 or address):
            argv += _ray_argv(cfg, address)
        _call(train, argv)


def student(cfg: PipelineConfig, address: str | None = None) -> None:
    """Students for flows 2 and 3 by probability density distillation from the frozen teachers."""
    from hpc_calo.distill.__main__ import main as distill

    for flow in (2, 3):
        argv = ["--run", str(cfg.path("run")), "--flow", str(flow), "--store", str(cfg.path("store")),
                "--seed", str(cfg.seed), *_budget_argv(cfg, flow, student=True)]
        if flow == 3 and (cfg.workers > 1 or address):
            argv += _ray_argv(cfg, address)
        _call(distill, argv)


def sample(cfg: PipelineConfig, mpi: bool = False, address: str | None = None) -> None:
    """Bulk production with the reference file's incident energies (the standard evaluation protocol)."""
    from hpc_calo.io import CaloFile
    from hpc_calo.sample.__main__ import main as sample_main

    out = cfg.path("production")
    if out.exists():
        log.info("%s exists: sampling already done", out)
        return
    with CaloFile(cfg.reference_file()) as ref:
        n = cfg.showers or ref.n
    backend = "mpi" if mpi else cfg.sample_backend
    argv = ["--run", str(cfg.path("run")), "--showers", str(n), "--out", str(out), "--backend", backend,
            "--energies", str(cfg.reference_file()), "--seed", str(cfg.seed)]
    if backend == "ray":
        argv += ["--workers", str(cfg.sample_workers)] + (["--address", address] if address else [])
    if backend == "mpi" and not mpi:
        mpiexec = Path(sys.executable).parent / "mpiexec"
        cmd = [str(mpiexec), "-n", str(cfg.sample_workers), sys.executable, "-m", "hpc_calo.sample", *argv]
        log.info("running %s", " ".join(cmd))
        subprocess.run(cmd, check=True)
        return
    if backend == "local" and cfg.sample_workers > 1:
        argv += ["--workers", str(cfg.sample_workers)]
    _call(sample_main, argv)


def evaluate(cfg: PipelineConfig) -> Path:
    from hpc_calo.evaluate.__main__ import main as evaluate_main
    from hpc_calo.io import CaloFile

    report = cfg.path("report")
    gen, ref = cfg.path("production"), cfg.reference_file()
    with CaloFile(gen) as g, CaloFile(ref) as r:
        n_gen, n_ref = g.n, r.n
    if n_gen != n_ref:
        raise UserError(f"{gen} has {n_gen} showers but the reference {ref} has {n_ref}: the classifier "
                        "test needs equal sizes (leave --showers unset to match the reference)")
    _call(evaluate_main, [str(gen), str(ref), "--dataset", cfg.dataset, "--out", str(report),
                          "--epochs", str(cfg.eval_epochs), "--seed", str(cfg.seed)])
    return report
