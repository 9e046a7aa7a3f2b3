"""Training as a library: a typed :class:`TrainRequest` in, :func:`train` runs it.

:func:`build_job` turns a request into a :class:`Job` (model factory, loader factory per rank, config, output
folder), :meth:`Job.prepare` checks and writes the run folder once (on the driver / rank 0), and
:func:`run_job` runs THE training loop here or, with a :class:`RayConfig`, on Ray Train workers with the same
Job. The distillation (``hpc_calo.distill.job``) reuses all of it with its own Job.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import hpc_calo
from hpc_calo import rundir
from hpc_calo.data.store import ShardedLoader, open_store
from hpc_calo.errors import UserError
from hpc_calo.flags import noise_kev
from hpc_calo.flows.presets import Preset, get_preset
from hpc_calo.geometry import Geometry
from hpc_calo.models import FlowModel, flow_meta
from hpc_calo.outputs import refuse_inputs, writable_parent
from hpc_calo.preprocess import NOISE_MEV
from hpc_calo.seeding import DEFAULT_SEED
from hpc_calo.train.checkpoint import check_meta, load_checkpoint
from hpc_calo.train.config import TrainConfig
from hpc_calo.train.distributed import RayConfig, run_ray
from hpc_calo.train.loop import finished, fit


@dataclass(frozen=True)
class TrainingOptions:
    """The optimisation, precision, device and data-budget choices shared by training and distillation.

    None means "the preset's value for this flow"."""

    epochs: int | None = None
    steps: int | None = None  # budget in optimiser steps instead of epochs
    minutes: float | None = None  # budget in minutes of training instead of epochs
    batch_size: int | None = None  # GLOBAL batch, split evenly over workers
    lr: float | None = None
    grad_clip: float = 5.0
    seed: int = DEFAULT_SEED
    device: str = "cpu"
    dtype: str = "float32"
    amp: str = "off"  # GPU only: tf32 or bf16 autocast
    checkpoint_every: int = 500
    log_every: int = 50
    threads: int = 0  # torch CPU threads; 0: the CPUs this process owns
    memory_gb: float = 2.0
    max_steps: int | None = None

    def __post_init__(self) -> None:
        if self.memory_gb <= 0:
            raise UserError(f"--memory-gb must be positive, not {self.memory_gb}")
        if self.threads < 0:
            raise UserError(f"--threads must be >= 0, not {self.threads}")


@dataclass(frozen=True)
class TrainRequest:
    """Train teacher flow ``flow`` of a run folder ``out`` on a pair store; ``ray`` None: in this process."""

    flow: int
    store: Path
    preset: str
    out: Path
    options: TrainingOptions = field(default_factory=TrainingOptions)
    ray: RayConfig | None = None
    noise_kev: float | None = None  # dequantisation noise width; None: the preset's

    def __post_init__(self) -> None:
        if self.flow not in (1, 2, 3):
            raise UserError(f"--flow must be 1, 2 or 3, not {self.flow}")
        if self.noise_kev is not None:
            noise_kev(self.noise_kev)


KINDS = {1: "energies", 2: "layer0", 3: "pairs"}
# Share of --memory-gb given to the training loader; the validation loader gets the rest.
TRAIN_MEMORY_SHARE = 0.8


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
    noise_mev: float = NOISE_MEV  # dequantisation noise width of the model (resolved from request and preset)
    nonempty_targets: bool = True  # flow-3: learn the non-empty targets only (``prepare`` keeps a checkpoint's choice)

    @property
    def out_dir(self) -> Path:
        return rundir.flow_dir(self.run_dir, self.flow, self.student)

    def make_model(self) -> FlowModel:
        """The same initial weights on every rank (seeded), in the configured dtype (not yet on the device)."""
        torch.manual_seed(self.cfg.seed)
        model = FlowModel.from_preset(self.flow, self.geometry, self.preset, self.student, self.noise_mev,
                                      self.nonempty_targets)
        return model.to(self.cfg.torch_dtype)

    def model_meta(self) -> dict[str, Any]:
        preset = get_preset(self.preset)
        spec = preset.spec(self.flow, self.geometry, self.student)
        return flow_meta(self.flow, self.geometry, spec, self.student, self.preset, preset.energies, self.noise_mev,
                         self.nonempty_targets)

    def make_loaders(
        self, rank: int = 0, world_size: int = 1, memory_gb: float | None = None, pin: bool | None = None
    ) -> tuple[ShardedLoader, ShardedLoader | None]:
        """This rank's (train, val) loaders; the per-worker batch is the global batch // world_size.

        ``pin`` (default: training on CUDA) hands out page-locked batches, so host-to-device copies are
        asynchronous."""
        store = open_store(self.store_path, self.geometry)
        budget = self.memory_gb if memory_gb is None else memory_gb
        b = self.cfg.per_worker_batch(world_size)
        kind = KINDS[self.flow]
        pin = self.cfg.device == "cuda" if pin is None else pin
        train = ShardedLoader(store, "train", kind, b, rank, world_size, budget * TRAIN_MEMORY_SHARE, self.cfg.seed,
                              pin_memory=pin)
        val = None
        if store.n_val >= world_size:
            val = ShardedLoader(store, "val", kind, b, rank, world_size, budget * (1 - TRAIN_MEMORY_SHARE),
                                self.cfg.seed, pin_memory=pin)
        return train, val

    def run_record(self) -> dict[str, Any]:
        return {
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
        run_file = rundir.run_file(self.run_dir)
        record = self.run_record()
        if run_file.exists():
            old = rundir.read_run(self.run_dir)
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
        ckpt = rundir.checkpoint_in(self.out_dir)
        if ckpt.exists():  # refuse a checkpoint of another flow / preset / dataset before touching anything
            saved = load_checkpoint(ckpt).get("meta", {})
            if self.flow == 3 and not self.student:  # one from before the non-empty-target choice: every pair
                self.nonempty_targets = saved.get("targets") == "nonempty"
            check_meta(ckpt, saved, self.model_meta())
        rundir.write_run(self.run_dir, record)
        rundir.write_json(rundir.config_in(self.out_dir), {
            "flow": self.flow, "student": self.student, "preset": self.preset, "dataset": self.geometry.name,
            "store": str(self.store_path.resolve()), "memory_gb": self.memory_gb, "train": self.cfg.to_dict(),
            **self.extra,
        })


def train_config(opts: TrainingOptions, preset: Preset, flow: int, name: str, student: bool = False) -> TrainConfig:
    """The TrainConfig of a request: options where given, else the preset's defaults for the flow."""
    def given(value: Any, default: Any) -> Any:
        return default if value is None else value

    # Any budget the request names replaces the preset's whole budget for the flow (its epochs and steps).
    own_budget = any(v is not None for v in (opts.epochs, opts.steps, opts.minutes))
    return TrainConfig(
        epochs=given(opts.epochs, preset.default_epochs(flow, student)),
        steps=opts.steps if own_budget else preset.default_steps(flow, student),
        minutes=opts.minutes,
        batch_size=given(opts.batch_size, preset.batch_size),
        max_lr=given(opts.lr, preset.max_lr[flow]),
        grad_clip=opts.grad_clip,
        seed=opts.seed,
        checkpoint_every=opts.checkpoint_every,
        log_every=opts.log_every,
        dtype=opts.dtype,
        device=opts.device,
        amp=opts.amp,
        num_threads=opts.threads,
        max_steps=opts.max_steps,
        name=name,
    )


