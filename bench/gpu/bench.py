"""The GPU benchmarks of ``bench/gpu/check.sh``: ``python -m bench.gpu.bench --out DIR [--budget-s S] [--dry-run]``.

Four items, each timed on the real code path, written to ``DIR/gpu_bench.json`` after every cell (a run stopped
at any moment leaves the cells done so far):

- ``chain``: the student chain (flow-1 MAF + flow-2/3 IAF students through ``hpc_calo.flows.fast``, the
  reference architectures with random weights, ``Chain.sample`` including the copy to the host), ms per shower
  at batch 1k / 10k / 100k, DS2 and DS3, fp32 / TF32 / bf16 (student GEMMs), eager vs CUDA graphs;
- ``train``: teacher flow-3 through ``hpc_calo.train.job.train`` at the reference presets on a synthetic store,
  pairs/s and peak GPU memory, fp32 vs TF32 vs bf16 autocast (and the loss after the same steps);
- ``production``: ``hpc_calo.sample`` of DS2 showers on one GPU (up to 1M, fewer when the time or disk would
  not allow: the count is recorded), showers/s of generation and of the whole run including the gzip gather;
- ``classifier``: the evaluation's low-level classifier, one epoch, GPU then CPU on the same files.

Cells whose predicted time exceeds what is left are recorded as skipped with the prediction. ``--dry-run``
prints the plan and runs every item at toy sizes on the CPU (CI-sized), so the script is tested without a GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from hpc_calo import rundir
from hpc_calo.atomic import atomic_path
from hpc_calo.errors import UserError, run_cli

RESULTS = "gpu_bench.json"
# Share of the budget left when an item starts that the item may use (the rest carries over).
SHARES = {"chain": 0.45, "train": 0.4, "production": 0.7, "classifier": 1.0}
GZIP_SHOWERS_PER_S = 2000.0  # DS2 gather guess until measured (gzip level 4, one thread)
PARTS_DISK_BYTES = 12 * 2**30  # parts of the production run (uncompressed) stay below this


@dataclass(frozen=True)
class Sizes:
    device: str
    preset: str | None  # None: each dataset's reference architecture
    batches: tuple[int, ...]
    datasets: tuple[str, ...]
    precisions: tuple[str, ...]
    graphs: tuple[bool, ...]
    train_presets: tuple[str, ...]
    train_steps: int
    train_batch: int | None  # None: the preset's
    train_amp: tuple[str, ...]
    synth_showers: dict[str, int]
    production_max: int
    classifier_showers: int
    reps: int = 5  # timed calls per chain cell at most
    classifier_hidden: int = 2048  # the official width


GPU = Sizes(device="cuda", preset=None, batches=(1000, 10_000, 100_000), datasets=("ds2", "ds3"),
            precisions=("fp32", "tf32", "bf16"), graphs=(False, True), train_presets=("ds2", "ds3"),
            train_steps=30, train_batch=None, train_amp=("off", "tf32", "bf16"),
            synth_showers={"ds2": 2000, "ds3": 300}, production_max=1_000_000, classifier_showers=10_000)
DRY = Sizes(device="cpu", preset="tiny", batches=(16,), datasets=("ds2", "ds3"), precisions=("fp32", "bf16"),
            graphs=(False,), train_presets=("tiny",), train_steps=2, train_batch=32, train_amp=("off",),
            synth_showers={"ds2": 60, "ds3": 20, "tiny": 60}, production_max=64, classifier_showers=60, reps=1,
            classifier_hidden=64)


class Results:
    """The JSON file, rewritten atomically after every cell."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {"meta": meta}
        self.write()

    def put(self, item: str, key: str, value: Any) -> None:
        self.data.setdefault(item, {})[key] = value
        print(f"  {item} {key}: {json.dumps(value)}", flush=True)
        self.write()

    def write(self) -> None:
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(self.data, indent=1) + "\n")


