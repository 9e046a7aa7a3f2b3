"""The CaloChallenge DNN classifier test, with its data streamed from disk so memory does not grow with N.

Official recipe (CaloChallenge ``evaluate.py``): label GEN 0 and REF 1; shuffle each class, split it 60/20/20
into train/test/validation, merge the classes per split and shuffle; a DNN Linear(d, 2048)-LeakyReLU,
2 x [Linear(2048, 2048)-LeakyReLU], Linear(2048, 1) trained with BCE-with-logits, Adam lr 2e-4, batch 1000,
50 epochs; after each epoch the accuracy on the test split picks the best epoch (training stops early at
accuracy 1); an isotonic regression (clipped to [1e-6, 1 - 1e-6]) fitted on the best model's test-split
probabilities calibrates it; AUC and JSD = (ln 2 - BCE) / ln 2 are reported on the validation split.

Differences, on purpose: the official script holds everything in RAM (> 24 GB for DS2 low-level) and uses
float64; here each split is one float32 row file on disk written once in the fully shuffled order, and a
training epoch visits the rows in a fresh random order of 1000-row chunks mixed in a bounded shuffle buffer
(the whole split when it fits in the buffer), read ahead by a background thread. Memory is bounded by the
buffer size, not by N.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.special import expit
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from hpc_calo.cpus import ThreadGovernor
from hpc_calo.io import Block
from hpc_calo.prefetch import prefetch

SPLITS = ("train", "test", "val")
LN2 = float(np.log(2.0))


@dataclass(frozen=True)
class ClassifierConfig:
    epochs: int = 50
    hidden: int = 2048
    n_hidden_layers: int = 2  # Linear(hidden, hidden) blocks after the input layer
    lr: float = 2e-4
    batch_size: int = 1000
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    buffer_bytes: int = 512 * 2**20  # shuffle buffer; twice this is in memory with read-ahead
    device: str = "cpu"
    seed: int = 0


def build_dnn(input_dim: int, cfg: ClassifierConfig) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = [torch.nn.Linear(input_dim, cfg.hidden), torch.nn.LeakyReLU()]
    for _ in range(cfg.n_hidden_layers):
        layers += [torch.nn.Linear(cfg.hidden, cfg.hidden), torch.nn.LeakyReLU()]
    layers.append(torch.nn.Linear(cfg.hidden, 1))
    return torch.nn.Sequential(*layers)


@dataclass
class SplitPlan:
    """Where every used shower of each class goes: its split and its row in that split's file."""

    n_per_class: int
    sizes: dict[str, int]
    dest_split: list[np.ndarray]  # per class: (n,) index into SPLITS
    dest_row: list[np.ndarray]  # per class: (n,) row inside the split file
    labels: dict[str, np.ndarray]  # per split: (rows,) float32 labels, in file order

    @classmethod
    def make(cls, n_per_class: int, cfg: ClassifierConfig) -> SplitPlan:
        rng = np.random.default_rng(cfg.seed)
        # Official: (len * split).astype(int) for train and test, the remainder (np.split) is validation.
        n_train = int(n_per_class * cfg.fractions[0])
        n_test = int(n_per_class * cfg.fractions[1])
        sizes = {"train": n_train, "test": n_test, "val": n_per_class - n_train - n_test}
        dest_split = [np.empty(n_per_class, np.int64) for _ in range(2)]
        dest_row = [np.empty(n_per_class, np.int64) for _ in range(2)]
        labels = {}
        for split in SPLITS:
            m = sizes[split]
            rows = rng.permutation(2 * m)  # the merged split is shuffled once more
            lab = np.empty(2 * m, np.float32)
            for c in range(2):
                lab[rows[c * m : (c + 1) * m]] = float(c)
            labels[split] = lab
        offsets = np.cumsum([0, sizes["train"], sizes["test"]])
        for c in range(2):
            perm = rng.permutation(n_per_class)  # shuffle each class before splitting it
            for s_idx, split in enumerate(SPLITS):
                src = perm[offsets[s_idx] : offsets[s_idx] + sizes[split]]
                dest_split[c][src] = s_idx
                rows_c = np.flatnonzero(labels[split] == float(c))
                dest_row[c][src] = rng.permutation(rows_c)
        return cls(n_per_class, sizes, dest_split, dest_row, labels)


