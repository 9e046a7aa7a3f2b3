"""CaloChallenge HDF5 I/O: streaming reader, atomic writer, and every bad input of ``hpc_calo.io check``."""

from __future__ import annotations

import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from hpc_calo.errors import UserError
from hpc_calo.geometry import DS2, DS3
from hpc_calo.io import CaloFile, CaloWriter, check_file, iter_blocks


def _write_raw(path, e, s, **extra):
    """A file written with plain h5py, to build broken inputs the CaloWriter would refuse."""
    with h5py.File(path, "w") as f:
        if e is not None:
            f["incident_energies"] = e
        if s is not None:
            f["showers"] = s
        for k, v in extra.items():
            f[k] = v
    return path


def _valid_arrays(n=20, geo=DS2, seed=0):
    rng = np.random.default_rng(seed)
    e = np.exp(rng.uniform(np.log(1e3), np.log(1e6), (n, 1)))
    s = (rng.random((n, geo.n_voxels)) < 0.3) * rng.exponential(1.0, (n, geo.n_voxels))
    return e, s.astype(np.float32)


def test_reader_streams_a_file_larger_than_the_block(synthetic):
    path = synthetic("ds2", 300, seed=0)
    with h5py.File(path, "r") as f:
        e_all, s_all = f["incident_energies"][:, 0], f["showers"][:]
    blocks = list(iter_blocks(path, DS2, block_size=64))
    assert len(blocks) == 5 and [b.start for b in blocks] == [0, 64, 128, 192, 256]
    assert all(len(b.incident_energies) == len(b.showers) <= 64 for b in blocks)
    np.testing.assert_array_equal(np.concatenate([b.incident_energies for b in blocks]), e_all)
    np.testing.assert_array_equal(np.concatenate([b.showers for b in blocks]), s_all)
    with CaloFile(path) as f:  # geometry inferred from the voxel count
        assert f.geometry is DS2 and len(f) == 300
        part = list(f.blocks(block_size=100, start=50, stop=260))
        assert [(b.start, b.stop) for b in part] == [(50, 150), (150, 250), (250, 260)]


@pytest.mark.parametrize("compression", ["gzip", "none"])
def test_writer_roundtrip_in_blocks(tmp_path, compression):
    e, s = _valid_arrays(50, DS3)
    target = tmp_path / "out.h5"
    with CaloWriter(target, DS3, compression=compression) as w:  # growing datasets, no n_total
        for a in range(0, 50, 16):
            w.write(e[a : a + 16, 0], s[a : a + 16])
    with h5py.File(target, "r") as f:
        assert f["incident_energies"].shape == (50, 1) and f["incident_energies"].dtype == np.float64
        assert f["showers"].shape == (50, DS3.n_voxels) and f["showers"].dtype == np.float32
        np.testing.assert_array_equal(f["showers"][:], s)
        assert f["showers"].compression == (None if compression == "none" else "gzip")
    assert check_file(target, DS3).n == 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]


def test_crash_inside_writer_leaves_no_file_and_no_temp(tmp_path):
    e, s = _valid_arrays(10)
    target = tmp_path / "crash.h5"
    with pytest.raises(RuntimeError, match="boom"), CaloWriter(target, DS2, n_total=10) as w:
        w.write(e[:5, 0], s[:5])
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_crash_keeps_an_existing_target_intact(tmp_path):
    e, s = _valid_arrays(10)
    target = tmp_path / "keep.h5"
    with CaloWriter(target, DS2, n_total=10) as w:
        w.write(e[:, 0], s)
    before = target.read_bytes()
    with pytest.raises(KeyboardInterrupt), CaloWriter(target, DS2, n_total=10) as w:
        w.write(e[:3, 0], s[:3])
        raise KeyboardInterrupt
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.h5"]


def test_short_write_is_an_error_and_leaves_nothing(tmp_path):
    e, s = _valid_arrays(10)
    target = tmp_path / "short.h5"
    with pytest.raises(ValueError, match="expected 10"), CaloWriter(target, DS2, n_total=10) as w:
        w.write(e[:7, 0], s[:7])
    assert list(tmp_path.iterdir()) == []


