"""data_prep.convert end to end: real subprocesses, real MPI ranks (mpiexec from the mpich wheel), real files."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from hpc_calo.data import open_store
from hpc_calo.data.store import DONE, SPLITS, VOXELS
from hpc_calo.errors import UserError
from hpc_calo.geometry import DS2
from hpc_calo.io import CaloFile, CaloWriter

BIN = Path(sys.executable).parent
MPIEXEC = BIN / "mpiexec"
# Small chunks and blocks so that a few hundred showers still make many chunks, blocks and rank boundaries.
SMALL = ["--chunk-showers", "32", "--block-showers", "64", "--quiet"]


# The real converter, each rank SIGKILLing itself (uncatchable: no cleanup) after it has converted N blocks,
# through the request's public per-block callback.
KILLED_AFTER = """
import os, signal, sys
from dataclasses import replace
from data_prep.convert import convert, parse_request

def kill(blocks):
    if blocks >= int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)

sys.exit(convert(replace(parse_request(sys.argv[2:]), after_block=kill)))
"""


def convert(*args: object, ranks: int = 1, kill_after: int | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "data_prep.convert", *map(str, args)]
    if kill_after is not None:
        cmd = [sys.executable, "-c", KILLED_AFTER, str(kill_after), *map(str, args)]
    if ranks > 1:
        cmd = [str(MPIEXEC), "-n", str(ranks), *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def content(store: Path) -> dict[str, object]:
    """Every file's bytes, with the root attributes parsed and the timing record dropped."""
    out: dict[str, object] = {}
    for f in sorted(store.rglob("*")):
        if f.is_file():
            out[str(f.relative_to(store))] = f.read_bytes()
    meta = json.loads(out.pop("zarr.json"))
    meta["attributes"].pop("timing")
    out["zarr.json"] = meta
    return out


@pytest.fixture(scope="module")
def inputs(synthetic) -> list[Path]:
    # Two files of different lengths: the concatenation crosses a file boundary inside a chunk.
    return [synthetic("ds2", 300, seed=11), synthetic("ds2", 150, seed=12)]