@dataclass
class RowFile:
    """A raw float32 (rows, dim) file read and written with explicit pread/pwrite (no mmap: bounded RSS)."""

    path: Path
    rows: int
    dim: int
    labels: np.ndarray
    _fd: int = field(init=False, default=-1)

    def open(self, create: bool) -> RowFile:
        flags = os.O_RDWR | (os.O_CREAT | os.O_TRUNC if create else 0)
        self._fd = os.open(self.path, flags, 0o600)
        if create:
            os.ftruncate(self._fd, self.rows * self.dim * 4)
        return self

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def write_rows(self, rows: np.ndarray, data: np.ndarray) -> None:
        data = np.ascontiguousarray(data, dtype=np.float32)
        stride = self.dim * 4
        order = np.argsort(rows)
        for i in order:  # ascending offsets: friendlier to the page cache and the disk
            os.pwrite(self._fd, data[i].tobytes(), int(rows[i]) * stride)

    def read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, self.dim), np.float32)
        buf = memoryview(out).cast("B")
        offset, done = start * self.dim * 4, 0
        while done < len(buf):
            n = os.preadv(self._fd, [buf[done:]], offset + done)
            if n <= 0:
                raise OSError(f"{self.path}: short read at byte {offset + done}")
            done += n
        return out


class ClassifierData:
    """The three split files of one classifier test, under ``workdir``."""

    def __init__(self, workdir: Path, plan: SplitPlan, dim: int) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.plan = plan
        self.dim = dim
        self.files = {
            s: RowFile(workdir / f"{s}.f32", 2 * plan.sizes[s], dim, plan.labels[s]).open(create=True) for s in SPLITS
        }

    def close(self, remove: bool = True) -> None:
        for f in self.files.values():
            f.close()
            if remove:
                f.path.unlink(missing_ok=True)

    def add(self, cls: int, src_rows: np.ndarray, data: np.ndarray) -> None:
        """Store rows ``data`` of class ``cls`` whose source indices are ``src_rows`` (all < n_per_class)."""
        split_idx = self.plan.dest_split[cls][src_rows]
        dest = self.plan.dest_row[cls][src_rows]
        for s_idx, split in enumerate(SPLITS):
            sel = split_idx == s_idx
            if sel.any():
                self.files[split].write_rows(dest[sel], data[sel])


def low_level_rows(block: Block) -> np.ndarray:
    """Official low-level input: log10(E_inc / MeV) and the (thresholded) voxels divided by E_inc."""
    e = block.incident_energies[:, None]
    return np.concatenate([np.log10(e), block.showers / e], axis=1).astype(np.float32)


@dataclass
class LowLevelWriter:
    """Block consumer writing one class's low-level rows into the split files."""

    data: ClassifierData
    cls: int

    def __call__(self, block: Block) -> None:
        stop = min(block.stop, self.data.plan.n_per_class)
        if stop <= block.start:
            return
        k = stop - block.start
        sub = Block(block.start, block.incident_energies[:k], block.showers[:k])
        self.data.add(self.cls, np.arange(block.start, stop), low_level_rows(sub))


