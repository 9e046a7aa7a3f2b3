"""Training: the one loop (``fit``), its config and checkpoints, and the ``python -m hpc_calo.train`` CLI."""

from hpc_calo.train.config import TrainConfig
from hpc_calo.train.loop import fit

__all__ = ["TrainConfig", "fit"]
