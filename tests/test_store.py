"""The pair-store reader and ShardedLoader on a real converted store."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from hpc_calo.data import ShardedLoader, open_store
from hpc_calo.data.store import PairStore
from hpc_calo.errors import UserError
from hpc_calo.geometry import DS2, DS3

N_SHOWERS = 430  # 387 train (not divisible by 2 or 3 -> a remainder is dropped), 43 val


@pytest.fixture(scope="module")
def store_path(synthetic, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("store") / "ds2.zarr"
    src = synthetic("ds2", N_SHOWERS, seed=21)
    cmd = [
        sys.executable,
        "-m",
        "data_prep.convert",
        "--dataset",
        "ds2",
        str(src),
        "--out",
        str(out),
        "--chunk-showers",
        "24",
        "--quiet",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def store(store_path: Path) -> PairStore:
    return open_store(store_path, DS2)


@pytest.fixture(scope="module")
def truth(store: PairStore) -> dict[str, np.ndarray]:
    g = {k: store.array("train", k)[:] for k in ("e_inc", "layer_e", "voxels")}
    e32 = g["e_inc"].astype(np.float32)
    assert len(np.unique(e32)) == len(e32)  # incident energies identify showers in the checks below
    return {**g, "e32": e32}


def shower_index(truth: dict[str, np.ndarray], e_inc: torch.Tensor) -> np.ndarray:
    order = np.argsort(truth["e32"])
    pos = np.searchsorted(truth["e32"], e_inc.numpy(), sorter=order)
    idx = order[pos]
    assert np.array_equal(truth["e32"][idx], e_inc.numpy())
    return idx


def test_open_store_refuses(store_path: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such store"):
        open_store(tmp_path / "missing.zarr")
    with pytest.raises(UserError, match="holds ds2 showers, but ds3"):
        open_store(store_path, DS3)
    foreign = zarr.open_group(tmp_path / "foreign.zarr", mode="w")
    foreign.attrs["something"] = 1
    with pytest.raises(UserError, match="not an hpc-calo pair store"):
        open_store(tmp_path / "foreign.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match="not a Zarr"):
        open_store(tmp_path / "plain")

    shutil.copytree(store_path, tmp_path / "incomplete.zarr")
    zarr.open_group(tmp_path / "incomplete.zarr", mode="r+").attrs["complete"] = False
    with pytest.raises(UserError, match="incomplete store"):
        open_store(tmp_path / "incomplete.zarr")


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_disjoint_cover_equal_counts(store: PairStore, truth: dict[str, np.ndarray], world: int) -> None:
    seen, counts = [], []
    for rank in range(world):
        loader = ShardedLoader(store, "train", "energies", batch_size=50, rank=rank, world_size=world)
        batches = list(loader)
        counts.append((len(loader), len(batches)))
        idx = np.concatenate([shower_index(truth, b["e_inc"]) for b in batches])
        layer_e = torch.cat([b["layer_e"] for b in batches]).numpy()
        np.testing.assert_array_equal(layer_e, truth["layer_e"][idx].astype(np.float32))
        seen.append(idx)
    assert len(set(counts)) == 1 and counts[0][0] == counts[0][1]  # equal batch counts, = len()
    union = np.concatenate(seen)
    assert len(union) == len(set(union.tolist()))  # disjoint, each shower once per epoch
    # Documented remainder rule: the last n_train mod world showers are unused.
    assert set(union.tolist()) == set(range(world * (store.n_train // world)))


@pytest.mark.parametrize("mode_memory", [2.0, 1e-4])  # preload, and a budget that forces streaming
def test_pairs_are_the_right_layers(
    store: PairStore, truth: dict[str, np.ndarray], mode_memory: float, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="hpc_calo.data.store"):
        loader = ShardedLoader(store, "train", "pairs", batch_size=700, rank=1, world_size=2, memory_gb=mode_memory)
    assert loader.mode == ("preload" if mode_memory > 1 else "stream")
    assert f"-> {loader.mode}" in caplog.text  # the chosen mode is logged
    batches = list(loader)
    assert len(batches) == len(loader) == -(-193 * 44 // 700)
    assert all(len(b["n"]) == 700 for b in batches[:-1])
    b = {k: torch.cat([x[k] for x in batches]) for k in batches[0]}
    assert all(v.dtype == torch.float32 for k, v in b.items() if k != "n") and b["n"].dtype == torch.int64
    s, n = shower_index(truth, b["e_inc"]), b["n"].numpy()
    assert n.min() == 1 and n.max() == 44
    np.testing.assert_array_equal(b["prev"].numpy(), truth["voxels"][s, n - 1])
    np.testing.assert_array_equal(b["cur"].numpy(), truth["voxels"][s, n])
    np.testing.assert_array_equal(b["e_prev"].numpy(), truth["layer_e"][s, n - 1].astype(np.float32))
    np.testing.assert_array_equal(b["e_cur"].numpy(), truth["layer_e"][s, n].astype(np.float32))
    # Every (shower, n) pair of the shard exactly once: rank 1 of 2 owns showers 193..385.
    assert Counter(zip(s.tolist(), n.tolist(), strict=True)) == Counter(
        (i, k) for i in range(193, 386) for k in range(1, 45)
    )


def test_preload_and_stream_same_multiset_and_seeding(store: PairStore) -> None:
    def epoch(memory: float, e: int, seed: int = 0) -> list[tuple[float, int]]:
        loader = ShardedLoader(store, "train", "pairs", batch_size=512, memory_gb=memory, seed=seed)
        loader.set_epoch(e)
        return [(float(x), int(m)) for b in loader for x, m in zip(b["e_inc"], b["n"], strict=True)]

    pre, st = epoch(2.0, 0), epoch(1e-4, 0)
    assert sorted(pre) == sorted(st) and pre != st
    assert epoch(2.0, 0) == pre and epoch(1e-4, 0) == st  # same (seed, epoch) -> same order
    assert epoch(2.0, 1) != pre and epoch(1e-4, 1) != st  # a new epoch reshuffles
    assert epoch(2.0, 0, seed=5) != pre


def test_layer0_and_val(store: PairStore, truth: dict[str, np.ndarray]) -> None:
    for memory in (2.0, 1e-4):
        loader = ShardedLoader(store, "train", "layer0", batch_size=100, memory_gb=memory)
        b = {k: torch.cat([x[k] for x in loader]) for k in ("e_inc", "e0", "layer")}
        s = shower_index(truth, b["e_inc"])
        assert sorted(s.tolist()) == list(range(store.n_train))
        np.testing.assert_array_equal(b["layer"].numpy(), truth["voxels"][s, 0])
        np.testing.assert_array_equal(b["e0"].numpy(), truth["layer_e"][s, 0].astype(np.float32))
    val = ShardedLoader(store, "val", "energies", batch_size=1000)
    (only,) = list(val)
    assert len(only["e_inc"]) == store.n_val == 43


def test_bad_loader_arguments(store: PairStore) -> None:
    with pytest.raises(UserError, match="kind"):
        ShardedLoader(store, "train", "voxels")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="too few"):
        ShardedLoader(store, "val", "pairs", world_size=100, rank=0)
    with pytest.raises(UserError, match="outside"):
        ShardedLoader(store, "train", "pairs", world_size=2, rank=2)
