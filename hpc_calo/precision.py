"""Sampling precisions by name, and the generation options that generate and sample share; torch-free at import
so that CLIs can list them without loading torch."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# name -> (model dtype, student GEMM dtype), as torch attribute names so that this module needs no torch.
_DTYPES: dict[str, tuple[str, str | None]] = {
    "float32": ("float32", None),
    "float64": ("float64", None),
    "bf16": ("float32", "bfloat16"),
}
PRECISIONS = tuple(_DTYPES)
PRECISION_HELP = ("float32 (default), float64, or bf16: float32 with the student GEMMs in bf16, the splines in "
                  "float32 (faster where the hardware has bf16 units; its fidelity cost is in BENCHMARKS.md)")


def resolve(name: str) -> tuple[torch.dtype, torch.dtype | None]:
    """(model dtype, student GEMM dtype or None) for a precision name."""
    import torch

    model, gemm = _DTYPES[name]
    return getattr(torch, model), None if gemm is None else getattr(torch, gemm)


def add_compile_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true",
                   help="run the students' spline under torch.compile: fused into one loop, faster on the CPU "
                        "(BENCHMARKS.md), after a one-time compilation per process (~25 s, ~8 s once cached on "
                        "disk); results differ from the default in the last bits; recorded in the output's "
                        "attributes")


def add_renormalise_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--renormalise", action=argparse.BooleanOptionalAction, default=True,
                   help="scale each generated layer to sum exactly to flow-1's layer energy (default), or, as the "
                        "reference does, multiply the shape flow's output by it unnormalised (--no-renormalise); "
                        "recorded in the output's attributes")
