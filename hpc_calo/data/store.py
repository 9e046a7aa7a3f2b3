"""The Zarr pair store: its layout (the one place that knows it), the reader, and the sharded batch loader.

Layout (zarr v3, one directory)::

    STORE.zarr/            attrs: format, format_version, dataset, geometry, converter_version, sources,
                                  split, request, n_train, n_val, chunk_showers, codec, complete (written last)
      train/ val/          one group per split, rows = showers in the order of the concatenated inputs
        e_inc    (N,)          float64 MeV        chunks (c,)
        layer_e  (N, 45)       float64 MeV        chunks (c, 45)      per-layer sums of the voxels
        voxels   (N, 45, V)    float32 MeV        chunks (c, 45, V)   whole showers: every (n-1, n) pair
                                                                      of layers lies inside one chunk
        done     (n_chunks,)   bool               chunks (1,)         converter progress, one file per chunk

The converter (``data_prep.convert``) writes through :func:`create_store`; everything else opens with
:func:`open_store`, which refuses incomplete, foreign and other-dataset stores.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from hpc_calo.errors import UserError
from hpc_calo.geometry import E_INC_MAX_MEV, E_INC_MIN_MEV, N_LAYERS, Geometry, get_geometry
from hpc_calo.prefetch import prefetch

log = logging.getLogger(__name__)

FORMAT = "hpc-calo-pair-store"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
E_INC, LAYER_E, VOXELS, DONE = "e_inc", "layer_e", "voxels", "done"
# Raw bytes of one voxel chunk; c = CHUNK_BYTES // shower bytes (DS2 -> 161 showers, DS3 -> 25). Chosen by
# measuring the training reader (bench_prep.md): smaller chunks shuffle better in streaming mode but cost
# per-chunk overhead, larger ones barely compress better.
CHUNK_BYTES = 4 * 2**20
# Plain zstd level 1: on the mostly-zero voxel chunks it compressed better (6.1x raw) AND decoded faster than
# zstd 3, Blosc-zstd with byte or bit shuffle, and Blosc-lz4 (sweep in bench_prep.md): the zero runs are what
# compresses, and shuffling breaks them up.
CODEC = {"name": "zstd", "level": 1}
PAIRS_PER_SHOWER = N_LAYERS - 1

Split = Literal["train", "val"]
Kind = Literal["energies", "layer0", "pairs"]


def chunk_showers(geometry: Geometry) -> int:
    return max(1, CHUNK_BYTES // (4 * geometry.n_voxels))


def split_sizes(n_total: int, val_fraction: float) -> tuple[int, int]:
    """(n_train, n_val): the LAST round(F * N) showers of the concatenated inputs are the validation split.

    CaloChallenge files are already shuffled, so a contiguous split is an unbiased one; it is independent of
    the number of ranks and lets every rank read its input rows sequentially.
    """
    n_val = int(np.floor(n_total * val_fraction + 0.5))
    return n_total - n_val, n_val


def n_chunks(n: int, chunk: int) -> int:
    return -(-n // chunk)


def _compressor() -> ZstdCodec:
    return ZstdCodec(level=CODEC["level"])


def create_store(
    path: Path, geometry: Geometry, n_train: int, n_val: int, chunk: int, attrs: dict[str, Any]
) -> zarr.Group:
    """Create the empty layout at ``path`` (which must not exist); ``complete`` stays false."""
    root = zarr.open_group(zarr.storage.LocalStore(path), mode="w-", zarr_format=3)
    root.attrs.update({**attrs, "format": FORMAT, "format_version": FORMAT_VERSION, "complete": False})
    v = geometry.voxels_per_layer
    for split, n in zip(SPLITS, (n_train, n_val), strict=True):
        g = root.create_group(split)
        c = min(chunk, max(n, 1))
        g.create_array(E_INC, shape=(n,), chunks=(c,), dtype="f8", compressors=None)
        g.create_array(LAYER_E, shape=(n, N_LAYERS), chunks=(c, N_LAYERS), dtype="f8", compressors=None)
        g.create_array(VOXELS, shape=(n, N_LAYERS, v), chunks=(c, N_LAYERS, v), dtype="f4", compressors=_compressor())
        g.create_array(DONE, shape=(n_chunks(n, chunk),), chunks=(1,), dtype="bool", fill_value=False, compressors=None)
    return root


def read_attrs(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The root attributes when ``path`` is a pair store (complete or not); None when it is not one."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        return None
    try:
        attrs = dict(zarr.open_group(zarr.storage.LocalStore(path, read_only=True), mode="r").attrs)
    except Exception:
        return None
    return attrs if attrs.get("format") == FORMAT else None


# The converter writes every data chunk, even an all-zero one (zarr skips those by default), so that a missing
# chunk file always means damage.
WRITE_EVERY_CHUNK = {"array.write_empty_chunks": True}


def _chunk_file(path: Path, split: str, name: str, array: zarr.Array, k: int) -> Path:
    return path / split / name / array.metadata.encode_chunk_key((k,) + (0,) * (array.ndim - 1))


def read_chunk(path: Path, root: zarr.Group, split: str, k: int, chunk: int,
               names: tuple[str, ...] = (E_INC, LAYER_E, VOXELS)) -> dict[str, np.ndarray]:
    """Rows of chunk ``k`` of a split, refusing a missing or undecodable chunk file by name.

    zarr reads a missing chunk file as zeros: the showers of a deleted chunk would train silently on zeros.
    """
    out = {}
    for name in names:
        arr = root[f"{split}/{name}"]
        a, b = k * chunk, min((k + 1) * chunk, arr.shape[0])
        f = _chunk_file(path, split, name, arr, k)
        problem = None if f.is_file() else "is missing"
        if problem is None:
            try:
                out[name] = np.asarray(arr[a:b])
            except Exception as err:  # any decode failure (truncated, garbled) of our own chunk file
                problem = f"is corrupt ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        if problem is not None:
            raise UserError(
                f"{path}: chunk file {f.relative_to(path)} (showers {a}-{b} of {split}) {problem}; repair the store "
                "by re-running the data_prep.convert command that made it with --repair"
            )
    return out


def damaged_chunks(path: Path) -> list[tuple[str, int]]:
    """(split, chunk) of every chunk marked done whose files are missing or corrupt (reads the whole store)."""
    root = zarr.open_group(zarr.storage.LocalStore(path, read_only=True), mode="r")
    chunk = int(root.attrs["chunk_showers"])
    bad = []
    for split in SPLITS:
        for k in np.flatnonzero(root[f"{split}/{DONE}"][:]):
            try:
                read_chunk(path, root, split, int(k), chunk)
            except UserError:
                bad.append((split, int(k)))
    return bad


def mark_pending(path: Path, chunks: list[tuple[str, int]]) -> None:
    """Un-mark chunks (and the store's completeness) so the converter writes them again."""
    root = zarr.open_group(zarr.storage.LocalStore(path), mode="r+")
    root.attrs["complete"] = False
    for split, k in chunks:
        root[f"{split}/{DONE}"][k] = False


class PairStore:
    """A complete pair store opened read-only."""

    def __init__(self, path: Path, root: zarr.Group, attrs: dict[str, Any], geometry: Geometry) -> None:
        self.path = path
        self.root = root
        self.attrs = attrs
        self.geometry = geometry
        self.n_train = int(attrs["n_train"])
        self.n_val = int(attrs["n_val"])
        self.chunk_showers = int(attrs["chunk_showers"])

    def n(self, split: Split) -> int:
        return {"train": self.n_train, "val": self.n_val}[split]

    def array(self, split: Split, name: str) -> zarr.Array:
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}: choose train or val")
        return self.root[f"{split}/{name}"]

    def energy_range(self) -> tuple[float, float]:
        """The incident-energy range a model trained on this store covers.

        Training sets are drawn log-uniformly from the nominal CaloChallenge range, so their extreme values sit
        just inside it; an end within 5% of the nominal bound counts as reaching it. Otherwise (a restricted
        training set) the observed range is the trained range.
        """
        e = np.asarray(self.array("train", "e_inc")[:])
        if len(e) == 0:
            return (E_INC_MIN_MEV, E_INC_MAX_MEV)
        lo, hi = float(e.min()), float(e.max())
        lo = E_INC_MIN_MEV if lo <= 1.05 * E_INC_MIN_MEV else lo
        hi = E_INC_MAX_MEV if hi >= E_INC_MAX_MEV / 1.05 else hi
        return (lo, hi)

    def __repr__(self) -> str:
        return f"PairStore({str(self.path)!r}, {self.geometry.name}, train={self.n_train}, val={self.n_val})"


