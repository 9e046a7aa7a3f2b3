"""``python -m hpc_calo.io check FILE --dataset ds2|ds3``: validate a CaloChallenge file."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from hpc_calo.errors import run_cli
from hpc_calo.geometry import DATASETS, get_geometry
from hpc_calo.io.check import check_file


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hpc_calo.io",
        description="Tools for CaloChallenge 2022 HDF5 files (datasets 2 and 3).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser(
        "check",
        help="validate a file and print a one-line summary",
        description=(
            "Check keys, shapes, lengths, NaN/inf, negative energies and the incident-energy range "
            "[1 GeV, 1 TeV], reading the file block by block. Exit 0 and print a summary when valid; "
            "exit 2 with one line naming the problem otherwise."
        ),
    )
    check.add_argument("file", help="CaloChallenge HDF5 file")
    check.add_argument(
        "--dataset", choices=sorted(DATASETS), help="expected dataset (default: inferred from the voxel count)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    geometry = get_geometry(args.dataset) if args.dataset else None
    print(check_file(args.file, geometry).line())
    return 0


if __name__ == "__main__":
    run_cli(main)
