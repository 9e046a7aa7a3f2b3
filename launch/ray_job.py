"""Entry point for ``ray job submit``: the pipeline's stages on an existing Ray cluster.

    ray job submit --address http://HEAD:8265 --runtime-env launch/runtime_env.yaml -- \\
        python -m launch.ray_job --dataset ds3 --data-dir /shared/calo --out /shared/runs/ds3-ds3

Run from the repository root: the runtime environment ships the checkout and pip-installs it on every node. The
driver runs where Ray puts the job; training attaches Ray Train to the cluster and the sampler fans out over Ray
actors. The data directory and ``--out`` must be on storage every node sees.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

from hpc_calo.errors import run_cli
from launch import stages
from launch.config import STAGES, explain
from launch.submit import DESCRIPTION, add_pipeline_arguments, config_from_args


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.ray_job", description=DESCRIPTION,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_pipeline_arguments(parser)
    # On a Ray cluster production fans out over Ray actors unless asked otherwise.
    parser.set_defaults(sample_backend="ray")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    cfg, sources = config_from_args(args)
    # Inside `ray job submit` Ray sets RAY_ADDRESS; "auto" also finds a head started on this machine.
    address = os.environ.get("RAY_ADDRESS", "auto")
    selected = list(STAGES) if args.stage == "all" else [args.stage]
    print(f"run folder: {cfg.root}", flush=True)
    if args.dry_run:
        print(explain(cfg, sources))
        print(f"would run on the Ray cluster at {address}: {' -> '.join(selected)}")
        return 0
    cfg.save()
    stages.run_stages(cfg, selected, stages.Where(address=address))
    print(f"production file: {cfg.path('production')}")
    print(f"report:          {cfg.path('report') / 'report.md'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
