"""``python -m hpc_calo.distill``: train the IAF student of flow 2 or 3 from its trained teacher, resumably.

The teacher is ``RUN_DIR/flow{k}/best.pt``; the student trains in ``RUN_DIR/flow{k}_student/`` through the
same training loop (``hpc_calo.train.loop.fit``) and, with ``--workers``, the same Ray Train path as the
teachers. Its ``best.pt`` is the student with the lowest validation KL; the generation chain picks it up.
The command parses into a :class:`hpc_calo.distill.job.DistillRequest` and calls ``distill``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from hpc_calo.distill.job import DistillRequest, distill
from hpc_calo.errors import run_cli
from hpc_calo.flags import non_negative_int, number
from hpc_calo.train.args import add_training_arguments, ray_config, training_options


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hpc_calo.distill",
        description=(
            "Distil the IAF student of flow 2 or 3 from its trained teacher MAF (Probability Density "
            "Distillation). Writes RUN_DIR/flow<k>_student/ (checkpoint.pt, best.pt = lowest validation KL); "
            "re-running the same command resumes."
        ),
    )
    p.add_argument("--run", type=Path, required=True, help="run folder holding the trained teacher flow<k>/best.pt")
    p.add_argument("--flow", type=int, required=True, choices=(2, 3), help="which flow's student (flow-1 stays a MAF)")
    p.add_argument("--store", type=Path, help="pair store (default: the one recorded in RUN_DIR/run.json)")
    p.add_argument("--beta", type=number(float, "--beta", 0, 1), default=0.5,
                   help="weight of the x-pass; the z-pass gets 1-beta (default 0.5)")
    p.add_argument("--diagnostic-samples", type=non_negative_int("--diagnostic-samples"), default=10_000,
                   help="after distilling, score the best student on this many validation rows: the teacher's "
                        "log-likelihood of student vs teacher samples and a student-vs-teacher classifier AUC "
                        "(written to flow<k>_student/diagnostics.json); 0: skip (default 10000)")
    add_training_arguments(p)
    return p


def parse_request(argv: Sequence[str] | None = None) -> DistillRequest:
    args = build_parser().parse_args(argv)
    return DistillRequest(run=args.run, flow=args.flow, store=args.store, beta=args.beta,
                          diagnostic_samples=args.diagnostic_samples, options=training_options(args),
                          ray=ray_config(args))


def main(argv: Sequence[str] | None = None) -> int:
    print(json.dumps(distill(parse_request(argv))))
    return 0


if __name__ == "__main__":
    run_cli(main)
