"""Three Ray nodes on one machine, one of them lost mid-run: training and production carry on without it.

``ray.cluster_utils.Cluster`` starts three real raylets (a head and two worker nodes, one CPU each) that share
one GCS; killing a node kills its raylet and every worker process it started, which is what the rest of the
cluster sees when a machine dies. What is not simulated: a second machine (the run folder and the parts
directory are on one local disk, as they would be on shared storage) and the network (every node is on the
loopback interface, so there are no partitions or slow links). Node-death detection is tightened in the
cluster's config (a dead node is declared after ~1.5 s instead of ~15 s) so the test is quick; the code path
is the one a real node loss takes.

The head node is never removed: it holds the GCS and the driver (the test process), as on a real cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster

from data_prep.convert import main as convert
from hpc_calo import rundir
from hpc_calo.sample.backends import sample
from hpc_calo.sample.job import Launch, Output, SampleRequest
from hpc_calo.sample.plan import Request
from hpc_calo.train.__main__ import parse_request
from hpc_calo.train.checkpoint import load_checkpoint
from hpc_calo.train.distributed import RayConfig, run_ray
from hpc_calo.train.job import build_job

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

NODES = 3
# How fast the GCS declares a node dead (Ray's defaults: a probe every 3 s, 5 missed): tightened for the test.
FAST_DEATH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 300, "health_check_failure_threshold": 5}


@pytest.fixture(scope="module")
def cluster(ray_env: Path) -> Iterator[Cluster]:
    """A head and two worker nodes of 1 CPU each (so one-CPU workers land on distinct nodes); the test connects."""
    c = Cluster()
    try:
        c.add_node(num_cpus=1, include_dashboard=False, _system_config=FAST_DEATH)
        for _ in range(1, NODES):
            c.add_node(num_cpus=1)
        c.wait_for_nodes()
        ray.init(address=c.address, log_to_driver=False)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def node_ids(c: Cluster) -> dict[str, Any]:
    """Ray node id -> the Cluster's node object, for the worker nodes (the ones a test may remove)."""
    return {n.node_id: n for n in c.worker_nodes}


def _parent(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("PPid:")))


def _raylet(node: Any) -> int:
    return node.all_processes["raylet"][0].process.pid


def raylet_of(c: Cluster, pid: int) -> Any:
    """The node whose raylet started process ``pid`` (Ray worker processes are the raylet's children)."""
    ppid = _parent(pid)
    for node in [c.head_node, *c.worker_nodes]:
        if ppid == _raylet(node):
            return node
    raise AssertionError(f"process {pid} (parent {ppid}) belongs to no node of the cluster")


def kill_node(c: Cluster, node: Any) -> None:
    """A machine dying: SIGKILL its raylet and every process the raylet started (Ray's workers) at once, then
    let the Cluster reap the rest. (``remove_node`` alone would leave the workers to notice the raylet's death
    and exit by themselves, finishing a task in the meantime; a dead machine finishes nothing.)"""
    raylet = _raylet(node)
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, StopIteration, ValueError):
                if _parent(int(entry.name)) == raylet:
                    children.append(int(entry.name))
    for pid in [raylet, *children]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    c.remove_node(node, allow_graceful=False)


def watch(until: Callable[[], bool], action: Callable[[], None], timeout: float = 120.0) -> threading.Thread:
    """Run ``action`` in a thread as soon as ``until()`` holds."""
    def run() -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if until():
                action()
                return
            time.sleep(0.02)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


# ---------------------------------------------------------------------------------------------- training

TRAIN_SHOWERS = 40
# flow-3 on 36 training showers x 44 layer pairs, global batch 64 -> 24 steps in the tiny preset's one epoch;
# a checkpoint every 5 steps; every rank is held before step HOLD_AT, so the last checkpoint is step 10.
TRAIN_ARGS = ("--batch-size", "64", "--checkpoint-every", "5")
HOLD_AT, RESUME_AT = 13, 10


class Hold:
    """The step hook (it runs in the workers): records each worker process's Ray node and first step, and holds
    every rank before ``step`` once, until its node is removed or the worker group is torn down."""

    def __init__(self, folder: Path, step: int) -> None:
        self.folder, self.step = folder, step
        self.seen: set[int] = set()

    def __call__(self, rank: int, step: int) -> None:
        pid = os.getpid()
        if pid not in self.seen:  # the first step this worker process takes: where its group (re)started
            self.seen.add(pid)
            node = ray.get_runtime_context().get_node_id()
            _write(self.folder / f"start-{pid}.json", {"rank": rank, "pid": pid, "node": node, "step": step})
        marker = self.folder / f"held-rank{rank}.json"
        if step != self.step or marker.exists():
            return
        _write(marker, {"rank": rank, "pid": pid, "node": ray.get_runtime_context().get_node_id()})
        time.sleep(120)
        raise RuntimeError(f"rank {rank} was held for 120 s and its group was never torn down")


def _write(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)


