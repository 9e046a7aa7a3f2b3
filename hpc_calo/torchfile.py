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


def load_versioned(path: str | os.PathLike[str], fmt: str, version: int, what: str) -> dict[str, Any]:
    """The dict saved by :func:`save_versioned`; ``what`` names the kind of file in the error messages.

    Tensors and plain values only (``weights_only=True``): a crafted file in a run folder must not run code
    when it is loaded, so everything hpc-calo saves is made of those.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling failure means a corrupt (or foreign) file
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{path}: {what} cannot be read (truncated, corrupt or not made by hpc-calo: only tensors "
                        f"and plain values are loaded): {reason}") from None
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        raise UserError(f"{path}: not an hpc-calo {what}")
    if obj.get("version") != version:
        raise UserError(f"{path}: {what} version {obj.get('version')}, this hpc-calo reads {version}")
    return obj
