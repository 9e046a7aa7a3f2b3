"""Versioned torch files (model files, training checkpoints): written atomically, read back with one clear
error for a missing, corrupt, foreign or newer file."""

from __future__ import annotations

import os
from typing import Any

import torch

from hpc_calo.atomic import atomic_path
from hpc_calo.errors import UserError


def save_versioned(path: str | os.PathLike[str], fmt: str, version: int, content: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save({"format": fmt, "version": version, **content}, tmp)


def load_versioned(
    path: str | os.PathLike[str], fmt: str, version: int, what: str, weights_only: bool = True
) -> dict[str, Any]:
    """The dict saved by :func:`save_versioned`; ``what`` names the kind of file in the error messages.

    ``weights_only=False`` is for files this program wrote itself only (checkpoints hold RNG states, which
    are numpy arrays and Python tuples).
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as err:  # any unpickling failure means a corrupt file
        raise UserError(f"{path}: not a readable {what} (truncated or corrupt): {err}") from None
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        raise UserError(f"{path}: not an hpc-calo {what}")
    if obj.get("version") != version:
        raise UserError(f"{path}: {what} version {obj.get('version')}, this hpc-calo reads {version}")
    return obj