@pytest.fixture(scope="module")
def store(synthetic, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mn_store") / "ds2.zarr"
    assert convert(["--dataset", "ds2", str(synthetic("ds2", TRAIN_SHOWERS, seed=7)), "--out", str(out),
                    "--quiet"]) == 0
    return out


def test_training_survives_the_loss_of_a_workers_node(cluster: Cluster, store: Path, tmp_path: Path) -> None:
    """Two Ray Train workers on two nodes; the node of one of them (not the head) is removed while both are held
    before step 13. Ray Train restarts the group on the two nodes left, which resumes at the checkpoint of step
    10 and finishes the epoch."""
    folder = tmp_path / "hook"
    folder.mkdir()
    argv = ["--flow", "3", "--store", str(store), "--preset", "tiny", "--out", str(tmp_path / "run"),
            "--seed", "3", "--log-every", "1000", *TRAIN_ARGS]
    job = build_job(parse_request(argv))
    workers = node_ids(cluster)
    removed: list[str] = []

    def held() -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in folder.glob("held-rank*.json")]

    def remove() -> None:
        victim = next(h["node"] for h in sorted(held(), key=lambda h: h["rank"]) if h["node"] in workers)
        removed.append(victim)
        kill_node(cluster, workers[victim])

    killer = watch(lambda: len(held()) == 2, remove)
    summary = run_ray(job, RayConfig(workers=2, max_failures=1, step_hook=Hold(folder, HOLD_AT)))
    killer.join(1)

    assert len(removed) == 1, "the workers were never held together"
    starts = [json.loads(p.read_text()) for p in folder.glob("start-*.json")]
    first = [s for s in starts if s["step"] == 0]
    again = [s for s in starts if s["step"] != 0]
    assert sorted(s["rank"] for s in first) == [0, 1] and len({s["node"] for s in first}) == 2  # spread
    assert removed[0] in {s["node"] for s in first}  # a node that held a worker
    # The restarted group: two new processes, on the nodes left, starting from the last checkpoint.
    assert sorted(s["rank"] for s in again) == [0, 1], starts
    assert {s["step"] for s in again} == {RESUME_AT}
    assert len({s["node"] for s in again}) == 2 and removed[0] not in {s["node"] for s in again}
    steps = load_checkpoint(rundir.checkpoint_in(job.out_dir))["steps_per_epoch"]
    assert summary["global_step"] == steps > HOLD_AT and not summary["stopped"]


# ---------------------------------------------------------------------------------------------- production

N, SHARD, SEED = 30, 5, 11  # 6 shards for 3 actors


def read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(path, "r") as f:
        return f["incident_energies"][:], f["showers"][:]


def production(run: Path, out: Path, backend: str, workers: int | None = None) -> Any:
    return sample(SampleRequest(
        Request(run_dir=run, n=N, seed=SEED, shard_size=SHARD),
        Output(out, keep_parts=True, compression="none"),
        Launch(backend=backend, workers=workers, progress=False),
    ))


class Writers(threading.Thread):
    """Watches a parts directory until stopped: maps each process seen writing a part
    (``.part-NNNNNN.h5.tmp-HOST-PID``) to its node, and kills the node of the first one seen on a worker node,
    mid-shard."""

    def __init__(self, cluster: Cluster, parts: Path) -> None:
        super().__init__(daemon=True)
        self.cluster, self.parts = cluster, parts
        self.nodes: dict[int, Any] = {}  # writer pid -> its node
        self.killed: tuple[int, int] | None = None  # (shard, pid) cut short
        self.stop = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.stop.is_set():
            for tmp in self.parts.glob(".part-*.h5.tmp-*"):
                pid = int(tmp.name.rsplit("-", 1)[1])
                if pid not in self.nodes:
                    try:
                        self.nodes[pid] = raylet_of(self.cluster, pid)
                    except (FileNotFoundError, AssertionError):  # it finished (or died) in between
                        continue
                if self.killed is None and self.nodes[pid] is not self.cluster.head_node:
                    self.killed = (int(tmp.name[6:12]), pid)
                    kill_node(self.cluster, self.nodes[pid])
            time.sleep(0.01)


def test_production_survives_the_loss_of_an_actors_node(
    cluster: Cluster, tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three actors, one per node; the node of the first actor seen writing a part on a worker node is removed
    mid-shard. That shard goes to the actors left, and the output equals an undisturbed run's bit for bit."""
    if len(cluster.worker_nodes) < NODES - 1:  # the training test removed one: a new node joins
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
    out = tmp_path / "prod.h5"
    parts = out.with_name(out.name + ".parts")
    writers = Writers(cluster, parts)
    outcome = production(tiny_run, out, "ray", workers=NODES)
    writers.stop.set()
    writers.join(5)

    assert writers.killed is not None, "no actor on a worker node was seen writing a part"
    shard, victim = writers.killed
    err = capsys.readouterr().err
    assert "warning: a Ray worker died" in err, err[-3000:]  # its shard went to the others
    records = {int(p.name[5:11]): json.loads(p.read_text()) for p in parts.glob("part-*.json")}
    assert sorted(records) == list(range(N // SHARD)) and outcome.generated == N // SHARD
    assert records[shard]["pid"] != victim
    assert len({id(node) for node in writers.nodes.values()}) == NODES  # one actor on each node
    assert not list(parts.glob(".part-*tmp*"))  # the gather dropped what the dead actor left half-written

    # The undisturbed run: the local backend, which gives the same bits as Ray for the same request.
    reference = production(tiny_run, tmp_path / "ref.h5", "local")
    (e, s), (e_ref, s_ref) = read(out), read(reference.gathered.path)
    assert s.shape == (N, s_ref.shape[1]) and e.shape == (N, 1)
    assert np.array_equal(e, e_ref) and np.array_equal(s, s_ref)
