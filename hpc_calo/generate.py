"""Chained generation: E_inc -> flow-1 layer energies -> flow-2 layer 0 -> flow-3 x 44 -> CaloChallenge HDF5.

Determinism: every random number of shower row i (base-distribution samples of the three flows and the
dequantisation noise of each generated layer) comes from the stream of the row block ``i // ROW_BLOCK``,
a torch.Generator seeded from ``SeedSequence([seed, block])``. Batches draw whole blocks in a fixed order, so
the random numbers a row gets depend on (seed, row index) only, NOT on ``batch_size``; the output for a seed
is bit-identical for the same (device, dtype, batch_size), and equal up to floating-point rounding (matrix
products of other shapes) across batch sizes.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from tqdm import tqdm

from hpc_calo import preprocess as pp
from hpc_calo.errors import UserError, run_cli
from hpc_calo.flags import non_negative_int, number, positive_int
from hpc_calo.geometry import E_INC_MAX_MEV, E_INC_MIN_MEV, N_LAYERS, THRESHOLD_MEV, Geometry, get_geometry
from hpc_calo.io import CaloFile, CaloWriter
from hpc_calo.io.check import check_energies, check_trained_range
from hpc_calo.io.hdf5 import MAX_SHOWERS, output_bytes
from hpc_calo.models import FlowModel, load_flow_model
from hpc_calo.outputs import CALO_FILE, claim, require_space
from hpc_calo.precision import PRECISION_HELP, PRECISIONS, add_renormalise_argument, resolve
from hpc_calo.train.checkpoint import read_run

ROW_BLOCK = 64  # rows sharing one random stream; small enough that a partial block wastes little


class _RowNoise:
    """Random numbers for rows [start, stop) that do not depend on how the rows are batched."""

    def __init__(self, seed: int, start: int, stop: int, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self.first, last = start // ROW_BLOCK, (stop - 1) // ROW_BLOCK
        self.lo = start - self.first * ROW_BLOCK
        self.n = stop - start
        self.gens = []
        for block in range(self.first, last + 1):
            s = np.random.SeedSequence([seed, block]).generate_state(2, dtype=np.uint32)
            g = torch.Generator(device=device)
            g.manual_seed(int(s[0]) << 31 | int(s[1]) >> 1)
            self.gens.append(g)

    def _draw(self, fn: Any, features: int) -> torch.Tensor:
        parts = [fn(ROW_BLOCK, features, generator=g, device=self.device, dtype=self.dtype) for g in self.gens]
        return torch.cat(parts)[self.lo : self.lo + self.n]

    def normal(self, features: int) -> torch.Tensor:
        return self._draw(torch.randn, features)

    def uniform(self, features: int) -> torch.Tensor:
        return self._draw(torch.rand, features)


class Chain:
    """The three trained flows of a run folder, sampling showers in MeV."""

    def __init__(self, flows: dict[int, FlowModel], geometry: Geometry, energy_range: tuple[float, float],
                 renormalise: bool = True, run: dict[str, Any] | None = None) -> None:
        self.flows = flows
        self.geometry = geometry
        self.energy_range = energy_range
        self.renormalise = renormalise
        self.run = run or {}
        self.device = flows[1].device
        self.dtype = flows[1].dtype
        # z -> x per flow: nflows by default; use_fast_samplers() swaps in hpc_calo.flows.fast.
        self.from_latent = {k: f.from_latent for k, f in flows.items()}

    def use_fast_samplers(self, compile: bool = False, matmul_dtype: torch.dtype | None = None) -> Chain:
        """Sample every flow through hpc_calo.flows.fast: FastStudent for students, FastMAF for MAF teachers.

        Same result as nflows to rounding, several times faster. ``compile`` uses the torch.compile'd student
        spline; ``matmul_dtype=torch.bfloat16`` runs the student GEMMs in bf16 (see BENCHMARKS.md for its cost in
        fidelity).
        """
        from hpc_calo.flows.fast import FastMAF, FastStudent

        for k, f in self.flows.items():
            if f.student:
                fast = FastStudent(f.flow, matmul_dtype=matmul_dtype).to(self.device)
                self.from_latent[k] = fast.compile() if compile else fast
            else:
                self.from_latent[k] = FastMAF(f.flow).to(self.device)
        return self

    @property
    def students(self) -> dict[int, bool]:
        return {k: f.student for k, f in self.flows.items()}

    @classmethod
    def load(cls, run_dir: str | os.PathLike[str], device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, students: bool | None = None, fast: bool = True,
             matmul_dtype: torch.dtype | None = None, renormalise: bool = True) -> Chain:
        """Load ``RUN_DIR/flow{1,2,3}[_student]/best.pt``. students: None uses a student where one exists.

        ``fast`` samples through hpc_calo.flows.fast (equal to nflows to rounding, several times faster);
        every entry point loads chains this way, so production is reproducible across backends.
        """
        run_dir = Path(run_dir)
        run = read_run(run_dir)
        geometry = get_geometry(run["dataset"])
        flows: dict[int, FlowModel] = {}
        for k in (1, 2, 3):
            teacher, student = run_dir / f"flow{k}" / "best.pt", run_dir / f"flow{k}_student" / "best.pt"
            use_student = k > 1 and (student.is_file() if students is None else students)
            path = student if use_student else teacher
            if not path.is_file():
                what = f"flow-{k} student" if use_student else f"flow-{k}"
                raise UserError(f"{run_dir}: incomplete run, {path} is missing (train {what} first)")
            flows[k] = load_flow_model(path, device, dtype, dataset=geometry.name, flow=k)
        lo, hi = run.get("energy_range", (E_INC_MIN_MEV, E_INC_MAX_MEV))
        chain = cls(flows, geometry, (float(lo), float(hi)), renormalise=renormalise, run=run)
        return chain.use_fast_samplers(matmul_dtype=matmul_dtype) if fast else chain

    @torch.no_grad()
    def head(self, e_inc: torch.Tensor, noise: _RowNoise) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow-1's 45 layer energies (MeV, thresholded) and flow-2's layer 0 (voxels, MeV)."""
        f1, f2 = self.flows[1], self.flows[2]
        layer_e = pp.decode_flow1(self.from_latent[1](noise.normal(N_LAYERS), f1.context1(e_inc)), e_inc, f1.energies)
        layer_e = pp.apply_threshold(layer_e, THRESHOLD_MEV)
        x = self.from_latent[2](noise.normal(self.geometry.voxels_per_layer), f2.context2(e_inc, layer_e[:, 0]))
        return layer_e, self._voxels(x, layer_e[:, 0])

    @torch.no_grad()
    def next_layer(self, e_inc: torch.Tensor, layer_e: torch.Tensor, layer: torch.Tensor, n: int,
                   noise: _RowNoise) -> torch.Tensor:
        """Flow-3: layer n (voxels, MeV) from layer n - 1."""
        v = self.geometry.voxels_per_layer
        # As in the reference: the generated layer gets fresh noise and is renormalised to condition the next.
        prev = pp.logit(pp.normalise(layer + pp.NOISE_MEV * noise.uniform(v))[0])
        c = self.flows[3].context3(e_inc, layer_e[:, n], layer_e[:, n - 1], prev, n)
        x = self.from_latent[3](noise.normal(v), c)
        return self._voxels(x, layer_e[:, n])

    def _voxels(self, x: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
        layer = pp.apply_threshold(pp.decode_shape(x, energy), THRESHOLD_MEV)
        return pp.rescale(layer, energy) if self.renormalise else layer

    @torch.no_grad()
    def _sample_rows(self, e_inc: torch.Tensor, noise: _RowNoise) -> torch.Tensor:
        layer_e, layer = self.head(e_inc, noise)
        layers = [layer]
        for n in range(1, N_LAYERS):
            layer = self.next_layer(e_inc, layer_e, layer, n, noise)
            layers.append(layer)
        return torch.cat(layers, dim=1)

    def sample_iter(self, e_inc: np.ndarray, seed: int, batch_size: int = 1000) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first row, showers (b, 45 V) float32 MeV) batch by batch (bounded memory)."""
        e = np.asarray(e_inc, dtype=np.float64).reshape(-1)
        if batch_size < 1:
            raise UserError(f"batch size must be positive, not {batch_size}")
        if len(e) and (not np.all(np.isfinite(e)) or e.min() <= 0):
            raise UserError("incident energies must be finite and positive (MeV)")
        for a in range(0, len(e), batch_size):
            b = min(a + batch_size, len(e))
            noise = _RowNoise(seed, a, b, self.device, self.dtype)
            t = torch.as_tensor(e[a:b], device=self.device, dtype=self.dtype)
            yield a, self._sample_rows(t, noise).to("cpu", torch.float32).numpy()

    def sample(self, e_inc: np.ndarray, seed: int, batch_size: int = 1000) -> np.ndarray:
        """Showers (n, 45 V) float32 MeV for incident energies ``e_inc`` (n,) MeV; deterministic (module doc)."""
        out = np.empty((len(np.asarray(e_inc).reshape(-1)), self.geometry.n_voxels), dtype=np.float32)
        for a, s in self.sample_iter(e_inc, seed, batch_size):
            out[a : a + len(s)] = s
        return out

    def random_energies(self, n: int, seed: int) -> np.ndarray:
        """Log-uniform incident energies over the trained range (MeV)."""
        lo, hi = self.energy_range
        u = np.random.default_rng(np.random.SeedSequence([seed, 0xE1C])).random(n)
        return lo * (hi / lo) ** u


def reference_energies(path: Path, geometry: Geometry, n: int | None,
                       trained: tuple[float, float] | None = None) -> np.ndarray:
    """The first n (default all) incident energies of a CaloChallenge file, without reading its showers.

    Checked as ``io check`` checks them and, given the ``trained`` range, refused where they reach outside it.
    """
    with CaloFile(path, geometry) as f:
        total = len(f)
    if n is not None and n > total:
        raise UserError(f"{path}: has {total} showers, fewer than the {n} requested")
    with h5py.File(path, "r") as h5:
        e = np.asarray(h5["incident_energies"][: total if n is None else n, 0], dtype=np.float64)
    check_energies(str(path), 0, e)
    if trained is not None and len(e):
        check_trained_range(str(path), float(e.min()), float(e.max()), trained)
    return e


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hpc_calo.generate",
        description="Generate showers with the trained flows of a run folder into a CaloChallenge HDF5 file.",
    )
    p.add_argument("--run", type=Path, required=True, help="run folder written by python -m hpc_calo.train")
    p.add_argument("--showers", type=number(int, "--showers", 1, MAX_SHOWERS),
                   help=f"number of showers, at most {MAX_SHOWERS:.0e} (default with --energies: all of the file's)")
    p.add_argument("--out", type=Path, required=True, help="output HDF5 file (appears only when complete)")
    p.add_argument("--energies", type=Path,
                   help="take the incident energies of this CaloChallenge file (its first N); default: log-uniform "
                        "over the trained range")
    p.add_argument("--batch-size", type=positive_int("--batch-size"), default=1000,
                   help="showers per batch (default 1000)")
    p.add_argument("--seed", type=non_negative_int("--seed"), default=0, help="random seed (default 0)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device (default cpu)")
    p.add_argument("--dtype", default="float32", choices=PRECISIONS, help=PRECISION_HELP)
    p.add_argument("--students", choices=("auto", "yes", "no"), default="auto",
                   help="flows 2/3: students where trained (auto), required (yes) or teachers (no)")
    p.add_argument("--threads", type=non_negative_int("--threads"), default=0,
                   help="torch CPU threads, 0: torch's default")
    add_renormalise_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.showers is None and args.energies is None:
        raise UserError("give --showers N, or --energies REF.h5 to take its incident energies")
    claim(args.out, CALO_FILE, inputs=[args.run, args.energies])
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    students = {"auto": None, "yes": True, "no": False}[args.students]
    dtype, matmul_dtype = resolve(args.dtype)
    chain = Chain.load(args.run, args.device, dtype, students, matmul_dtype=matmul_dtype,
                       renormalise=args.renormalise)
    if args.energies is not None:
        e_inc = reference_energies(args.energies, chain.geometry, args.showers, chain.energy_range)
    n = args.showers if args.energies is None else len(e_inc)
    require_space((args.out.absolute().parent, output_bytes(chain.geometry, n)))
    if args.energies is None:
        e_inc = chain.random_energies(n, args.seed)
    attrs = {"generator": "hpc-calo iCaloFlow", "run": str(args.run.resolve()), "seed": args.seed,
             "students": str(chain.students), "renormalise": args.renormalise}
    with CaloWriter(args.out, chain.geometry, n_total=n, attrs=attrs) as w, tqdm(
        total=n, unit="shower", desc="generate", disable=args.no_progress, file=sys.stderr
    ) as bar:
        for a, showers in chain.sample_iter(e_inc, args.seed, args.batch_size):
            w.write(e_inc[a : a + len(showers)], showers)
            bar.update(len(showers))
    print(f"wrote {n} {chain.geometry.name} showers to {args.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