def open_store(path: str | os.PathLike[str], geometry: Geometry | None = None) -> PairStore:
    """Open a complete store; UserError when it is missing, incomplete, foreign or of another dataset."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such store (make one with python -m data_prep.convert)")
    if not (path / "zarr.json").is_file():
        raise UserError(f"{path}: not a Zarr v3 store (no zarr.json)")
    try:
        root = zarr.open_group(zarr.storage.LocalStore(path, read_only=True), mode="r")
        attrs = dict(root.attrs)
    except Exception as err:
        raise UserError(f"{path}: cannot be opened as a Zarr group: {err}") from None
    if attrs.get("format") != FORMAT:
        raise UserError(f"{path}: not an hpc-calo pair store (format {attrs.get('format')!r})")
    if attrs.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path}: store format version {attrs.get('format_version')} is not supported (this reader reads "
            f"version {FORMAT_VERSION}); convert the data again"
        )
    if attrs.get("complete") is not True:
        raise UserError(
            f"{path}: incomplete store (the conversion did not finish); re-run the same convert command to resume"
        )
    for split in SPLITS:
        done = np.asarray(root[f"{split}/{DONE}"][:])
        if not done.all():
            k = int(np.argmin(done))
            raise UserError(f"{path}: chunk {k} of {split} is not marked done (the store was altered); repair it "
                            "by re-running the data_prep.convert command that made it with --repair")
    store_geo = get_geometry(attrs["dataset"])
    if geometry is not None and geometry.name != store_geo.name:
        raise UserError(f"{path}: the store holds {store_geo.name} showers, but {geometry.name} was requested")
    return PairStore(path, root, attrs, store_geo)


# ----------------------------------------------------------------------------------------------- loader


@dataclass(frozen=True)
class _Rows:
    """Arrays of a run of showers, already float32 (voxels only where the kind needs them)."""

    e_inc: np.ndarray  # (s,)
    layer_e: np.ndarray  # (s, 45)
    voxels: np.ndarray | None  # (s, 45, V) for pairs, (s, V) for layer0, None for energies


def _items_per_shower(kind: Kind) -> int:
    return PAIRS_PER_SHOWER if kind == "pairs" else 1


class ShardedLoader:
    """Batches of one rank's disjoint share of a split, preloaded when it fits ``memory_gb``, else streamed.

    Sharding: rank r owns the S = N // world_size consecutive showers [r S, (r + 1) S) of the split; the last
    N mod world_size (< world_size) showers are unused, so every rank has the same number of items (showers,
    or (shower, n) pairs for n = 1..44) and ``len(loader) = ceil(items / batch_size)`` on every rank. Each
    epoch yields every item of the shard once; the last batch may be smaller (the same size on every rank).

    Shuffling: seeded by (seed, epoch, rank). Preloaded: one permutation of all items. Streamed: the shard's
    chunks in a random order, read into a buffer of as many chunks as half the budget holds (the other half
    is the prefetch of the next buffer), items permuted within the buffer.
    """

    def __init__(
        self,
        store: PairStore,
        split: Split = "train",
        kind: Kind = "pairs",
        batch_size: int = 1000,
        rank: int = 0,
        world_size: int = 1,
        memory_gb: float = 2.0,
        seed: int = 0,
        pin_memory: bool = False,
    ) -> None:
        if kind not in ("energies", "layer0", "pairs"):
            raise UserError(f"unknown batch kind {kind!r}: choose energies, layer0 or pairs")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world size {world_size}")
        if batch_size < 1:
            raise UserError(f"batch size must be positive, not {batch_size}")
        self.store, self.split, self.kind = store, split, kind
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.epoch = seed, 0
        self.pin_memory = pin_memory  # page-locked batches: the training loop's GPU copies run asynchronously
        n = store.n(split)
        self.shard_size = n // world_size
        if self.shard_size == 0:
            raise UserError(f"{store.path}: the {split} split has {n} showers, too few for {world_size} rank(s)")
        self.start = rank * self.shard_size
        self.stop = self.start + self.shard_size
        self.n_items = self.shard_size * _items_per_shower(kind)
        v = store.geometry.voxels_per_layer
        vox_bytes = {"energies": 0, "layer0": v * 4, "pairs": N_LAYERS * v * 4}[kind]
        self.shower_bytes = vox_bytes + 4 * (1 + N_LAYERS)
        self.budget_bytes = int(memory_gb * 2**30)
        index_bytes = 8 * self.n_items  # the epoch permutation
        self.share_bytes = self.shard_size * self.shower_bytes
        self.mode = "preload" if self.share_bytes + index_bytes <= self.budget_bytes else "stream"
        self._rows: _Rows | None = None
        c = store.chunk_showers
        self._chunk_ids = np.arange(self.start // c, n_chunks(self.stop, c))
        self.buffer_chunks = max(1, int(0.5 * self.budget_bytes // (c * self.shower_bytes)))
        log.info(
            "%s loader rank %d/%d: %d %s showers (%.3g GB needed of %.3g GB budget) -> %s%s",
            kind,
            rank,
            world_size,
            self.shard_size,
            split,
            self.share_bytes / 1e9,
            self.budget_bytes / 1e9,
            self.mode,
            "" if self.mode == "preload" else f" through a buffer of {self.buffer_chunks} chunks",
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return -(-self.n_items // self.batch_size)

    # -- reading

    def _read_chunks(self, chunk_ids: np.ndarray) -> _Rows:
        """The shard's showers in the given chunks, read one chunk at a time into preallocated arrays.

        Chunk by chunk because it measured faster than one large zarr read (which schedules every chunk at
        once) and keeps the transient memory at one chunk.
        """
        c = self.store.chunk_showers
        spans = [(max(k * c, self.start), min((k + 1) * c, self.stop)) for k in np.sort(chunk_ids)]
        n = sum(b - a for a, b in spans)
        v = self.store.geometry.voxels_per_layer
        e_inc = np.empty(n, np.float32)
        layer_e = np.empty((n, N_LAYERS), np.float32)
        voxels = {"energies": None, "layer0": (n, v), "pairs": (n, N_LAYERS, v)}[self.kind]
        voxels = None if voxels is None else np.empty(voxels, np.float32)
        names = (E_INC, LAYER_E) if voxels is None else (E_INC, LAYER_E, VOXELS)
        i = 0
        for k, (a, b) in zip(np.sort(chunk_ids), spans, strict=True):
            j = i + b - a
            rows = read_chunk(self.store.path, self.store.root, self.split, int(k), c, names)
            sel = slice(a - k * c, b - k * c)
            e_inc[i:j] = rows[E_INC][sel]
            layer_e[i:j] = rows[LAYER_E][sel]
            if voxels is not None:
                voxels[i:j] = rows[VOXELS][sel, 0, :] if self.kind == "layer0" else rows[VOXELS][sel]
            i = j
        return _Rows(e_inc, layer_e, voxels)

    # -- batching

    def _gather(self, rows: _Rows, items: np.ndarray) -> dict[str, np.ndarray]:
        if self.kind == "energies":
            return {"e_inc": rows.e_inc[items], "layer_e": rows.layer_e[items]}
        if self.kind == "layer0":
            return {"e_inc": rows.e_inc[items], "e0": rows.layer_e[items, 0], "layer": rows.voxels[items]}
        s, n = np.divmod(items, PAIRS_PER_SHOWER)
        n += 1
        flat = rows.voxels.reshape(-1, rows.voxels.shape[-1])  # (s * 45, V): one row per (shower, layer)
        cur_rows = s * N_LAYERS + n
        return {
            "e_inc": rows.e_inc[s],
            "prev": flat.take(cur_rows - 1, axis=0),
            "cur": flat.take(cur_rows, axis=0),
            "e_prev": rows.layer_e[s, n - 1],
            "e_cur": rows.layer_e[s, n],
            "n": n,
        }

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, self.rank])

    def _preloaded(self) -> Iterator[dict[str, np.ndarray]]:
        if self._rows is None:
            self._rows = self._read_chunks(self._chunk_ids)
        perm = self._rng().permutation(self.n_items)
        for i in range(0, self.n_items, self.batch_size):
            yield self._gather(self._rows, perm[i : i + self.batch_size])

    def _buffers(self, rng: np.random.Generator) -> Iterator[_Rows]:
        """Buffers of shuffled chunks, the next one read in a background thread while this one is used."""
        order = rng.permutation(self._chunk_ids)
        groups = [order[i : i + self.buffer_chunks] for i in range(0, len(order), self.buffer_chunks)]
        yield from prefetch((self._read_chunks(g) for g in groups), depth=1, name="ShardedLoader-prefetch")

    def _streamed(self) -> Iterator[dict[str, np.ndarray]]:
        rng = self._rng()
        per = _items_per_shower(self.kind)
        carry: dict[str, np.ndarray] | None = None
        for rows in self._buffers(rng):
            items = rng.permutation(len(rows.e_inc) * per)
            first = 0
            if carry is not None:  # complete the batch left over from the previous buffer
                take = self.batch_size - len(carry["e_inc"])
                part = self._gather(rows, items[:take])
                carry = {k: np.concatenate([carry[k], part[k]]) for k in carry}
                first = take
                if len(carry["e_inc"]) < self.batch_size:
                    continue
                yield carry
                carry = None
            for i in range(first, len(items), self.batch_size):
                batch = self._gather(rows, items[i : i + self.batch_size])
                if len(batch["e_inc"]) < self.batch_size:
                    carry = batch
                else:
                    yield batch
        if carry is not None:
            yield carry

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import torch  # the converter imports this module too and needs no torch

        batches = self._preloaded() if self.mode == "preload" else self._streamed()
        for b in batches:
            out = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in b.items()}
            yield {k: v.pin_memory() for k, v in out.items()} if self.pin_memory else out