def build_job(req: TrainRequest) -> Job:
    """Validate the request against the store and preset; no file is written here."""
    store = open_store(req.store)
    geometry = store.geometry
    preset = get_preset(req.preset)
    preset.spec(req.flow, geometry)  # raises for a preset bound to another dataset
    cfg = train_config(req.options, preset, req.flow, f"flow-{req.flow}")
    return Job(req.flow, req.preset, Path(req.store), geometry, Path(req.out), cfg, req.options.memory_gb,
               energy_range=store.energy_range(),
               noise_mev=preset.noise_mev if req.noise_kev is None else req.noise_kev * 1e-3)


def run_local(job: Job) -> dict[str, Any]:
    """The single-worker path: this process is rank 0 of 1."""
    job.prepare()
    done = finished(job.cfg, job.out_dir)
    if done is not None:
        return done
    train, val = job.make_loaders(0, 1)
    print(f"[{job.cfg.name}] {job.describe()}: {len(train)} steps/epoch, budget {job.cfg.budget()}, "
          f"batch {job.cfg.batch_size}, loader {train.mode} on {job.cfg.device} -> {job.out_dir}", file=sys.stderr)
    return fit(job.make_model(), train, val, job.cfg, job.out_dir)


def run_job(job: Job, ray: RayConfig | None) -> dict[str, Any]:
    """Run a training or distillation job here or through Ray Train; the summary with non-finite values as None."""
    result = run_local(job) if ray is None else run_ray(job, ray)
    return {k: (v if not isinstance(v, float) or np.isfinite(v) else None) for k, v in result.items()}


def train(req: TrainRequest) -> dict[str, Any]:
    """Train one teacher flow (resumes a run folder's checkpoint); returns the training summary."""
    return run_job(build_job(req), req.ray)
