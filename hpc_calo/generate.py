"""Chained generation: E_inc -> flow-1 layer energies -> flow-2 layer 0 -> flow-3 x 44 -> CaloChallenge HDF5.

Determinism (the rule of ``hpc_calo.seeding``, shared with ``hpc_calo.sample``): every random number of shower
row i (base-distribution samples of the three flows and the dequantisation noise of each generated layer) comes
from the stream of the row block ``i // ROW_BLOCK``, a torch.Generator seeded from ``SeedSequence([seed,
block])``. Batches draw whole blocks in a fixed order, so the random numbers a row gets depend on (seed, row
index) only, NOT on ``batch_size`` nor on where a shard of rows starts; the output for a seed is bit-identical
for the same (device, dtype, batch boundaries), and equal up to floating-point rounding (matrix products of other
shapes) across batch sizes.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import h5py
import numpy as np
import torch
from tqdm import tqdm

from hpc_calo import preprocess as pp
from hpc_calo import rundir
from hpc_calo.background import write_behind
from hpc_calo.cpus import batch_lanes, torch_threads
from hpc_calo.errors import UserError, run_cli
from hpc_calo.flags import non_negative_int, number, positive_int
from hpc_calo.flows import fast_sampler
from hpc_calo.geometry import E_INC_MAX_MEV, E_INC_MIN_MEV, N_LAYERS, Geometry, apply_threshold, get_geometry
from hpc_calo.io import CaloFile, CaloWriter
from hpc_calo.io.check import check_energies, check_trained_range
from hpc_calo.io.hdf5 import MAX_SHOWERS, output_bytes
from hpc_calo.models import FlowModel, load_flow_model
from hpc_calo.outputs import CALO_FILE, claim, require_space
from hpc_calo.precision import PRECISION_HELP, PRECISIONS, add_compile_argument, add_renormalise_argument, resolve
from hpc_calo.seeding import DEFAULT_SEED, ROW_BLOCK, log_uniform_energies, row_block_seed

T = TypeVar("T")
# Redraws of a flow-2 layer 0 that the threshold would leave empty (Chain.head). Each costs one flow-2
# pass over the batch when some row needs it: ~1/45 of the chain.
LAYER0_REDRAWS = 2


class _RowNoise:
    """Random numbers for rows [start, stop) that do not depend on how the rows are batched."""

    def __init__(self, seed: int, start: int, stop: int, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self.first, last = start // ROW_BLOCK, (stop - 1) // ROW_BLOCK
        self.lo = start - self.first * ROW_BLOCK
        self.n = stop - start
        self.gens = []
        for block in range(self.first, last + 1):
            g = torch.Generator(device=device)
            g.manual_seed(row_block_seed(seed, block))
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
        # z -> x per flow: the flow library's own by default; use_fast_samplers() swaps in the fast samplers.
        self.from_latent = {k: f.from_latent for k, f in flows.items()}

    def use_fast_samplers(self, compile: bool = False, matmul_dtype: torch.dtype | None = None) -> Chain:
        """Sample every flow through hpc_calo.flows.fast: FastStudent for students, FastMAF for MAF teachers.

        Same result as nflows to rounding, several times faster. ``compile`` uses the torch.compile'd student
        spline; ``matmul_dtype=torch.bfloat16`` runs the student GEMMs in bf16 (see BENCHMARKS.md for its cost in
        fidelity).
        """
        for k, f in self.flows.items():
            self.from_latent[k] = fast_sampler(f.flow, matmul_dtype, compile).to(self.device)
        return self

    def use_cuda_graphs(self) -> Chain:
        """Replay each flow's sampler as a CUDA graph, captured once per batch size on first use.

        Sampling is launch-bound on a GPU (the MAF's feature loop, 44 flow-3 calls per shower batch); a graph
        replays the same kernels without the launch overhead, so the result is the eager one. A batch size
        is captured the second time it comes (a shard's short last batch, seen once, runs eagerly).
        """
        if self.device.type != "cuda":
            raise UserError("CUDA graphs need a chain on a CUDA device")
        self.from_latent = {k: _Graphed(f) for k, f in self.from_latent.items()}
        return self

    @property
    def students(self) -> dict[int, bool]:
        return {k: f.student for k, f in self.flows.items()}

    @classmethod
    def load(cls, run_dir: str | os.PathLike[str], device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, students: bool | None = None, fast: bool = True,
             matmul_dtype: torch.dtype | None = None, renormalise: bool = True, compile: bool = False,
             cuda_graphs: bool | None = None) -> Chain:
        """Load ``RUN_DIR/flow{1,2,3}[_student]/best.pt``. students: None uses a student where one exists.

        ``fast`` samples through hpc_calo.flows.fast (equal to nflows to rounding, several times faster);
        every entry point loads chains this way, so production is reproducible across backends.
        ``cuda_graphs`` (default: on a CUDA device with ``fast``) replays the fast samplers as CUDA graphs.
        """
        run_dir = Path(run_dir)
        run = rundir.read_run(run_dir)
        geometry = get_geometry(run["dataset"])
        flows: dict[int, FlowModel] = {}
        for k in (1, 2, 3):
            teacher, student = rundir.weights(run_dir, k), rundir.weights(run_dir, k, student=True)
            use_student = k > 1 and (student.is_file() if students is None else students)
            path = student if use_student else teacher
            if not path.is_file():
                what = f"flow-{k} student" if use_student else f"flow-{k}"
                raise UserError(f"{run_dir}: incomplete run, {path} is missing (train {what} first)")
            flows[k] = load_flow_model(path, device, dtype, dataset=geometry.name, flow=k)
        lo, hi = run.get("energy_range", (E_INC_MIN_MEV, E_INC_MAX_MEV))
        chain = cls(flows, geometry, (float(lo), float(hi)), renormalise=renormalise, run=run)
        if not fast:
            return chain
        chain.use_fast_samplers(compile=compile, matmul_dtype=matmul_dtype)
        if chain.device.type == "cuda" if cuda_graphs is None else cuda_graphs:
            chain.use_cuda_graphs()
        return chain

    @torch.no_grad()
    def head(self, e_inc: torch.Tensor, noise: _RowNoise) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow-1's 45 layer energies (MeV, thresholded) and flow-2's layer 0 (voxels, MeV)."""
        f1, f2 = self.flows[1], self.flows[2]
        c = self.from_latent[1](noise.normal(f1.spec.features), f1.context1(e_inc))
        layer_e = apply_threshold(pp.decode_flow1(c, e_inc, f1.energies))
        v, e0 = self.geometry.voxels_per_layer, layer_e[:, 0]
        c2 = f2.context2(e_inc, e0)
        x = self.from_latent[2](noise.normal(v), c2)
        # Layer 0 has energy in every shower and one or two voxels in most, and flow-2 sometimes draws its "no
        # voxel hit" sample, which the threshold empties and the decoding could only place at random. The data
        # hold no such layer: redraw those rows, i.e. sample the flow restricted to what the data can hold. Every
        # row draws the numbers of every redraw, so its shower does not depend on the rest of its batch.
        for _ in range(LAYER0_REDRAWS if self.renormalise else 0):
            z = noise.normal(v)
            redo = pp.no_voxel_hit(x, e0)
            if bool(redo.any()):
                x = torch.where(redo.unsqueeze(-1), self.from_latent[2](z, c2), x)
        return layer_e, self._voxels(x, e0)

    @torch.no_grad()
    def next_layer(self, e_inc: torch.Tensor, layer_e: torch.Tensor, layer: torch.Tensor, n: int,
                   noise: _RowNoise) -> torch.Tensor:
        """Flow-3: layer n (voxels, MeV) from layer n - 1."""
        v = self.geometry.voxels_per_layer
        # As in the reference: the generated layer gets fresh noise and is renormalised to condition the next.
        prev = pp.logit(pp.normalise(layer + self.flows[3].noise_mev * noise.uniform(v))[0])
        c = self.flows[3].context3(e_inc, layer_e[:, n], layer_e[:, n - 1], prev, n)
        x = self.from_latent[3](noise.normal(v), c)
        return self._voxels(x, layer_e[:, n])

    def _voxels(self, x: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
        if self.renormalise:
            return pp.decode_shape_renormalised(x, energy)
        return apply_threshold(pp.decode_shape(x, energy))

    @torch.no_grad()
    def _sample_rows(self, e_inc: torch.Tensor, noise: _RowNoise) -> torch.Tensor:
        layer_e, layer = self.head(e_inc, noise)
        layers = [layer]
        for n in range(1, N_LAYERS):
            layer = self.next_layer(e_inc, layer_e, layer, n, noise)
            layers.append(layer)
        return torch.cat(layers, dim=1)

    def sample_iter(self, e_inc: np.ndarray, seed: int, batch_size: int = 1000, start: int = 0,
                    threads: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first row, showers (b, 45 V) float32 MeV) batch by batch (bounded memory).

        ``start`` is the output row of ``e_inc[0]``: a shard starting there gets the rows a single pass gives.
        ``threads`` (CPU only) splits that many CPUs into batches generated side by side and torch threads within
        each (``hpc_calo.cpus.batch_lanes``); 0: one batch at a time on torch's current threads. A batch's bits
        do not depend on the thread that made it."""
        e = np.asarray(e_inc, dtype=np.float64).reshape(-1)
        if batch_size < 1:
            raise UserError(f"batch size must be positive, not {batch_size}")
        if len(e) and (not np.all(np.isfinite(e)) or e.min() <= 0):
            raise UserError("incident energies must be finite and positive (MeV)")

        def batch(a: int) -> tuple[int, np.ndarray]:
            b = min(a + batch_size, len(e))
            noise = _RowNoise(seed, start + a, start + b, self.device, self.dtype)
            t = torch.as_tensor(e[a:b], device=self.device, dtype=self.dtype)
            return a, self._sample_rows(t, noise).to("cpu", torch.float32).numpy()

        starts = range(0, len(e), batch_size)
        lanes = 1
        if threads and self.device.type == "cpu":
            lanes, per_lane = batch_lanes(threads, len(starts))
            torch.set_num_threads(per_lane)
        yield from _in_lanes(batch, starts, lanes)

    def sample(self, e_inc: np.ndarray, seed: int, batch_size: int = 1000, threads: int = 0) -> np.ndarray:
        """Showers (n, 45 V) float32 MeV for incident energies ``e_inc`` (n,) MeV; deterministic (module doc)."""
        out = np.empty((len(np.asarray(e_inc).reshape(-1)), self.geometry.n_voxels), dtype=np.float32)
        for a, s in self.sample_iter(e_inc, seed, batch_size, threads=threads):
            out[a : a + len(s)] = s
        return out

    def random_energies(self, n: int, seed: int) -> np.ndarray:
        """Log-uniform incident energies over the trained range (MeV), rows 0..n-1 of the seeding rule."""
        return log_uniform_energies(seed, 0, n, *self.energy_range)


def _in_lanes(fn: Callable[[int], T], items: Iterable[int], lanes: int) -> Iterator[T]:
    """``map(fn, items)`` with up to ``lanes`` calls running at a time in threads, results in order.

    At most ``lanes`` calls run at a time, beside the result the caller holds, so memory follows ``lanes``, not
    the number of items. OpenMP's thread count is a per-thread setting: every lane starts with the caller's."""
    if lanes <= 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(lanes, thread_name_prefix="lane", initializer=torch.set_num_threads,
                              initargs=(torch.get_num_threads(),))
    try:
        todo = iter(items)
        running = deque(pool.submit(fn, x) for x in islice(todo, lanes))
        while running:
            result = running.popleft().result()
            running.extend(pool.submit(fn, x) for x in islice(todo, 1))  # keep every lane busy meanwhile
            yield result
    finally:
        pool.shutdown(cancel_futures=True)


class _Graphed:
    """A flow's z -> x sampler, replayed from a CUDA graph for each full batch size it has seen."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.fn = fn
        self.graphs: dict[int, Any] = {}
        self.seen: set[int] = set()

    def __call__(self, z: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        from hpc_calo.flows.fast import CudaGraphSampler

        b = z.shape[0]
        if b not in self.seen:  # capturing costs a few eager calls: only for sizes that recur
            self.seen.add(b)
            return self.fn(z, context)
        if b not in self.graphs:
            self.graphs[b] = CudaGraphSampler(self.fn, b, z.shape[1], context.shape[1], z.dtype, z.device)
        return self.graphs[b](z, context).clone()  # the graph's output buffer is reused by the next replay


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
    p.add_argument("--seed", type=non_negative_int("--seed"), default=DEFAULT_SEED,
                   help=f"random seed; row i's randomness depends on (seed, i) only (default {DEFAULT_SEED})")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device (default cpu)")
    p.add_argument("--dtype", default="float32", choices=PRECISIONS, help=PRECISION_HELP)
    p.add_argument("--students", choices=("auto", "yes", "no"), default="auto",
                   help="flows 2/3: students where trained (auto), required (yes) or teachers (no)")
    p.add_argument("--threads", type=non_negative_int("--threads"), default=0,
                   help="CPU threads, 0: the CPUs this process owns; on the CPU each runs its own batch (torch "
                        "threads within a batch only where there are fewer batches than threads)")
    add_renormalise_argument(p)
    add_compile_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


@dataclass(frozen=True)
class GenerateRequest:
    """One pass of the chain into one CaloChallenge file (``hpc_calo.sample`` is the sharded, parallel way)."""

    run: Path
    out: Path
    showers: int | None = None  # None: as many as ``energies`` holds
    energies: Path | None = None  # take the first ``showers`` incident energies of this file
    batch_size: int = 1000
    seed: int = DEFAULT_SEED
    device: str = "cpu"
    dtype: str = "float32"
    students: bool | None = None  # None: students where trained
    renormalise: bool = True  # each generated layer sums exactly to flow-1's layer energy
    compile: bool = False  # the students' spline under torch.compile (other last bits)
    threads: int = 0  # CPU threads; 0: the CPUs this process owns (split as hpc_calo.cpus.batch_lanes)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.showers is None and self.energies is None:
            raise UserError("give --showers N, or --energies REF.h5 to take its incident energies")
        if self.showers is not None and not 1 <= self.showers <= MAX_SHOWERS:
            raise UserError(f"--showers must be between 1 and {MAX_SHOWERS:.0e}, not {self.showers}")
        if self.seed < 0:
            raise UserError(f"--seed must be a non-negative integer, not {self.seed}")
        if self.dtype not in PRECISIONS:
            raise UserError(f"--dtype must be one of {', '.join(PRECISIONS)}, not {self.dtype!r}")


def generate(req: GenerateRequest) -> int:
    """Write ``req.out``; returns the number of showers. The rows are those ``hpc_calo.sample`` gives.

    Refused before the flows load: an output that is an input or not a CaloChallenge file; before generating:
    energies outside the trained range, or an output that cannot fit in the free space.
    """
    claim(req.out, CALO_FILE, inputs=[req.run, req.energies])
    if req.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {req.device}: no CUDA device is available")
    threads = torch_threads(req.threads)
    dtype, matmul_dtype = resolve(req.dtype)
    chain = Chain.load(req.run, req.device, dtype, req.students, matmul_dtype=matmul_dtype,
                       renormalise=req.renormalise, compile=req.compile)
    if req.energies is not None:
        e_inc = reference_energies(req.energies, chain.geometry, req.showers, chain.energy_range)
        n = len(e_inc)
    else:
        assert req.showers is not None
        n = req.showers
    require_space((Path(req.out).absolute().parent, output_bytes(chain.geometry, n)))
    if req.energies is None:
        e_inc = chain.random_energies(n, req.seed)
    attrs = {"generator": "hpc-calo iCaloFlow", "run": str(Path(req.run).resolve()), "seed": req.seed,
             "students": str(chain.students), "renormalise": req.renormalise, "compile": req.compile}
    with CaloWriter(req.out, chain.geometry, n_total=n, attrs=attrs) as w, tqdm(
        total=n, unit="shower", desc="generate", disable=not req.progress, file=sys.stderr
    ) as bar:

        def write(batch: tuple[int, np.ndarray]) -> None:
            a, showers = batch
            w.write(e_inc[a : a + len(showers)], showers)
            bar.update(len(showers))

        # gzip and the disk in the writer thread while the chain generates the next batch
        write_behind(chain.sample_iter(e_inc, req.seed, req.batch_size, threads=threads), write)
    return n


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    req = GenerateRequest(
        run=args.run, out=args.out, showers=args.showers, energies=args.energies, batch_size=args.batch_size,
        seed=args.seed, device=args.device, dtype=args.dtype,
        students={"auto": None, "yes": True, "no": False}[args.students], renormalise=args.renormalise,
        compile=args.compile, threads=args.threads,
        progress=not args.no_progress,
    )
    print(f"wrote {generate(req)} showers to {req.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
