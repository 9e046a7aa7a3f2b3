"""The command-line flags shared by ``python -m hpc_calo.train`` and ``python -m hpc_calo.distill``, parsed into
the typed :class:`TrainingOptions` and :class:`RayConfig` of their requests."""

from __future__ import annotations

import argparse

from hpc_calo.flags import non_negative_int, number, positive_float, positive_int
from hpc_calo.seeding import DEFAULT_SEED
from hpc_calo.train.config import AMP_MODES, DTYPES
from hpc_calo.train.distributed import LOADER_MEMORY_SHARE, RayConfig
from hpc_calo.train.job import TrainingOptions


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    """The optimisation, precision, data-budget and Ray flags shared by training and distillation."""
    p.add_argument("--epochs", type=positive_int("--epochs"), help="epochs (default: the preset's for this flow)")
    p.add_argument("--steps", type=positive_int("--steps"),
                   help="budget in optimiser steps instead of epochs (the last epoch may be partial)")
    p.add_argument("--minutes", type=positive_float("--minutes"),
                   help="budget in minutes of training instead of epochs: turned into steps from the speed of the "
                        "first steps. Resuming with a larger budget (any of --epochs/--steps/--minutes) extends the "
                        "run; the learning-rate schedule is re-planned over the new total")
    p.add_argument("--batch-size", type=positive_int("--batch-size"),
                   help="GLOBAL batch size, split evenly over workers (default: the preset's)")
    p.add_argument("--lr", type=positive_float("--lr"),
                   help="OneCycle peak learning rate (default: the preset's for this flow)")
    p.add_argument("--grad-clip", type=number(float, "--grad-clip"), default=5.0,
                   help="max gradient norm, <= 0: off (default 5)")
    p.add_argument("--seed", type=non_negative_int("--seed"), default=DEFAULT_SEED,
                   help=f"seed of initial weights, noise and shuffling (default {DEFAULT_SEED})")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="training device (default cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="precision (default float32)")
    p.add_argument("--amp", default="off", choices=AMP_MODES,
                   help="GPU mixed precision: tf32 (float32 GEMMs on TF32 tensor cores) or bf16 (autocast of the "
                        "forward pass); needs --device cuda and --dtype float32 (default off)")
    p.add_argument("--checkpoint-every", type=positive_int("--checkpoint-every"), default=500,
                   help="steps between mid-epoch checkpoints; one is also written at every epoch end and when "
                        "SIGTERM/SIGINT stops a single-process run (default 500)")
    p.add_argument("--log-every", type=positive_int("--log-every"), default=50,
                   help="steps between progress lines (default 50)")
    p.add_argument("--threads", type=non_negative_int("--threads"), default=0,
                   help="torch CPU threads; 0: the CPUs this process owns less those other processes keep busy, "
                        "looked at again every second (default 0)")
    p.add_argument("--memory-gb", type=positive_float("--memory-gb"), default=2.0,
                   help="memory budget of the data loaders in GB: preload the share if it fits, else stream")
    p.add_argument("--max-steps", type=positive_int("--max-steps"), default=None,
                   help="stop after this global step (smoke tests)")
    add_ray_arguments(p)


def training_options(args: argparse.Namespace) -> TrainingOptions:
    return TrainingOptions(
        epochs=args.epochs, steps=args.steps, minutes=args.minutes, batch_size=args.batch_size, lr=args.lr,
        grad_clip=args.grad_clip, seed=args.seed,
        device=args.device, dtype=args.dtype, amp=args.amp, checkpoint_every=args.checkpoint_every,
        log_every=args.log_every, threads=args.threads, memory_gb=args.memory_gb, max_steps=args.max_steps,
    )


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
    )
