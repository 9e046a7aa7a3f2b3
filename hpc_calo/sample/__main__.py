"""``python -m hpc_calo.sample``: mass-produce showers from a trained run into one CaloChallenge HDF5."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from hpc_calo.errors import run_cli
from hpc_calo.flags import non_negative_int, number, positive_float, positive_int
from hpc_calo.io.hdf5 import MAX_SHOWERS
from hpc_calo.precision import PRECISION_HELP, PRECISIONS, add_compile_argument, add_renormalise_argument
from hpc_calo.sample.backends import BACKENDS, sample
from hpc_calo.sample.job import Launch, Output, SampleRequest
from hpc_calo.sample.plan import Request
from hpc_calo.seeding import DEFAULT_SEED


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hpc_calo.sample",
        description=(
            "Generate N showers with a trained run, split into shards that workers generate in parallel "
            "(parts written to a parts directory), then gather them into one CaloChallenge HDF5. The output is "
            "bit-identical for the same request whatever the backend and worker count (same device and dtype). "
            "Re-running the same command after a crash generates only the missing shards."
        ),
    )
    p.add_argument("--run", required=True, type=Path, help="run directory (run.json, flow*/best.pt)")
    p.add_argument("--showers", required=True, type=number(int, "--showers", 1, MAX_SHOWERS),
                   help=f"number of showers N to produce (at most {MAX_SHOWERS:.0e}); refused up front when the "
                   "parts and the output would not fit in the free space")
    p.add_argument("--out", required=True, type=Path, help="output CaloChallenge HDF5 file")
    p.add_argument(
        "--backend",
        choices=sorted(BACKENDS),
        default="local",
        help="local: this process (or --workers processes); ray: Ray actors; mpi: every rank of mpiexec/srun",
    )
    p.add_argument(
        "--shard-size",
        type=positive_int("--shard-size"),
        default=None,
        help="showers per shard, the unit of work and of resumption (default: ~256 MB of showers: DS2 10000, "
        "DS3 1000); part of the request: changing it changes the output",
    )
    p.add_argument("--seed", type=non_negative_int("--seed"), default=DEFAULT_SEED,
                   help="request seed; row i's randomness depends on (seed, i) only, so the output equals "
                   f"python -m hpc_calo.generate's for the same seed (default {DEFAULT_SEED})")
    p.add_argument(
        "--energies",
        type=Path,
        default=None,
        help="CaloChallenge file whose first N incident energies condition the showers (it must hold >= N)",
    )
    p.add_argument(
        "--emin",
        type=positive_float("--emin"),
        default=None,
        help="lower end (MeV) of log-uniform incident energies; default: the trained minimum",
    )
    p.add_argument(
        "--emax",
        type=positive_float("--emax"),
        default=None,
        help="upper end (MeV) of log-uniform incident energies; default: the trained maximum",
    )
    p.add_argument("--batch-size", type=positive_int("--batch-size"), default=1000,
                   help="showers per chain batch (part of the request)")
    p.add_argument("--keep-parts", action="store_true", help="keep the parts directory after a successful gather")
    p.add_argument("--parts-dir", type=Path, default=None, help="parts directory (default: OUT.parts)")
    p.add_argument("--compression", choices=("gzip", "none"), default="gzip", help="compression of the output")
    p.add_argument(
        "--workers",
        type=positive_int("--workers"),
        default=None,
        help="local: processes (default 1); ray: actors (default one per GPU, or per CPU with --device cpu); "
        "mpi: ignored, the ranks are the workers",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (Ray/MPI pick each worker's own GPU)")
    p.add_argument(
        "--threads",
        type=positive_int("--threads"),
        default=1,
        help="CPU threads per worker (default 1: one worker per core), each running its own batch, or torch "
        "threads within a batch where a shard has fewer batches; part of the request, because results differ in "
        "the last bits with another thread count. Ray gives each actor this many CPUs",
    )
    p.add_argument("--dtype", choices=PRECISIONS, default="float32", help=PRECISION_HELP)
    p.add_argument("--teachers", action="store_true", help="sample with the teacher flows even if students exist")
    add_renormalise_argument(p)
    add_compile_argument(p)
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def parse_request(argv: Sequence[str] | None = None) -> SampleRequest:
    args = parser().parse_args(argv)
    # Absolute paths: Ray actors and MPI ranks may start in another working directory.
    absolute = {k: None if getattr(args, k) is None else getattr(args, k).absolute()
                for k in ("run", "out", "energies", "parts_dir")}
    request = Request(
        run_dir=absolute["run"],
        n=args.showers,
        seed=args.seed,
        shard_size=args.shard_size,
        energies=absolute["energies"],
        emin=args.emin,
        emax=args.emax,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        students=False if args.teachers else None,
        renormalise=args.renormalise,
        compile=args.compile,
        threads=args.threads,
    )
    output = Output(path=absolute["out"], parts_dir=absolute["parts_dir"], keep_parts=args.keep_parts,
                    compression=args.compression)
    launch = Launch(backend=args.backend, workers=args.workers, address=args.address, progress=not args.no_progress)
    return SampleRequest(request, output, launch)


def main(argv: Sequence[str] | None = None) -> int:
    outcome = sample(parse_request(argv))
    if outcome is not None:
        print(outcome.line())
    return 0


if __name__ == "__main__":
    run_cli(main)
