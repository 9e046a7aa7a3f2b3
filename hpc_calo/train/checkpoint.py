"""Full training state on disk: written atomically, read back with a clear error when it does not fit."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from hpc_calo.errors import UserError
from hpc_calo.preprocess import NOISE_MEV
from hpc_calo.torchfile import load_versioned, save_versioned

CHECKPOINT_FORMAT = "hpc-calo-checkpoint"
CHECKPOINT_VERSION = 1


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from (torch CPU and CUDA, numpy's global, Python's).

    As tensors and plain types only, so that checkpoints load with ``weights_only=True``.
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, mt, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    save_versioned(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, state)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    return load_versioned(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "training checkpoint")


def _noise_mismatch(path: str | os.PathLike[str], saved: dict[str, Any], current: dict[str, Any]) -> str:
    # Absent from the metadata means the default width (files made before the setting existed).
    kev = {k: 1e3 * (m.get("noise_mev") or NOISE_MEV) for k, m in (("saved", saved), ("current", current))}
    return (f"{path}: checkpoint was trained with {kev['saved']:g} keV of dequantisation noise but this run asks "
            f"for {kev['current']:g} keV; resume with --noise-kev {kev['saved']:g} or use another --out directory")


# A mismatch whose remedy is a flag: its message names the flag (the others name the key and its two values).
_MISMATCH = {"noise_mev": _noise_mismatch}


def check_meta(path: str | os.PathLike[str], saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint of another dataset / flow / preset / architecture into this model."""
    first = ("kind", "dataset", "flow", "student", "preset")  # the most telling difference is named
    for key in sorted(set(saved) | set(current), key=lambda k: (first.index(k) if k in first else len(first), k)):
        if saved.get(key) == current.get(key):
            continue
        if key in _MISMATCH:
            raise UserError(_MISMATCH[key](path, saved, current))
        raise UserError(f"{path}: checkpoint has {key}={saved.get(key)!r} but this run has {key}={current.get(key)!r}; "
                        "use another --out directory or remove the old run")

