"""Full training state on disk: written atomically, read back with a clear error when it does not fit."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from hpc_calo.errors import UserError
from hpc_calo.torchfile import load_versioned, save_versioned

CHECKPOINT_FORMAT = "hpc-calo-checkpoint"
CHECKPOINT_VERSION = 1


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from (torch CPU and CUDA, numpy's global, Python's)."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    save_versioned(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, state)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    # RNG states hold numpy arrays and Python tuples: full unpickling of our own file.
    return load_versioned(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "training checkpoint", weights_only=False)


def check_meta(path: str | os.PathLike[str], saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint of another dataset / flow / preset / architecture into this model."""
    first = ("kind", "dataset", "flow", "student", "preset")  # the most telling difference is named
    for key in sorted(set(saved) | set(current), key=lambda k: (first.index(k) if k in first else len(first), k)):
        if saved.get(key) != current.get(key):
            raise UserError(
                f"{path}: checkpoint has {key}={saved.get(key)!r} but this run has {key}={current.get(key)!r}; "
                "use another --out directory or remove the old run"
            )

