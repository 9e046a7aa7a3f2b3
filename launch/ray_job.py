"""Entry point for ``ray job submit``: the pipeline's stages on an existing Ray cluster.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m launch.ray_job --dataset ds3 --stage all --data ... --reference ... --out /shared/run

The driver runs where Ray puts the job; training attaches Ray Train to the cluster and the sampler fans out
over Ray actors. ``--out`` must be on storage every node sees.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from hpc_calo.errors import run_cli
from launch import stages
from launch.config import STAGES
from launch.submit import build_parser, config_from_args


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    parser.prog = "python -m launch.ray_job"
    parser.set_defaults(cluster="local")
    for action in parser._actions:
        if action.dest == "cluster":
            action.required = False
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.sample_backend is None:
        args.sample_backend = "ray"
    cfg = config_from_args(args)
    # Inside `ray job submit` Ray sets RAY_ADDRESS; "auto" also finds a head started on this machine.
    address = os.environ.get("RAY_ADDRESS", "auto")
    selected = list(STAGES) if args.stage == "all" else [args.stage]
    if args.dry_run:
        print(f"would run on the Ray cluster at {address}: {' -> '.join(selected)}; run folder {cfg.root}")
        return 0
    cfg.save()
    for stage in selected:
        print(f"== {stage} ==", flush=True)
        if stage in ("teacher", "student"):
            getattr(stages, stage)(cfg, address=address)
        elif stage == "sample":
            stages.sample(cfg, address=address)
        else:
            getattr(stages, stage)(cfg)
    print(f"production file: {cfg.path('production')}")
    print(f"report:          {cfg.path('report') / 'report.md'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
