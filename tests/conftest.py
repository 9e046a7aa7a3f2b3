"""Shared fixtures: cached synthetic CaloChallenge files made by the embedded GFlash generator."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from data_prep.synth import write_synthetic

# Ray >= 2.5x turns token authentication on for every new local cluster and keeps the token in ~/.ray; a head
# started by `ray start` in one test and a client in another then disagree. The tests run throwaway local
# clusters on the loopback interface: no authentication, unless the environment asks for it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray Train starts a preemption watcher actor (one more Python process) per run, for clusters whose nodes can
# be reclaimed; the tests' throwaway clusters have none, and on two cores the process costs ~2.5 s a run.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


@pytest.fixture
def one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """One torch thread for tests of small models: on the 2 shared cores of CI, OpenMP threads waiting on each
    other make small ops ~10x slower. The test owns one CPU, so code that sizes its threads itself
    (``hpc_calo.cpus``) picks one too."""
    import torch

    n = torch.get_num_threads()
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory ``synthetic(dataset, n, seed=0) -> Path``: a CaloChallenge HDF5 file, made once per session.

    The files are shared between tests: treat them as read-only (copy one before modifying it).
    """
    root = tmp_path_factory.mktemp("synthetic")
    cache: dict[tuple[str, int, int], Path] = {}

    def make(dataset: str, n: int, seed: int = 0) -> Path:
        key = (dataset.lower(), int(n), int(seed))
        if key not in cache:
            cache[key] = write_synthetic(root / f"{key[0]}_n{key[1]}_s{key[2]}.h5", key[0], key[1], key[2])
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_run(synthetic: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real DS2 run directory: 40 synthetic showers converted to a store, the three ``tiny`` teachers trained
    for one epoch each through the real CLIs (run in-process to skip interpreter start-up), plus flow-2/3
    students saved RANDOMLY INITIALISED through ``FlowModel.save`` (no distillation: a MAF teacher samples one
    feature at a time, far too slow for tests; the students make ``Chain`` take the fast IAF path).
    Treat as read-only."""
    import torch

    from data_prep.convert import main as convert
    from hpc_calo import rundir
    from hpc_calo.geometry import DS2
    from hpc_calo.models import FlowModel
    from hpc_calo.train.__main__ import main as train

    root = tmp_path_factory.mktemp("tiny_run")
    store, run = root / "store.zarr", root / "run"
    assert not convert(["--dataset", "ds2", str(synthetic("ds2", 40, 7)), "--out", str(store), "--quiet"])
    for flow in (1, 2, 3):
        args = ["--flow", str(flow), "--store", str(store), "--preset", "tiny", "--out", str(run), "--epochs", "1"]
        assert not train([*args, "--log-every", "1000"])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for flow in (2, 3):
            path = rundir.weights(run, flow, student=True)
            path.parent.mkdir()
            FlowModel.from_preset(flow, DS2, "tiny", student=True).save(path)
    return run


@pytest.fixture(scope="module")
def ray_env() -> Iterator[Path]:
    """A short temporary directory and the environment for a module's own throwaway Ray cluster.

    The directory is under /tmp because Ray's AF_UNIX socket paths must stay under 107 bytes. Ray's temp root
    (``RAY_TMPDIR``, where Ray also records "the current cluster" for ``address="auto"``) is inside it, so no
    other Ray user on the machine attaches to the test's cluster. No usage stats; no second copy of every
    worker print through Ray Train's logger.
    """
    mp = pytest.MonkeyPatch()
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    (temp / "ray").mkdir()
    mp.setenv("RAY_TMPDIR", str(temp))
    mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
    mp.setenv("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    try:
        yield temp
    finally:
        mp.undo()
        shutil.rmtree(temp, ignore_errors=True)
