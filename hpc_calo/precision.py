"""Sampling precisions by name; torch-free at import so that CLIs can list them without loading torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PRECISIONS = ("float32", "float64", "bf16")
PRECISION_HELP = ("float32 (default), float64, or bf16: float32 with the student GEMMs in bf16, the splines in "
                  "float32 (faster where the hardware has bf16 units; its fidelity cost is in BENCHMARKS.md)")


def resolve(name: str) -> tuple[torch.dtype, torch.dtype | None]:
    """(model dtype, student GEMM dtype or None) for a precision name."""
    import torch

    table = {"float32": (torch.float32, None), "float64": (torch.float64, None),
             "bf16": (torch.float32, torch.bfloat16)}
    return table[name]