def _batches(f: RowFile, batch_size: int, rng: np.random.Generator | None, buffer_rows: int):
    """Batches (x, y) of a split file; with ``rng``, chunk order shuffled and rows mixed in a buffer."""
    starts = np.arange(0, f.rows, batch_size)
    if rng is not None:
        starts = rng.permutation(starts)
    per_buffer = max(1, buffer_rows // batch_size)
    for i in range(0, len(starts), per_buffer):
        group = starts[i : i + per_buffer]
        x = np.concatenate([f.read(a, min(a + batch_size, f.rows)) for a in group])
        y = np.concatenate([f.labels[a : min(a + batch_size, f.rows)] for a in group])
        if rng is not None:
            p = rng.permutation(len(x))
            x, y = x[p], y[p]
        for j in range(0, len(x), batch_size):
            yield x[j : j + batch_size], y[j : j + batch_size]


@torch.no_grad()
def _logits(model: torch.nn.Module, f: RowFile, cfg: ClassifierConfig, buffer_rows: int) -> np.ndarray:
    model.eval()
    dev = torch.device(cfg.device)
    out = [
        model(torch.from_numpy(x).to(dev)).reshape(-1).double().cpu().numpy()
        for x, _ in prefetch(_batches(f, cfg.batch_size, None, buffer_rows), depth=2)
    ]
    return np.concatenate(out) if out else np.zeros(0)


def _bce(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def _scores(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    bce = _bce(p, y)
    return {
        "auc": float(roc_auc_score(y, p)),
        "jsd": (LN2 - bce) / LN2,
        "bce": bce,
        "accuracy": float(np.mean((p > 0.5) == (y > 0.5))),
    }


def train_and_score(data: ClassifierData, cfg: ClassifierConfig, desc: str,
                    threads: ThreadGovernor | None = None) -> dict[str, object]:
    """Train with the official recipe; return calibrated (headline) and raw scores on the validation split.

    ``threads`` is polled after every batch (torch threads follow the CPUs other processes leave free)."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed + 1)
    dev = torch.device(cfg.device)
    buffer_rows = max(cfg.batch_size, cfg.buffer_bytes // (4 * data.dim))
    model = build_dnn(data.dim, cfg).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)  # the official Adam, in one kernel
    loss_fn = torch.nn.BCEWithLogitsLoss()
    train, test, val = (data.files[s] for s in SPLITS)
    best_acc, best_epoch, best_state = -1.0, 0, copy.deepcopy(model.state_dict())
    history = []
    n_batches = -(-train.rows // cfg.batch_size)
    with tqdm(total=cfg.epochs * n_batches, desc=desc, unit="batch", leave=False) as bar:
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            total, seen = 0.0, 0
            for x, y in prefetch(_batches(train, cfg.batch_size, rng, buffer_rows), depth=2):
                xb, yb = torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)
                loss = loss_fn(model(xb).reshape(-1), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(x)
                seen += len(x)
                bar.update(1)
                if threads is not None:
                    threads.poll()
            test_acc = float(np.mean((_logits(model, test, cfg, buffer_rows) > 0) == (test.labels > 0.5)))
            history.append({"epoch": epoch, "train_loss": total / max(seen, 1), "test_accuracy": test_acc})
            bar.set_postfix(epoch=epoch, test_acc=f"{test_acc:.4f}")
            if test_acc > best_acc:
                best_acc, best_epoch, best_state = test_acc, epoch, copy.deepcopy(model.state_dict())
            if test_acc == 1.0:
                break
    model.load_state_dict(best_state)
    p_test = expit(_logits(model, test, cfg, buffer_rows))
    p_val = expit(_logits(model, val, cfg, buffer_rows))
    iso = IsotonicRegression(out_of_bounds="clip", y_min=1e-6, y_max=1.0 - 1e-6).fit(p_test, test.labels)
    calibrated = _scores(np.asarray(iso.predict(p_val)), val.labels)
    return {
        **calibrated,
        "uncalibrated": _scores(p_val, val.labels),
        "best_epoch": best_epoch,
        "best_test_accuracy": best_acc,
        "epochs_run": len(history),
        "history": history,
        "input_dim": data.dim,
        "batch_size": cfg.batch_size,
        "n_params": sum(p.numel() for p in model.parameters()),
        "split_sizes_per_class": data.plan.sizes,
    }
