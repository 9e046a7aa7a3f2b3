"""Training configuration: one typed dataclass shared by the single-worker, Ray and distillation paths."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from hpc_calo.errors import UserError

DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Mixed precision on a GPU: off; tf32 (float32 GEMMs on the tensor cores); bf16 (autocast of the forward pass).
AMP_MODES = ("off", "tf32", "bf16")


@dataclass
class TrainConfig:
    """Hyper-parameters and run mechanics of one training job.

    ``batch_size`` is the GLOBAL batch: each of ``world_size`` workers takes ``batch_size // world_size``
    (it must divide evenly), so changing the worker count changes neither the batch the optimiser sees, nor
    the number of steps per epoch, nor the learning-rate schedule (OneCycle over epochs x steps per epoch).
    """

    epochs: int = 10
    # Budgets that replace ``epochs`` when given: a number of optimiser steps (the last epoch may be partial), or
    # minutes of training, turned into steps from the speed of the first STEPS_TO_TIME steps and then fixed.
    steps: int | None = None
    minutes: float | None = None
    batch_size: int = 1000  # global batch, see above
    max_lr: float = 1e-3  # OneCycle peak learning rate
    pct_start: float = 0.3  # fraction of the steps spent warming up (OneCycle)
    grad_clip: float = 5.0  # max global gradient norm; <= 0 disables clipping
    seed: int = 0
    checkpoint_every: int = 500  # steps between mid-epoch checkpoints (plus one at every epoch end)
    log_every: int = 50  # steps between progress lines / metrics records
    dtype: str = "float32"  # or "float64" (the reference precision)
    device: str = "cpu"  # "cpu" or "cuda" (the current CUDA device of the worker)
    amp: str = "off"  # AMP_MODES; GPU only, never a CPU default
    num_threads: int = 0  # torch intra-op threads; 0: the CPUs this process owns (hpc_calo.cpus)
    max_steps: int | None = None  # stop after this global step as if killed (tests, smoke runs)
    name: str = "train"  # prefix of progress lines

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise UserError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise UserError("epochs and batch size must be positive")
        if self.steps is not None and self.steps < 1:
            raise UserError(f"steps must be positive, not {self.steps}")
        if self.minutes is not None and not (self.minutes > 0 and math.isfinite(self.minutes)):
            raise UserError(f"minutes must be positive, not {self.minutes}")
        if not (self.max_lr > 0 and math.isfinite(self.max_lr)):
            raise UserError(f"learning rate must be positive, not {self.max_lr}")
        if self.device not in ("cpu", "cuda"):
            raise UserError(f"device must be cpu or cuda, not {self.device!r}")
        if self.amp not in AMP_MODES:
            raise UserError(f"--amp must be one of {', '.join(AMP_MODES)}, not {self.amp!r}")
        if self.amp != "off" and (self.device != "cuda" or self.dtype != "float32"):
            raise UserError(f"--amp {self.amp} needs --device cuda and --dtype float32")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise UserError("checkpoint_every and log_every must be positive")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def budget(self) -> str:
        """The budget in words, for progress lines."""
        if self.minutes is not None:
            return f"{self.minutes:g} min"
        return f"{self.steps} steps" if self.steps is not None else f"{self.epochs} epochs"

    def per_worker_batch(self, world_size: int) -> int:
        """The rule: the global batch is split evenly over the workers."""
        if self.batch_size % world_size:
            raise UserError(
                f"global batch size {self.batch_size} does not divide over {world_size} workers; "
                f"choose a multiple of {world_size}"
            )
        return self.batch_size // world_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
