"""``python -m hpc_calo.train``: train one iCaloFlow flow on a Zarr pair store, resumably.

The command is split so that other launchers reuse it: :func:`build_job` turns arguments into a :class:`Job`
(model factory, loader factory per rank, config, output folder), :meth:`Job.prepare` checks and writes the
run folder once (on the driver / rank 0), and :func:`run_local` runs the one training loop in this process.
The Ray path adds ``--workers`` and calls ``fit`` per worker with the same Job.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import hpc_calo
from hpc_calo.atomic import atomic_path
from hpc_calo.data.store import ShardedLoader, open_store
from hpc_calo.errors import UserError, run_cli
from hpc_calo.flags import non_negative_int, number, positive_float, positive_int
from hpc_calo.flows.presets import PRESETS, Preset, get_preset
from hpc_calo.geometry import Geometry
from hpc_calo.models import FlowModel, flow_meta
from hpc_calo.outputs import refuse_inputs, writable_parent
from hpc_calo.train.checkpoint import RUN_FILE, RUN_FORMAT, check_meta, load_checkpoint, read_run
from hpc_calo.train.config import DTYPES, TrainConfig
from hpc_calo.train.distributed import add_ray_arguments, ray_config, run_ray
from hpc_calo.train.loop import CHECKPOINT, fit

KINDS = {1: "energies", 2: "layer0", 3: "pairs"}
# Share of --memory-gb given to the training loader; the validation loader gets the rest.
TRAIN_MEMORY_SHARE = 0.8


def flow_dir_name(flow: int, student: bool = False) -> str:
    return f"flow{flow}" + ("_student" if student else "")


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"hpc_calo": hpc_calo.__version__, "torch": torch.__version__, "nflows": version("nflows")}


@dataclass
class Job:
    """Everything one training job needs, independent of how many workers run it."""

    flow: int
    preset: str
    store_path: Path
    geometry: Geometry
    run_dir: Path
    cfg: TrainConfig
    memory_gb: float = 2.0
    student: bool = False
    energy_range: tuple[float, float] = (1e3, 1e6)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def out_dir(self) -> Path:
        return self.run_dir / flow_dir_name(self.flow, self.student)

    def make_model(self) -> FlowModel:
        """The same initial weights on every rank (seeded), in the configured dtype (not yet on the device)."""
        torch.manual_seed(self.cfg.seed)
        model = FlowModel.from_preset(self.flow, self.geometry, self.preset, self.student)
        return model.to(self.cfg.torch_dtype)

    def model_meta(self) -> dict[str, Any]:
        spec = get_preset(self.preset).spec(self.flow, self.geometry, self.student)
        return flow_meta(self.flow, self.geometry, spec, self.student, self.preset)

    def make_loaders(
        self, rank: int = 0, world_size: int = 1, memory_gb: float | None = None
    ) -> tuple[ShardedLoader, ShardedLoader | None]:
        """This rank's (train, val) loaders; the per-worker batch is the global batch // world_size."""
        store = open_store(self.store_path, self.geometry)
        budget = self.memory_gb if memory_gb is None else memory_gb
        b = self.cfg.per_worker_batch(world_size)
        kind = KINDS[self.flow]
        train = ShardedLoader(store, "train", kind, b, rank, world_size, budget * TRAIN_MEMORY_SHARE, self.cfg.seed)
        val = None
        if store.n_val >= world_size:
            val = ShardedLoader(store, "val", kind, b, rank, world_size, budget * (1 - TRAIN_MEMORY_SHARE),
                                self.cfg.seed)
        return train, val

    def run_record(self) -> dict[str, Any]:
        return {
            "format": RUN_FORMAT,
            "dataset": self.geometry.name,
            "preset": self.preset,
            "store": str(self.store_path.resolve()),
            "energy_range": list(self.energy_range),
            "versions": versions(),
        }

    def describe(self) -> str:
        return f"{self.geometry.name} preset {self.preset}"

    def prepare(self) -> None:
        """Check the run folder against this job and write run.json / config.json (driver or rank 0 only)."""
        refuse_inputs(self.run_dir, [self.store_path])
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise UserError(f"{self.run_dir}: exists and is not a run folder; remove it or choose another --out")
        if not self.run_dir.exists():
            writable_parent(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        run_file = self.run_dir / RUN_FILE
        record = self.run_record()
        if run_file.exists():
            old = read_run(self.run_dir)
            # The flows of one run condition on each other's outputs: they must see the same data.
            for key in ("dataset", "preset", "store"):
                if old.get(key) != record[key]:
                    raise UserError(
                        f"{run_file}: this run folder holds a {key} {old.get(key)!r} run, not {record[key]!r}; "
                        + (f"pass --store {old.get(key)} or " if key == "store" else "") + "choose another --out"
                    )
            # Keep the widest energy range any flow was trained on (they share one store normally).
            lo, hi = old.get("energy_range", record["energy_range"])
            record["energy_range"] = [min(lo, self.energy_range[0]), max(hi, self.energy_range[1])]
        ckpt = self.out_dir / CHECKPOINT
        if ckpt.exists():  # refuse a checkpoint of another flow / preset / dataset before touching anything
            check_meta(ckpt, load_checkpoint(ckpt).get("meta", {}), self.model_meta())
        _write_json(run_file, record)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _write_json(self.out_dir / "config.json", {
            "flow": self.flow, "student": self.student, "preset": self.preset, "dataset": self.geometry.name,
            "store": str(self.store_path.resolve()), "memory_gb": self.memory_gb, "train": self.cfg.to_dict(),
            **self.extra,
        })


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hpc_calo.train",
        description=(
            "Train one iCaloFlow teacher flow on a Zarr pair store. The model, optimiser and RNG state are "
            "checkpointed in RUN_DIR/flow<k>/; re-running the same command resumes where it stopped."
        ),
    )
    p.add_argument("--flow", type=int, required=True, choices=(1, 2, 3),
                   help="1: layer energies | E_inc; 2: layer-0 shape; 3: layer n shape | layer n-1")
    p.add_argument("--store", type=Path, required=True, help="pair store made by python -m data_prep.convert")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS),
                   help="architecture and training defaults (ds2/ds3: the reference sizes, their dataset only)")
    p.add_argument("--out", type=Path, required=True, help="run folder shared by the three flows (RUN_DIR)")
    add_training_arguments(p)
    return p


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
    p.add_argument("--seed", type=non_negative_int("--seed"), default=0,
                   help="seed of initial weights, noise and shuffling (default 0)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="training device (default cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="precision (default float32)")
    p.add_argument("--checkpoint-every", type=positive_int("--checkpoint-every"), default=500,
                   help="steps between mid-epoch checkpoints; one is also written at every epoch end and when "
                        "SIGTERM/SIGINT stops a single-process run (default 500)")
    p.add_argument("--log-every", type=positive_int("--log-every"), default=50,
                   help="steps between progress lines (default 50)")
    p.add_argument("--threads", type=non_negative_int("--threads"), default=0,
                   help="torch CPU threads, 0: torch's default (default 0)")
    p.add_argument("--memory-gb", type=positive_float("--memory-gb"), default=2.0,
                   help="memory budget of the data loaders in GB: preload the share if it fits, else stream")
    p.add_argument("--max-steps", type=positive_int("--max-steps"), default=None,
                   help="stop after this global step (smoke tests)")
    add_ray_arguments(p)


def train_config(args: argparse.Namespace, preset: Preset, name: str, student: bool = False) -> TrainConfig:
    """The TrainConfig of a command line: flags where given, else the preset's defaults for the flow."""
    def given(value: Any, default: Any) -> Any:
        return default if value is None else value

    return TrainConfig(
        epochs=given(args.epochs, preset.default_epochs(args.flow, student)),
        steps=args.steps,
        minutes=args.minutes,
        batch_size=given(args.batch_size, preset.batch_size),
        max_lr=given(args.lr, preset.max_lr[args.flow]),
        grad_clip=args.grad_clip,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        dtype=args.dtype,
        device=args.device,
        num_threads=args.threads,
        max_steps=args.max_steps,
        name=name,
    )


def build_job(args: argparse.Namespace) -> Job:
    """Validate the arguments against the store and preset; no file is written here."""
    store = open_store(args.store)
    geometry = store.geometry
    preset = get_preset(args.preset)
    preset.spec(args.flow, geometry)  # raises for a preset bound to another dataset
    cfg = train_config(args, preset, f"flow-{args.flow}")
    energy_range = store.energy_range()
    return Job(args.flow, args.preset, Path(args.store), geometry, Path(args.out), cfg, args.memory_gb,
               energy_range=energy_range)


def run_local(job: Job) -> dict[str, Any]:
    """The single-worker path: this process is rank 0 of 1."""
    job.prepare()
    train, val = job.make_loaders(0, 1)
    print(f"[{job.cfg.name}] {job.describe()}: {len(train)} steps/epoch, budget {job.cfg.budget()}, "
          f"batch {job.cfg.batch_size}, loader {train.mode} -> {job.out_dir}", file=sys.stderr)
    return fit(job.make_model(), train, val, job.cfg, job.out_dir)


def execute(job: Job, args: argparse.Namespace) -> int:
    """Run a training or distillation job here or through Ray Train, and print its summary as JSON."""
    ray_cfg = ray_config(args)
    result = run_local(job) if ray_cfg is None else run_ray(job, ray_cfg)
    print(json.dumps({k: (v if not isinstance(v, float) or np.isfinite(v) else None) for k, v in result.items()}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return execute(build_job(args), args)


if __name__ == "__main__":
    run_cli(main)
