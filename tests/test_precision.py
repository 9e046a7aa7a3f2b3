"""Precision names: every CLI choice resolves to a (model dtype, student GEMM dtype) pair."""

from __future__ import annotations

import pytest
import torch

from hpc_calo.precision import PRECISIONS, resolve


def test_every_precision_resolves() -> None:
    assert {name: resolve(name) for name in PRECISIONS} == {
        "float32": (torch.float32, None),
        "float64": (torch.float64, None),
        "bf16": (torch.float32, torch.bfloat16),  # bf16 GEMMs only; the model and splines stay float32
    }
    with pytest.raises(KeyError):
        resolve("float16")