class Clock:
    def __init__(self, budget_s: float) -> None:
        self.t0, self.budget_s = time.perf_counter(), budget_s

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _free(device: str) -> None:
    """Give the memory of the last cell (its chain, graphs and their pools) back before the next one."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _peak_reset(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


# ---- chain ------------------------------------------------------------------------------------------------


def chain_cell(dataset: str, preset: str | None, precision: str, graphs: bool, batch: int, device: str,
               cap_s: float, reps: int) -> dict[str, Any]:
    """ms per shower of ``Chain.sample`` on one batch: median of the timed calls after the warm-up calls."""
    from bench.sample import build_chain

    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    try:
        chain = build_chain(dataset, True, torch.float32, device, preset=preset)
        chain.use_fast_samplers(matmul_dtype=torch.bfloat16 if precision == "bf16" else None)
        if graphs:
            chain.use_cuda_graphs()
        e = chain.random_energies(batch, 0)
        _peak_reset(device)
        warm = []
        for _ in range(2 if graphs else 1):  # graphs: the first call is eager, the second captures
            t = time.perf_counter()
            chain.sample(e, 0, batch_size=batch)
            _sync(device)
            warm.append(time.perf_counter() - t)
        times: list[float] = []
        spent = sum(warm)
        while len(times) < reps and (not times or spent + times[-1] < cap_s):
            t = time.perf_counter()
            chain.sample(e, 0, batch_size=batch)
            _sync(device)
            times.append(time.perf_counter() - t)
            spent += times[-1]
        ms = statistics.median(times) * 1e3 / batch
        return {"ms_per_shower": round(ms, 5), "reps": len(times), "warmup_s": [round(w, 3) for w in warm],
                "peak_gb": _peak_gb(device)}
    finally:
        torch.set_float32_matmul_precision("highest")


def bench_chain(sizes: Sizes, res: Results, clock: Clock, window_s: float) -> None:
    end = clock.left() - window_s
    known: dict[tuple[str, str, bool], float] = {}  # ms/shower at the largest batch measured so far
    for batch in sizes.batches:
        for dataset in sizes.datasets:
            for precision in sizes.precisions:
                for graphs in sizes.graphs:
                    key = f"{dataset}/{precision}/{'graphs' if graphs else 'eager'}/b{batch}"
                    if sizes.device != "cuda" and graphs:
                        continue
                    ms = known.get((dataset, precision, graphs))
                    # warm-up + one timed call; graphs add a capture (a few more eager calls)
                    predicted = None if ms is None else ms * batch / 1e3 * (2 if not graphs else 6)
                    left = clock.left() - end
                    if predicted is not None and predicted > left:
                        res.put("chain", key, {"skipped": "time", "predicted_s": round(predicted, 1)})
                        continue
                    if left <= 0:
                        res.put("chain", key, {"skipped": "time"})
                        continue
                    try:
                        cell = chain_cell(dataset, sizes.preset, precision, graphs, batch, sizes.device,
                                          cap_s=min(left, 20.0), reps=sizes.reps)
                    except torch.OutOfMemoryError as err:
                        _free(sizes.device)
                        res.put("chain", key, {"skipped": f"out of memory: {str(err).splitlines()[0]}"})
                        continue
                    _free(sizes.device)
                    known[(dataset, precision, graphs)] = cell["ms_per_shower"]
                    res.put("chain", key, cell)


# ---- training ---------------------------------------------------------------------------------------------


def make_store(root: Path, dataset: str, showers: int) -> Path:
    from data_prep.convert import ConvertRequest, convert
    from data_prep.synth import write_synthetic

    store = root / f"{dataset}.zarr"
    if not store.exists():
        h5 = write_synthetic(root / f"{dataset}.h5", dataset, showers, seed=1, compression="none")
        if convert(ConvertRequest(inputs=(str(h5),), dataset=dataset, out=store, quiet=True)) != 0:
            raise RuntimeError("conversion failed")
    return store


def train_cell(store: Path, out: Path, preset: str, amp: str, steps: int, batch: int | None,
               device: str) -> dict[str, Any]:
    from hpc_calo.train.job import TrainingOptions, TrainRequest, train

    def run(name: str, n: int) -> dict[str, Any]:
        opts = TrainingOptions(device=device, amp=amp, max_steps=n, batch_size=batch, checkpoint_every=10**9,
                               log_every=max(1, n // 3), memory_gb=8.0)
        return train(TrainRequest(flow=3, store=store, preset=preset, out=out / name, options=opts))

    out.mkdir(parents=True, exist_ok=True)  # training writes into an existing folder only
    run("warm", 2)  # CUDA context, cuBLAS handles, allocator: not part of the rate
    _peak_reset(device)
    summary = run("timed", steps)
    from hpc_calo.flows.presets import get_preset

    b = batch or get_preset(preset).batch_size
    lines = rundir.metrics_in(rundir.flow_dir(out / "timed", 3)).read_text().splitlines()
    losses = [json.loads(x)["loss"] for x in lines if json.loads(x).get("event") == "step"]
    shutil.rmtree(out, ignore_errors=True)
    return {"pairs_per_s": round(steps * b / summary["train_s"], 1), "steps": steps, "batch": b,
            "train_s": round(summary["train_s"], 3), "last_loss": losses[-1] if losses else None,
            "peak_gb": _peak_gb(device)}


def bench_train(sizes: Sizes, res: Results, clock: Clock, window_s: float, root: Path) -> None:
    end = clock.left() - window_s
    for preset in sizes.train_presets:
        dataset = "ds2" if preset == "tiny" else preset
        store = make_store(root, dataset, sizes.synth_showers[dataset])
        first: float | None = None
        for amp in sizes.train_amp:
            key = f"{preset}/flow3/{amp}"
            left = clock.left() - end
            if left <= 0 or (first is not None and first * 1.5 > left):
                res.put("train", key, {"skipped": "time", "predicted_s": first})
                continue
            t = time.perf_counter()
            res.put("train", key, train_cell(store, root / "train", preset, amp, sizes.train_steps,
                                             sizes.train_batch, sizes.device))
            first = first or time.perf_counter() - t
            _free(sizes.device)
    if sizes.device != "cuda":
        res.put("train", "amp", {"skipped": "tf32/bf16 autocast need CUDA"})


# ---- production -------------------------------------------------------------------------------------------


def make_run(root: Path, store: Path, preset: str) -> Path:
    """A run folder of ``preset`` with random weights (timing does not need training)."""
    from hpc_calo import rundir
    from hpc_calo.models import FlowModel
    from hpc_calo.train.job import TrainRequest, build_job

    run = root / f"run_{preset}"
    for k in (1, 2, 3):
        job = build_job(TrainRequest(flow=k, store=store, preset=preset, out=run))
        job.prepare()
        torch.manual_seed(k)
        path = rundir.weights(run, k, k > 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        FlowModel.from_preset(k, job.geometry, preset, student=k > 1).save(path)
    return run


def bench_production(sizes: Sizes, res: Results, clock: Clock, window_s: float, root: Path) -> None:
    from hpc_calo.geometry import get_geometry
    from hpc_calo.sample.backends import sample
    from hpc_calo.sample.job import Launch, Output, SampleRequest
    from hpc_calo.sample.plan import Request

    run = make_run(root, make_store(root, "ds2", sizes.synth_showers["ds2"]), sizes.preset or "ds2")
    chain = res.data.get("chain", {})
    ms = next((c["ms_per_shower"] for k in ("ds2/fp32/graphs/b10000", "ds2/fp32/eager/b10000",
                                            "ds2/fp32/eager/b1000", "ds2/fp32/eager/b16")
               if "ms_per_shower" in (c := chain.get(k, {}))), None)
    per_shower_s = (ms or 1.0) / 1e3 + 1 / GZIP_SHOWERS_PER_S
    by_time = int(0.8 * window_s / per_shower_s)
    by_disk = PARTS_DISK_BYTES // (4 * get_geometry("ds2").n_voxels)
    n = max(1, min(sizes.production_max, by_time, by_disk))
    n -= n % 10_000 if n > 10_000 else 0
    why = "requested" if n == sizes.production_max else ("time" if by_time < by_disk else "disk")
    print(f"  production: {n} DS2 showers ({why}; predicted {n * per_shower_s:.0f} s)", flush=True)
    out = root / "production.h5"
    batch = min(10_000, n)
    t = time.perf_counter()
    outcome = sample(SampleRequest(Request(run_dir=run, n=n, batch_size=batch, device=sizes.device),
                                   Output(out), Launch(progress=False)))
    total = time.perf_counter() - t
    assert outcome is not None
    res.put("production", "ds2", {
        "showers": n, "limited_by": why, "batch": batch, "generate_s": round(outcome.gen_seconds, 2),
        "generate_showers_per_s": round(outcome.showers_per_s, 1), "gather_s": round(outcome.gathered.seconds, 2),
        "total_s": round(total, 2), "showers_per_s_including_write": round(n / total, 1),
        "file_gb": round(out.stat().st_size / 1e9, 3),
    })
    out.unlink(missing_ok=True)


# ---- classifier -------------------------------------------------------------------------------------------


def bench_classifier(sizes: Sizes, res: Results, clock: Clock, window_s: float, root: Path) -> None:
    from data_prep.synth import write_synthetic
    from hpc_calo.evaluate import EvaluateRequest, evaluate

    n = sizes.classifier_showers
    gen = write_synthetic(root / "cls_gen.h5", "ds2", n, seed=2, compression="none")
    ref = write_synthetic(root / "cls_ref.h5", "ds2", n, seed=3, compression="none")
    first: float | None = None
    for device in dict.fromkeys((sizes.device, "cpu")):
        if first is not None and first * 4 > clock.left():  # the CPU epoch: several times the GPU's
            res.put("classifier", device, {"skipped": "time"})
            continue
        t = time.perf_counter()
        report = evaluate(EvaluateRequest(gen=gen, ref=ref, dataset="ds2", out=root / f"report_{device}",
                                          metrics=("cls-low",), device=device, epochs=1, plots=False,
                                          cls_hidden=sizes.classifier_hidden))
        wall = time.perf_counter() - t
        first = first or wall
        res.put("classifier", device, {"showers_per_class": n, "epochs": 1, "hidden": sizes.classifier_hidden,
                                       "wall_s": round(wall, 2), "timings_s": report.get("timings", {}),
                                       "threads": torch.get_num_threads()})


# ---- main -------------------------------------------------------------------------------------------------

ITEMS: dict[str, Callable[..., None]] = {
    "chain": lambda s, r, c, w, root: bench_chain(s, r, c, w),
    "train": bench_train,
    "production": bench_production,
    "classifier": bench_classifier,
}


def describe(sizes: Sizes, budget_s: float) -> str:
    arch = f"preset {sizes.preset}" if sizes.preset else "reference architectures"
    cells = [b for b in sizes.batches for _ in sizes.datasets for _ in sizes.precisions
             for g in sizes.graphs if sizes.device == "cuda" or not g]
    return "\n".join([
        f"plan on {sizes.device}, budget {budget_s:.0f} s (shares of what is left: {SHARES}):",
        f"  chain       {len(cells)} cells ({arch}): batches {sizes.batches} x {sizes.datasets} x {sizes.precisions} x "
        f"{'eager/graphs' if len(sizes.graphs) > 1 else 'eager'}",
        f"  train       flow-3 at presets {sizes.train_presets}, amp {sizes.train_amp}, {sizes.train_steps} steps",
        f"  production  hpc_calo.sample DS2, up to {sizes.production_max} showers (time and disk permitting)",
        f"  classifier  low-level DNN, 1 epoch, {sizes.classifier_showers} showers per class, "
        f"{sizes.device}{' then cpu' if sizes.device != 'cpu' else ''}",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_bench.json (created)")
    p.add_argument("--budget-s", type=float, default=360.0, help="wall-clock budget of all items (default 360)")
    p.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU: prints and times the plan")
    p.add_argument("--items", default=",".join(ITEMS), help=f"comma-separated subset of {','.join(ITEMS)}")
    a = p.parse_args(argv)
    sizes = DRY if a.dry_run else GPU
    items = [i.strip() for i in a.items.split(",") if i.strip()]
    if bad := [i for i in items if i not in ITEMS]:
        raise UserError(f"--items: unknown {', '.join(bad)}; choose from {', '.join(ITEMS)}")
    if sizes.device == "cuda" and not torch.cuda.is_available():
        raise UserError("no CUDA device: run with --dry-run to rehearse on the CPU")
    a.out.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "dry_run": a.dry_run, "budget_s": a.budget_s,
            "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads()}
    if sizes.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        meta.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, capability=".".join(map(str, torch.cuda.get_device_capability(0))))
    print(describe(sizes, a.budget_s), flush=True)
    res = Results(a.out / RESULTS, meta)
    clock = Clock(a.budget_s)
    with tempfile.TemporaryDirectory(prefix="gpu-bench-", dir=os.environ.get("TMPDIR")) as tmp:
        for item in items:
            window = clock.left() * SHARES[item]
            t = time.perf_counter()
            print(f"== {item} (window {window:.0f} s, {clock.left():.0f} s left) ==", flush=True)
            try:
                ITEMS[item](sizes, res, clock, window, Path(tmp))
            except Exception as err:  # one item failing must not lose the others' figures
                res.put(item, "error", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
                import traceback

                traceback.print_exc()
            res.put(item, "item_s", round(time.perf_counter() - t, 1))
    print(f"wrote {res.path} in {a.budget_s - clock.left():.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