@pytest.fixture(scope="module")
def reference(inputs: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The store of an uninterrupted 1-rank run."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    r = convert("--dataset", "ds2", *inputs, "--out", out, "--val-fraction", "0.2", *SMALL)
    assert r.returncode == 0, r.stderr
    return out


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_store_holds_the_inputs(reference: Path, inputs: list[Path]) -> None:
    store = open_store(reference, DS2)
    with CaloFile(inputs[0]) as a, CaloFile(inputs[1]) as b:
        e = np.concatenate([a.read(0, a.n).incident_energies, b.read(0, b.n).incident_energies])
        s = np.concatenate([a.read(0, a.n).showers, b.read(0, b.n).showers])
    assert (store.n_train, store.n_val) == (360, 90)  # the last 20 % of the concatenation is validation
    for split, rows in (("train", slice(0, 360)), ("val", slice(360, 450))):
        np.testing.assert_array_equal(store.array(split, "e_inc")[:], e[rows])
        vox = store.array(split, VOXELS)[:]
        np.testing.assert_array_equal(vox, DS2.layers(s[rows]))
        np.testing.assert_array_equal(store.array(split, "layer_e")[:], vox.sum(axis=2, dtype=np.float64))
        assert store.array(split, DONE)[:].all()
    attrs = store.attrs
    assert attrs["dataset"] == "ds2" and attrs["complete"] is True
    assert attrs["format_version"] == 1 and attrs["converter_version"]
    for src, path in zip(attrs["sources"], inputs, strict=True):
        assert src["bytes"] == path.stat().st_size
        assert len(src["sha256"]) == 64
    assert attrs["geometry"] == {"n_alpha": 16, "n_r": 9, "n_layers": 45}


@pytest.mark.integration
def test_one_and_two_ranks_identical(reference: Path, inputs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "two.zarr"
    r = convert("--dataset", "ds2", *inputs, "--out", out, "--val-fraction", "0.2", *SMALL, ranks=2)
    assert r.returncode == 0, r.stderr
    assert content(out) == content(reference)


@pytest.mark.integration
def test_kill_and_resume_identical(reference: Path, inputs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "killed.zarr"
    cmd = ("--dataset", "ds2", *inputs, "--out", out, "--val-fraction", "0.2", *SMALL)
    # Rank processes SIGKILL themselves after 2 blocks each: a real kill, no cleanup; mpiexec tears down the job.
    r = convert(*cmd, ranks=2, kill_after=2)
    assert r.returncode != 0
    with pytest.raises(UserError, match="incomplete"):
        open_store(out)
    root = zarr.open_group(out, mode="r")
    done = {split: root[f"{split}/{DONE}"][:] for split in SPLITS}
    assert 0 < sum(int(d.sum()) for d in done.values()) < sum(d.size for d in done.values())
    written = {p: p.stat().st_mtime_ns for p in (out / "train" / VOXELS / "c").rglob("*") if p.is_file()}
    done_files = {p for p in written if done["train"][int(p.relative_to(out / "train" / VOXELS / "c").parts[0])]}

    r = convert(*cmd)  # resumed with another rank count: the work list is whatever is not done
    assert r.returncode == 0, r.stderr
    assert content(out) == content(reference)
    # Only what was missing was converted: chunks marked done before the kill were not rewritten.
    assert done_files and all(p.stat().st_mtime_ns == written[p] for p in done_files)


def test_rerun_of_complete_store_does_nothing(reference: Path, inputs: list[Path]) -> None:
    before = content(reference)
    r = convert("--dataset", "ds2", *inputs, "--out", reference, "--val-fraction", "0.2", *SMALL)
    assert r.returncode == 0 and "nothing to do" in r.stderr
    assert content(reference) == before


# ------------------------------------------------------------------------------------------ bad input


def _copy_with(src: Path, dst: Path, edit) -> Path:
    with CaloFile(src) as f:
        b = f.read(0, f.n)
    e, s = b.incident_energies.copy(), b.showers.copy()
    edit(e, s)
    with CaloWriter(dst, DS2) as w:
        w.write(e, s)
    return dst


def test_wrong_dataset(inputs: list[Path], tmp_path: Path) -> None:
    line = one_error_line(convert("--dataset", "ds3", inputs[0], "--out", tmp_path / "s.zarr", *SMALL))
    assert str(inputs[0]) in line and "ds2 file" in line
    assert not (tmp_path / "s.zarr").exists()


def test_mixed_datasets(inputs: list[Path], synthetic, tmp_path: Path) -> None:
    ds3 = synthetic("ds3", 20, seed=1)
    line = one_error_line(convert("--dataset", "ds2", inputs[0], ds3, "--out", tmp_path / "s.zarr", *SMALL))
    assert str(ds3) in line and "different datasets" in line
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("nan", "NaN or inf (first at row 201)"),
        ("negative", "negative energies (first at row 201)"),
        ("energy", "incident_energies contain NaN or inf (first at row 201)"),
    ],
)
def test_bad_values_name_file_and_rows(inputs: list[Path], tmp_path: Path, what: str, message: str) -> None:
    def edit(e: np.ndarray, s: np.ndarray) -> None:
        if what == "nan":
            s[201, 77] = np.nan
        elif what == "negative":
            s[201, 5] = -1.0
        else:
            e[201] = np.nan

    bad = _copy_with(inputs[0], tmp_path / "bad.h5", edit)
    out = tmp_path / "s.zarr"
    line = one_error_line(convert("--dataset", "ds2", bad, "--out", out, *SMALL))
    assert str(bad) in line and "rows 192-256" in line and message in line and "incomplete" in line
    with pytest.raises(UserError, match="incomplete"):
        open_store(out)


@pytest.mark.integration
def test_error_on_one_rank_does_not_hang(inputs: list[Path], tmp_path: Path) -> None:
    bad = _copy_with(inputs[0], tmp_path / "bad.h5", lambda e, s: s.__setitem__((280, 0), np.inf))
    out = tmp_path / "s.zarr"
    # Row 280 lies in the second rank's half of the chunks; the first rank must learn of it and stop too.
    line = one_error_line(convert("--dataset", "ds2", bad, "--out", out, *SMALL, ranks=2))
    assert str(bad) in line and "first at row 280" in line
    with pytest.raises(UserError, match="incomplete"):
        open_store(out)


def test_truncated_file(inputs: list[Path], tmp_path: Path) -> None:
    bad = tmp_path / "truncated.h5"
    shutil.copy(inputs[0], bad)
    with open(bad, "r+b") as f:
        f.truncate(bad.stat().st_size // 2)
    line = one_error_line(convert("--dataset", "ds2", bad, "--out", tmp_path / "s.zarr", *SMALL))
    assert str(bad) in line and "truncated" in line
    with pytest.raises(UserError):
        open_store(tmp_path / "s.zarr")


def test_output_is_another_store_or_not_a_store(reference: Path, inputs: list[Path], tmp_path: Path) -> None:
    before = content(reference)
    line = one_error_line(convert("--dataset", "ds2", inputs[1], "--out", reference, *SMALL))
    assert str(reference) in line and "different request" in line and "--overwrite" in line
    assert content(reference) == before

    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        line = one_error_line(convert("--dataset", "ds2", inputs[1], "--out", other, *SMALL, *extra))
        assert "is not an hpc-calo pair store" in line
    assert (other / "notes.txt").read_text() == "keep me"


def test_overwrite_replaces_a_store(reference: Path, inputs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    shutil.copytree(reference, out)
    r = convert("--dataset", "ds2", inputs[1], "--out", out, "--overwrite", *SMALL)
    assert r.returncode == 0, r.stderr
    store = open_store(out)
    assert store.n_train + store.n_val == 150


def test_memory_budget_too_small(inputs: list[Path], tmp_path: Path) -> None:
    line = one_error_line(convert("--dataset", "ds2", inputs[0], "--out", tmp_path / "s.zarr", "--memory-gb", "0.1"))
    assert "--memory-gb" in line


def test_the_kill_is_a_real_kill(inputs: list[Path], tmp_path: Path) -> None:
    r = convert("--dataset", "ds2", *inputs, "--out", tmp_path / "k.zarr", *SMALL, kill_after=1)
    assert r.returncode == -signal.SIGKILL
