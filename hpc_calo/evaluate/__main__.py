"""python -m hpc_calo.evaluate GEN.h5 REF.h5 --dataset ds2|ds3 --out REPORT_DIR"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from hpc_calo.errors import run_cli
from hpc_calo.evaluate.config import METRIC_HELP, METRICS, EvaluateRequest
from hpc_calo.evaluate.pipeline import evaluate
from hpc_calo.flags import non_negative_int, positive_int
from hpc_calo.seeding import DEFAULT_SEED


def build_parser() -> argparse.ArgumentParser:
    metrics = "\n".join(f"  {k:10s} {v}" for k, v in METRIC_HELP.items())
    p = argparse.ArgumentParser(
        prog="python -m hpc_calo.evaluate",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compare generated showers (GEN) with reference showers (REF), both CaloChallenge HDF5 files, "
        "using the official CaloChallenge definitions; both files are read block by block. Writes REPORT_DIR "
        "with report.json (every number), report.md (headline table) and PNG figures.",
        epilog=f"metrics:\n{metrics}\n\nAverage showers and profiles are always computed. GEN should be "
        "generated at REF's incident energies; a mismatch is reported (not fatal).",
    )
    p.add_argument("gen", type=Path, help="generated showers (CaloChallenge HDF5)")
    p.add_argument("ref", type=Path, help="reference showers (CaloChallenge HDF5), e.g. dataset_2_2.hdf5")
    p.add_argument("--dataset", required=True, help="ds2 or ds3: the geometry both files must have")
    p.add_argument("--out", required=True, type=Path,
                   help="report directory; an existing one is replaced atomically only if it is an earlier report "
                        "(anything else, or a directory holding GEN or REF, is refused)")
    p.add_argument("--metrics", default=",".join(METRICS), help=f"comma-separated subset of {','.join(METRICS)}")
    p.add_argument("--device", default="cpu", help="cpu or cuda: where the classifiers train (default cpu)")
    p.add_argument("--epochs", type=positive_int("--epochs"), default=50,
                   help="classifier epochs (official: 50)")
    p.add_argument("--seed", type=non_negative_int("--seed"), default=DEFAULT_SEED,
                   help=f"seed for the splits, initialisation, shuffling, FPD/KPD (default {DEFAULT_SEED})")
    p.add_argument("--threads", type=non_negative_int("--threads"), default=0,
                   help="torch CPU threads of the classifiers; 0: the CPUs this process owns less those other "
                        "processes keep busy, looked at again every second")
    p.add_argument("--cls-hidden", type=positive_int("--cls-hidden"), default=2048,
                   help="classifier width (official: 2048)")
    p.add_argument("--cls-batch", type=positive_int("--cls-batch"), default=1000,
                   help="classifier batch size (official: 1000)")
    p.add_argument("--buffer-mb", type=positive_int("--buffer-mb"), default=512,
                   help="classifier shuffle buffer in MiB (bounds memory)")
    p.add_argument("--block-size", type=positive_int("--block-size"), default=None,
                   help="showers per read block (default ~128 MiB)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    cfg = EvaluateRequest(
        gen=a.gen,
        ref=a.ref,
        dataset=a.dataset,
        out=a.out,
        metrics=tuple(m.strip() for m in a.metrics.split(",") if m.strip()),
        device=a.device,
        epochs=a.epochs,
        seed=a.seed,
        threads=a.threads,
        cls_hidden=a.cls_hidden,
        cls_batch=a.cls_batch,
        buffer_mb=a.buffer_mb,
        plots=not a.no_plots,
        block_size=a.block_size,
    )
    r = evaluate(cfg)
    e = r["incident_energies"]
    if not e["ok"]:
        print(f"WARNING: {e['message']}", file=sys.stderr)
    print(f"wrote {cfg.out} (report.md, report.json)")
    return 0


if __name__ == "__main__":
    run_cli(main)
