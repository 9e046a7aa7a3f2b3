"""``python -m hpc_calo.train``: train one iCaloFlow flow on a Zarr pair store, resumably.

The command parses its flags into a :class:`hpc_calo.train.job.TrainRequest` and calls
:func:`hpc_calo.train.job.train`; launchers build the request themselves.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from hpc_calo.errors import run_cli
from hpc_calo.flags import noise_kev
from hpc_calo.flows.presets import PRESETS
from hpc_calo.train.args import add_training_arguments, ray_config, training_options
from hpc_calo.train.job import TrainRequest, train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hpc_calo.train",
        description=(
            "Train one iCaloFlow teacher flow on a Zarr pair store. The model, optimiser and RNG state are "
            "checkpointed in RUN_DIR/flow<k>/; re-running the same command resumes where it stopped."
        ),
    )
    p.add_argument("--flow", type=int, required=True, choices=(1, 2, 3),
                   help="1: layer energies | E_inc; 2: layer-0 shape; 3: layer n shape | layer n-1")
    p.add_argument("--store", type=Path, required=True, help="pair store made by python -m data_prep.convert")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS),
                   help="architecture and training defaults (ds2/ds3: the reference sizes, their dataset only)")
    p.add_argument("--out", type=Path, required=True, help="run folder shared by the three flows (RUN_DIR)")
    p.add_argument("--noise-kev", type=noise_kev, default=None,
                   help="width of the uniform dequantisation noise added to every voxel and layer energy, keV "
                        "(default: the preset's: 0.5 for small and quickstart, the reference's 5 otherwise); kept "
                        "in the model file, used again at generation; the students take their teacher's")
    add_training_arguments(p)
    return p


def parse_request(argv: Sequence[str] | None = None) -> TrainRequest:
    args = build_parser().parse_args(argv)
    return TrainRequest(flow=args.flow, store=args.store, preset=args.preset, out=args.out,
                        options=training_options(args), ray=ray_config(args), noise_kev=args.noise_kev)


def main(argv: Sequence[str] | None = None) -> int:
    print(json.dumps(train(parse_request(argv))))
    return 0


if __name__ == "__main__":
    run_cli(main)
