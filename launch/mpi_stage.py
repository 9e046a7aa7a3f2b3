"""``mpiexec -n N python -m launch.mpi_stage OUT/config.json STAGE``: one pipeline stage as every rank of an MPI
job on one machine without SLURM. Spawned by ``launch.stages`` only; the saved configuration is the request."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence

from hpc_calo.errors import UserError, run_cli
from launch import stages
from launch.config import PipelineConfig


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[1] not in stages.REGISTRY:
        raise UserError(f"usage: python -m launch.mpi_stage CONFIG.json {{{','.join(stages.REGISTRY)}}}")
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    with open(args[0]) as f:
        cfg = PipelineConfig.from_dict(json.load(f))
    stages.run(args[1], cfg, stages.Where(mpi=True))
    return 0


if __name__ == "__main__":
    run_cli(main)
