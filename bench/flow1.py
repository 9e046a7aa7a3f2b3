"""Flow-1 alone, measured: its layer-energy encoding and its size.

python -m bench.flow1 [--train 3000] [--heldout 2000] [--epochs 60 | --steps N] [--preset quickstart]
                      [--encodings absolute fractions shares] [--sizes preset 256x8] [--noise-kev W] [--out FILE]

Trains flow-1 once per (encoding, size) on the same synthetic DS2 store with the same schedule and budget
(encodings: hpc_calo.preprocess.ENERGY_ENCODINGS; a size is HIDDENxBLOCKS, or "preset" for the preset's own),
samples layer energies for the incident energies of a held-out file, and scores them with the official
binnings: separation power of E_tot/E_inc, the mean over layers of the separation power of E_layer, and how
often each layer is empty (mean over layers of |gen - ref|). The floor is a second held-out file against the
first. One torch thread. Flow-1 alone sets every layer energy of a generated shower (the chain rescales each
layer to it), so these scores are the chain's, up to layers that the shape flows leave empty. The dequantisation
noise is the preset's unless ``--noise-kev`` sets it.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from hpc_calo.errors import run_cli
from hpc_calo.evaluate.histograms import log_edges, separation_power
from hpc_calo.flags import noise_kev
from hpc_calo.flows.presets import get_preset
from hpc_calo.geometry import DS2, N_LAYERS, apply_threshold
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
    # How often a layer is empty is what a shower's sparse tail shows first; the mean over layers of the difference.
    empty_diff = np.abs((gen == 0).mean(0) - (ref == 0).mean(0))
    return {"S_etot_einc": s_tot, "mean_S_e_layer": float(np.nanmean(s_layer)),
            "mean_empty_diff": float(empty_diff.mean()),
            "mean_etot_einc": float(ratio_gen.mean()), "std_etot_einc": float(ratio_gen.std()),
            "ref_mean_etot_einc": float(ratio_ref.mean()), "ref_std_etot_einc": float(ratio_ref.std())}


def size(text: str) -> tuple[int, int] | None:
    """ "256x8" -> (hidden 256, 8 blocks); "preset" -> None (the preset's own)."""
    if text == "preset":
        return None
    try:
        hidden, blocks = (int(v) for v in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is HIDDENxBLOCKS (e.g. 256x8) or 'preset', not {text!r}") from None
    return hidden, blocks


def train_and_score(encoding: str, hb: tuple[int, int] | None, a: argparse.Namespace, store: Path, work: Path,
                    e_inc: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    preset = get_preset(a.preset)
    spec = dataclasses.replace(preset.spec(1, DS2), features=pp.flow1_features(encoding))
    if hb is not None:
        spec = dataclasses.replace(spec, hidden=hb[0], blocks=hb[1])
    name = f"{encoding}_{spec.hidden}x{spec.blocks}"
    torch.manual_seed(0)
    noise_mev = preset.noise_mev if a.noise_kev is None else a.noise_kev * 1e-3
    model = FlowModel(1, DS2, spec, preset=a.preset, energies=encoding, noise_mev=noise_mev)
    s = open_store(store, DS2)
    b = preset.batch_size
    loaders = (ShardedLoader(s, "train", "energies", b, 0, 1, 1.0, seed=0),
               ShardedLoader(s, "val", "energies", b, 0, 1, 0.5, seed=0))
    cfg = TrainConfig(epochs=a.epochs, steps=a.steps, batch_size=b, max_lr=preset.max_lr[1], log_every=10**9,
                      num_threads=1, name=name)
    t = time.perf_counter()
    summary = fit(model, *loaders, cfg, work / name)
    train_s = time.perf_counter() - t
    model.load_state_dict(torch.load(work / name / "best.pt", weights_only=True)["state_dict"])
    with torch.no_grad():
        e = torch.as_tensor(e_inc, dtype=torch.float32)
        x = model.sample(model.context1(e), torch.Generator().manual_seed(1))
        gen = apply_threshold(pp.decode_flow1(x, e, encoding)).numpy()
    return {"encoding": encoding, "hidden": spec.hidden, "blocks": spec.blocks,
            "parameters": sum(q.numel() for q in model.parameters()), "train_s": round(train_s, 1),
            "steps": summary["global_step"],
            "best_val_nll": summary["best_val"], **scores(e_inc, gen, e_inc, ref)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.flow1", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=3000, help="synthetic training showers (default 3000)")
    p.add_argument("--heldout", type=int, default=2000, help="showers per held-out file (default 2000)")
    p.add_argument("--epochs", type=int, default=60, help="flow-1 epochs for each case (default 60)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps for each case, instead of --epochs")
    p.add_argument("--preset", default="quickstart", help="architecture and schedule (default quickstart)")
    p.add_argument("--encodings", nargs="+", choices=pp.ENERGY_ENCODINGS, default=list(pp.ENERGY_ENCODINGS),
                   help="flow-1 encodings to train (default: all)")
    p.add_argument("--sizes", nargs="+", type=size, default=[None], metavar="HIDDENxBLOCKS",
                   help="flow-1 sizes to train with each encoding: HIDDENxBLOCKS or 'preset' (default: preset)")
    p.add_argument("--noise-kev", type=noise_kev, default=None,
                   help="dequantisation noise width in keV (default: the preset's)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    a = p.parse_args(argv)
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
            "machine": machine(), "threads": 1, "preset": a.preset, "noise_kev": a.noise_kev,
            "epochs": a.epochs, "steps": a.steps,
            "train": a.train, "heldout": a.heldout,
            "floor": scores(e_b, floor_layers, e_inc, ref),
            "cases": [train_and_score(enc, hb, a, work / "store.zarr", work, e_inc, ref)
                      for hb in a.sizes for enc in a.encodings],
        }
    emit(result, a.out)
    return 0


if __name__ == "__main__":
    run_cli(main)
