"""Full training state on disk: written atomically, read back with a clear error when it does not fit."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpc_calo.atomic import atomic_path
from hpc_calo.errors import UserError

CHECKPOINT_FORMAT = "hpc-calo-checkpoint"
CHECKPOINT_VERSION = 1
RUN_FILE = "run.json"
RUN_FORMAT = "hpc-calo-run"


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
    obj = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(path)
    try:
        # Tensors and plain types only: a crafted file in a run folder must not run code when resumed.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling failure means a corrupt (or foreign) file
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{path}: checkpoint cannot be read (truncated, corrupt or not made by hpc-calo: only "
                        f"tensors and plain values are loaded): {reason}") from None
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not an hpc-calo training checkpoint")
    if obj.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"{path}: checkpoint version {obj.get('version')}, this hpc-calo reads {CHECKPOINT_VERSION}")
    return obj


def check_meta(path: str | os.PathLike[str], saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint of another dataset / flow / preset / architecture into this model."""
    first = ("kind", "dataset", "flow", "student", "preset")  # the most telling difference is named
    for key in sorted(set(saved) | set(current), key=lambda k: (first.index(k) if k in first else len(first), k)):
        if saved.get(key) != current.get(key):
            raise UserError(
                f"{path}: checkpoint has {key}={saved.get(key)!r} but this run has {key}={current.get(key)!r}; "
                "use another --out directory or remove the old run"
            )


def read_run(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The run record ``RUN_DIR/run.json`` (dataset, preset, store, energy range, versions)."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise UserError(f"{run_dir}: not a run folder (no {RUN_FILE}; train the flows with python -m hpc_calo.train)")
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable run record: {err}") from None
    if not isinstance(obj, dict) or obj.get("format") != RUN_FORMAT:
        raise UserError(f"{path}: not an hpc-calo run record")
    return obj
