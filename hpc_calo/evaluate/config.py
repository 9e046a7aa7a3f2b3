"""Typed configuration of one evaluation run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hpc_calo.errors import UserError
from hpc_calo.seeding import DEFAULT_SEED

METRICS = ("hist", "cls-low", "cls-high", "cls-boost", "fpd")
METRIC_HELP = {
    "hist": "high-level feature histograms with the official binnings: separation power and chi2/NDF, "
    "plus the voxel-energy distribution (one extra pass over REF)",
    "cls-low": "DNN classifier on the voxels (log10 E_inc and voxels / E_inc), AUC and JSD",
    "cls-high": "DNN classifier on the 362 high-level features, AUC and JSD",
    "cls-boost": "gradient-boosted trees on the high-level features with energies relative to E_inc: sees what the "
    "official DNN tests miss at a few thousand showers; AUC and JSD, and the AUC on each feature group alone",
    "fpd": "Frechet and kernel physics distances (FPD, KPD) on the 362 high-level features",
}


@dataclass(frozen=True)
class EvaluateRequest:
    gen: Path
    ref: Path
    dataset: str
    out: Path
    metrics: tuple[str, ...] = METRICS
    device: str = "cpu"
    epochs: int = 50
    seed: int = DEFAULT_SEED
    threads: int = 0  # torch CPU threads of the classifiers; 0: governed (hpc_calo.cpus.ThreadGovernor)
    cls_hidden: int = 2048
    cls_batch: int = 1000
    buffer_mb: int = 512
    plots: bool = True
    block_size: int | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [m for m in self.metrics if m not in METRICS]
        if bad:
            raise UserError(f"--metrics: unknown {', '.join(bad)}; choose from {', '.join(METRICS)}")
        if self.cls_hidden < 1 or self.cls_batch < 1:
            raise UserError("--cls-hidden and --cls-batch must be >= 1")
        if self.threads < 0:
            raise UserError(f"--threads must be >= 0, not {self.threads}")
        if self.epochs < 1:
            raise UserError(f"--epochs: must be >= 1, got {self.epochs}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise UserError(f"--device: choose cpu or cuda, got {self.device!r}")
