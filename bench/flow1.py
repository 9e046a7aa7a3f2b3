"""Flow-1's layer-energy encoding, measured: the reference's "absolute" against "fractions".

python -m bench.flow1 [--train 3000] [--heldout 2000] [--epochs 60] [--preset quickstart] [--out FILE]

Trains flow-1 twice on the same synthetic DS2 store with the same architecture, schedule and budget, one per
encoding (hpc_calo.preprocess.ENERGY_ENCODINGS), samples layer energies for the incident energies of a held-out
file, and scores them with the official binnings: separation power of E_tot/E_inc and the mean over layers of
the separation power of E_layer. The floor is a second held-out file against the first. One torch thread.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from bench.report import emit, machine
from data_prep.convert import main as convert
from data_prep.synth import write_synthetic
from hpc_calo import preprocess as pp
from hpc_calo.data.store import ShardedLoader, open_store
from hpc_calo.evaluate.histograms import log_edges, separation_power
from hpc_calo.flows.presets import get_preset
from hpc_calo.geometry import DS2, N_LAYERS, THRESHOLD_MEV
from hpc_calo.models import FlowModel
from hpc_calo.train import TrainConfig, fit


def layer_energies(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(path) as f:
        e = f["incident_energies"][:, 0]
        layers = f["showers"][:].reshape(len(e), N_LAYERS, -1).sum(-1)
    return e, layers


def scores(e_gen: np.ndarray, gen: np.ndarray, e_ref: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    edges = np.linspace(0.5, 1.5, 101)
    ratio_gen, ratio_ref = gen.sum(1) / e_gen, ref.sum(1) / e_ref
    s_tot = separation_power(np.histogram(ratio_gen, edges)[0], np.histogram(ratio_ref, edges)[0])
    s_layer = [separation_power(np.histogram(gen[:, i], e := log_edges(ref[:, i].max(initial=0.0), 40))[0],
                                np.histogram(ref[:, i], e)[0]) for i in range(N_LAYERS)]
    return {"S_etot_einc": s_tot, "mean_S_e_layer": float(np.nanmean(s_layer)),
            "mean_etot_einc": float(ratio_gen.mean()), "std_etot_einc": float(ratio_gen.std()),
            "ref_mean_etot_einc": float(ratio_ref.mean()), "ref_std_etot_einc": float(ratio_ref.std())}


def train_and_score(encoding: str, a: argparse.Namespace, store: Path, work: Path, e_inc: np.ndarray,
                    ref: np.ndarray) -> dict[str, Any]:
    preset = get_preset(a.preset)
    torch.manual_seed(0)
    model = FlowModel(1, DS2, preset.spec(1, DS2), preset=a.preset, energies=encoding)
    s = open_store(store, DS2)
    b = preset.batch_size
    loaders = (ShardedLoader(s, "train", "energies", b, 0, 1, 1.0, seed=0),
               ShardedLoader(s, "val", "energies", b, 0, 1, 0.5, seed=0))
    cfg = TrainConfig(epochs=a.epochs, batch_size=b, max_lr=preset.max_lr[1], log_every=10**9, name=encoding)
    t = time.perf_counter()
    summary = fit(model, *loaders, cfg, work / encoding)
    train_s = time.perf_counter() - t
    model.load_state_dict(torch.load(work / encoding / "best.pt", weights_only=True)["state_dict"])
    with torch.no_grad():
        e = torch.as_tensor(e_inc, dtype=torch.float32)
        x = model.sample(model.context1(e), torch.Generator().manual_seed(1))
        gen = pp.apply_threshold(pp.decode_flow1(x, e, encoding), THRESHOLD_MEV).numpy()
    return {"encoding": encoding, "train_s": round(train_s, 1), "steps": summary["global_step"],
            "best_val_nll": summary["best_val"], **scores(e_inc, gen, e_inc, ref)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.flow1", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=3000, help="synthetic training showers (default 3000)")
    p.add_argument("--heldout", type=int, default=2000, help="showers per held-out file (default 2000)")
    p.add_argument("--epochs", type=int, default=60, help="flow-1 epochs for each encoding (default 60)")
    p.add_argument("--preset", default="quickstart", help="architecture and schedule (default quickstart)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train = write_synthetic(work / "train.h5", "ds2", a.train, 1)
        held_a = write_synthetic(work / "a.h5", "ds2", a.heldout, 1001)
        held_b = write_synthetic(work / "b.h5", "ds2", a.heldout, 1002)
        if convert(["--dataset", "ds2", str(train), "--out", str(work / "store.zarr"), "--quiet"]):
            return 1
        e_inc, ref = layer_energies(held_a)
        e_b, floor_layers = layer_energies(held_b)
        result: dict[str, Any] = {
            "command": "python -m bench.flow1 " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": machine(), "threads": 1, "preset": a.preset, "epochs": a.epochs,
            "train": a.train, "heldout": a.heldout,
            "floor": scores(e_b, floor_layers, e_inc, ref),
            "cases": [train_and_score(enc, a, work / "store.zarr", work, e_inc, ref) for enc in pp.ENERGY_ENCODINGS],
        }
    emit(result, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