def _h5py_gzip_file(path, s):
    """The showers as h5py's own filters write them: the single-threaded path the writer must match."""
    chunk_rows = min(161, len(s))  # CaloWriter's chunk: ~4 MiB of DS2 rows, or all rows when fewer
    with h5py.File(path, "w") as f:
        f.create_dataset("showers", data=s, chunks=(chunk_rows, s.shape[1]), compression="gzip",
                         compression_opts=4, shuffle=True)
    return path


@pytest.mark.parametrize(("n", "threads"), [(1, 2), (100, 2), (161, 1), (500, 2), (1000, 3)])
def test_parallel_gzip_is_read_back_exactly_as_h5py_writes_it(tmp_path, n, threads):
    """N below one chunk, exactly one chunk, and partial last chunks; blocks that straddle chunks, handed over
    from one buffer the caller overwrites at once (as the gather does)."""
    e, s = _valid_arrays(n, DS2, seed=n)
    target = tmp_path / "out.h5"
    block = np.empty((70, DS2.n_voxels), dtype=np.float32)
    with CaloWriter(target, DS2, n_total=n, threads=threads) as w:
        for a in range(0, n, 70):
            k = min(70, n - a)
            block[:k] = s[a : a + k]
            w.write(e[a : a + k, 0], block[:k])
            block[:] = np.nan
    ref = _h5py_gzip_file(tmp_path / "ref.h5", s)
    with h5py.File(target, "r") as f, h5py.File(ref, "r") as g:
        got, want = f["showers"], g["showers"]
        assert (got.dtype, got.shape, got.chunks) == (want.dtype, want.shape, want.chunks) == (
            np.float32, (n, DS2.n_voxels), (min(161, n), DS2.n_voxels))
        assert (got.compression, got.compression_opts, got.shuffle) == ("gzip", 4, True)
        assert got.id.get_num_chunks() == want.id.get_num_chunks() == -(-n // min(161, n))
        assert got[:].tobytes() == want[:].tobytes() == s.tobytes()
        np.testing.assert_array_equal(f["incident_energies"][:], e)
        assert dict(f.attrs) == {}  # the thread count is recorded nowhere
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5", "ref.h5"]


@pytest.mark.parametrize("where", ["caller", "compression"])
def test_an_error_with_chunks_in_flight_leaves_no_file(tmp_path, monkeypatch, where):
    import hpc_calo.io.hdf5 as hdf5

    e, s = _valid_arrays(1000)
    target = tmp_path / "mid.h5"
    if where == "compression":
        real, calls = hdf5.gzip_chunk, []

        def failing(rows):
            calls.append(rows)
            if len(calls) == 3:
                raise MemoryError("boom")
            return real(rows)

        monkeypatch.setattr(hdf5, "gzip_chunk", failing)
    exc = RuntimeError if where == "caller" else MemoryError
    with pytest.raises(exc, match="boom"), CaloWriter(target, DS2, n_total=1000, threads=2) as w:
        for a in range(0, 1000, 100):
            w.write(e[a : a + 100, 0], s[a : a + 100])
            if where == "caller" and a == 600:
                raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def _check(path, *extra):
    return subprocess.run(
        [sys.executable, "-m", "hpc_calo.io", "check", str(path), *extra], capture_output=True, text=True, timeout=60
    )


def test_check_accepts_a_valid_file(synthetic):
    proc = _check(synthetic("ds2", 300, seed=0), "--dataset", "ds2")
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert len(line.splitlines()) == 1
    assert "ds2, 300 showers" in line and "E_tot/E_inc" in line and "sparsity" in line


def _case_missing_key(tmp):
    e, _ = _valid_arrays()
    return _write_raw(tmp / "f.h5", e, None), (), "missing dataset 'showers'"


def _case_wrong_shape_for_dataset(tmp):
    e, s = _valid_arrays(5, DS3)
    return _write_raw(tmp / "f.h5", e, s), ("--dataset", "ds2"), "ds2 needs 6480"


def _case_unknown_voxel_count(tmp):
    e, _ = _valid_arrays(5)
    return _write_raw(tmp / "f.h5", e, np.zeros((5, 368), np.float32)), (), "matches no dataset"


def _case_energies_not_n_by_1(tmp):
    e, s = _valid_arrays(5)
    return _write_raw(tmp / "f.h5", e[:, 0], s), (), "expected (N, 1)"


def _case_mismatched_lengths(tmp):
    e, s = _valid_arrays(10)
    return _write_raw(tmp / "f.h5", e, s[:9]), (), "10 rows but showers has 9"


def _case_nan_showers(tmp):
    e, s = _valid_arrays(10)
    s[4, 17] = np.nan
    return _write_raw(tmp / "f.h5", e, s), (), "NaN or inf (first at row 4)"


def _case_inf_energy(tmp):
    e, s = _valid_arrays(10)
    e[6, 0] = np.inf
    return _write_raw(tmp / "f.h5", e, s), (), "incident_energies contain NaN or inf (first at row 6)"


def _case_negative_energy(tmp):
    e, s = _valid_arrays(10)
    s[2, 100] = -0.5
    return _write_raw(tmp / "f.h5", e, s), (), "negative energies (first at row 2)"


def _case_energy_below_range(tmp):
    e, s = _valid_arrays(10)
    e[3, 0] = 500.0
    return _write_raw(tmp / "f.h5", e, s), (), "row 3 is outside"


def _case_energy_above_range(tmp):
    e, s = _valid_arrays(10)
    e[8, 0] = 2.0e6
    return _write_raw(tmp / "f.h5", e, s), (), "row 8 is outside"


def _case_empty_file(tmp):
    return _write_raw(tmp / "f.h5", np.zeros((0, 1)), np.zeros((0, DS2.n_voxels), np.float32)), (), "no showers"


def _case_truncated(tmp):
    e, s = _valid_arrays(400)
    full = tmp / "full.h5"
    with CaloWriter(full, DS2, compression="none") as w:
        w.write(e[:, 0], s)
    data = full.read_bytes()
    path = tmp / "f.h5"
    path.write_bytes(data[: len(data) // 2])
    return path, (), "truncated or corrupt"


def _case_corrupt(tmp):
    path = tmp / "f.h5"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return path, (), "not a readable HDF5 file"


def _case_nonexistent(tmp):
    return tmp / "nope.h5", (), "no such file"


CASES = [
    _case_missing_key,
    _case_wrong_shape_for_dataset,
    _case_unknown_voxel_count,
    _case_energies_not_n_by_1,
    _case_mismatched_lengths,
    _case_nan_showers,
    _case_inf_energy,
    _case_negative_energy,
    _case_energy_below_range,
    _case_energy_above_range,
    _case_empty_file,
    _case_truncated,
    _case_corrupt,
    _case_nonexistent,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__.removeprefix("_case_") for c in CASES])
def test_check_rejects_bad_input_with_one_clear_line(tmp_path, case):
    path, extra, message = case(tmp_path)
    proc = _check(path, *extra)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("error: ") and str(path) in lines[0]
    assert message in lines[0], lines[0]


def test_check_reads_a_copy_of_a_synthetic_file_unchanged(synthetic, tmp_path):
    # The checker is read-only: the file's bytes are the same afterwards.
    src = synthetic("ds2", 300, seed=0)
    copy = tmp_path / "copy.h5"
    shutil.copy(src, copy)
    before = copy.read_bytes()
    assert check_file(copy).n == 300
    assert copy.read_bytes() == before


def test_the_trained_range_allows_only_the_sampling_margin() -> None:
    """A reference file of the same distribution reaches a hair past the training sample's min/max: accepted;
    anything beyond 2 % of the log span (a factor 1.15 for 1 GeV - 1 TeV) is extrapolation: refused."""
    from hpc_calo.io.check import check_trained_range

    trained = (1.1e3, 0.9e6)
    check_trained_range("ref.h5", 1.0e3, 0.95e6, trained)
    for emin, emax in ((1.1e3 / 1.2, 0.9e6), (1.1e3, 0.9e6 * 1.2)):
        with pytest.raises(UserError, match=r"ref\.h5: incident energies .* outside the trained range"):
            check_trained_range("ref.h5", emin, emax, trained)
