"""Ray Train (V2) data-parallel training on a real local Ray: 2 CPU workers, DDP over gloo.

One Ray instance serves the whole module; the CLI tests attach to it with ``--address``. Every trainer run
trains the ``tiny`` preset on a 600-shower synthetic DS2 store (540 train / 60 val showers).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import torch
from torch import nn

from data_prep.convert import main as convert
from hpc_calo import rundir
from hpc_calo.train.__main__ import parse_request
from hpc_calo.train.checkpoint import load_checkpoint
from hpc_calo.train.distributed import RayConfig, run_ray
from hpc_calo.train.job import build_job
from hpc_calo.train.loop import _derived_seed, fit

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

N_SHOWERS = 600
SEED = 3


@pytest.fixture(scope="module")
def store(synthetic, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ray_store") / "ds2.zarr"
    src = synthetic("ds2", N_SHOWERS, seed=5)
    # Small chunks so a streaming loader crosses several of them.
    assert convert(["--dataset", "ds2", str(src), "--out", str(out), "--chunk-showers", "48", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def cluster(ray_env: Path) -> Iterator[str]:
    """A local Ray for the module (start-up costs ~10 s); yields its GCS address for CLI runs."""
    ctx = ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(ray_env), log_to_driver=False)
    try:
        yield ctx.address_info["gcs_address"]
    finally:
        ray.shutdown()


def train_args(store: Path, out: Path, flow: int, *extra: str) -> list[str]:
    return ["--flow", str(flow), "--store", str(store), "--preset", "tiny", "--out", str(out),
            "--seed", str(SEED), "--log-every", "1000", *extra]


def job_for(store: Path, out: Path, flow: int, *extra: str) -> Any:
    return build_job(parse_request(train_args(store, out, flow, *extra)))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0.0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


# ---------------------------------------------------------------------------------- one step, two workers

# flow-3 (pairs), global batch 64 -> 32 per worker; the loaders STREAM (a share of 270 showers x 45 x 144
# float32 = 7 MB does not fit 0.75 x 0.6 x 8 MB), so the memory-aware path runs under Ray.
STEP_ARGS = ("--batch-size", "64", "--grad-clip", "0", "--checkpoint-every", "1", "--max-steps", "1")
STEP_MEMORY_GB = 0.008


@pytest.fixture(scope="module")
def one_step(cluster: str, store: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, Any]]:
    job = job_for(store, tmp_path_factory.mktemp("step") / "run", 3, *STEP_ARGS)
    summary = run_ray(job, RayConfig(workers=2, memory_gb_per_worker=STEP_MEMORY_GB))
    return job, summary


class _UnionLoader:
    """Batch i = rank 0's batch i and rank 1's batch i, concatenated: what the two workers step on together."""

    def __init__(self, loaders: list[Any]) -> None:
        self.loaders = loaders

    def __len__(self) -> int:
        return len(self.loaders[0])

    def set_epoch(self, e: int) -> None:
        for ld in self.loaders:
            ld.set_epoch(e)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for parts in zip(*self.loaders, strict=True):
            yield {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


class _SameNoise(nn.Module):
    """One worker's loss on the union batch, with each half's preprocessing noise drawn as its rank draws it.

    The flows add fresh U[0, 5 keV) dequantisation noise from torch's global RNG, which ``fit`` seeds per rank
    (``_derived_seed(seed, rank)``). A single worker would draw other noise for the same examples, so its step
    could never match to float tolerance. Here half r of the union batch is preprocessed from rank r's RNG
    stream (the only randomness in a flow's forward pass), and the loss is the mean NLL over the rows of the whole
    union batch that the model learns from (its ``select``: flow-3 skips empty targets, so the halves may keep
    different numbers of rows). Everything else (Adam, OneCycle, the step) is the plain single-worker ``fit``.
    """

    def __init__(self, model: nn.Module, seed: int, ranks: int, halves: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.model, self.ranks = model, ranks
        self.halves = tuple(range(ranks)) if halves is None else halves
        self.states: list[torch.Tensor | None] = [None] * ranks
        self.seeds = [_derived_seed(seed, r) for r in range(ranks)]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [self.model.select({k: v.chunk(self.ranks)[r] for k, v in batch.items()}) for r in range(self.ranks)]
        sums, rows = [], 0
        for r in self.halves:
            with torch.random.fork_rng():
                if self.states[r] is None:
                    torch.manual_seed(self.seeds[r])
                else:
                    torch.set_rng_state(self.states[r])
                n = len(parts[r]["e_inc"])
                sums.append(self.model(parts[r]) * n)
                rows += n
                self.states[r] = torch.get_rng_state()
        return torch.stack(sums).sum() / rows


def _reference_step(job: Any, out: Path, halves: tuple[int, ...] | None = None) -> dict[str, Any]:
    loaders = [job.make_loaders(r, 2, STEP_MEMORY_GB * 0.75)[0] for r in range(2)]
    assert all(ld.mode == "stream" for ld in loaders)
    model = _SameNoise(job.make_model(), job.cfg.seed, 2, halves)
    fit(model, _UnionLoader(loaders), None, job.cfg, out)
    ck = load_checkpoint(rundir.checkpoint_in(out))
    return {"model": {k.removeprefix("model."): v for k, v in ck["model"].items()}, "opt": ck["optimizer"]}


def test_two_workers_one_step_equals_one_worker_on_the_union_batch(one_step, tmp_path: Path) -> None:
    """Weights and Adam's first moment (= 0.1 x the gradient, clipping off) after one step match."""
    job, summary = one_step
    assert summary["global_step"] == 1 and summary["stopped"] and summary["world_size"] == 2
    ray_ck = load_checkpoint(rundir.checkpoint_in(job.out_dir))
    assert ray_ck["global_step"] == 1 and ray_ck["world_size"] == 2
    ref = _reference_step(job, tmp_path / "ref")

    init = job.make_model().state_dict()
    changed = [k for k in init if not torch.equal(init[k], ray_ck["model"][k])]
    assert changed, "the step did not move any weight"
    assert_same_weights(ray_ck["model"], ref["model"], atol=1e-6)
    ray_m = [s["exp_avg"] for _, s in sorted(ray_ck["optimizer"]["state"].items())]
    ref_m = [s["exp_avg"] for _, s in sorted(ref["opt"]["state"].items())]
    assert len(ray_m) == len(ref_m) > 0
    for a, b in zip(ray_m, ref_m, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)  # float32 reduction order: ~3e-7

    # The check can fail: a step on rank 0's half alone (what a worker would do without DDP) differs.
    half = _reference_step(job, tmp_path / "half", halves=(0,))
    half_m = [s["exp_avg"] for _, s in sorted(half["opt"]["state"].items())]
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-7) for a, b in zip(ray_m, half_m, strict=True))


def test_distillation_two_workers_one_step_equals_one_worker_on_the_union_batch(
    cluster: str, store: Path, tmp_path: Path
) -> None:
    """The PDD student of flow-3 through Ray: the same check as for the teachers.

    Its randomness is the teacher's preprocessing noise and the z-pass noise (``torch.randn``), both drawn from
    the global RNG, which ``_SameNoise`` replays per rank. The teacher is an untrained flow-3 (any frozen
    teacher will do for the comparison); the checkpoints hold the student alone.
    """
    from hpc_calo.distill.__main__ import parse_request as parse_distill
    from hpc_calo.distill.job import build_job as build_distill

    run = tmp_path / "run"
    teacher = job_for(store, run, 3)
    teacher.prepare()  # run.json
    teacher.make_model().save(rundir.weights_in(teacher.out_dir))
    # float64: PDD's gradient is a small difference of large terms, and the ranks' unequal row counts (the flow-3
    # teacher skips empty targets) add a weighting whose float32 rounding that difference magnifies to ~4e-4.
    argv = ["--run", str(run), "--flow", "3", "--seed", str(SEED), "--log-every", "1000", *STEP_ARGS,
            "--dtype", "float64"]
    job = build_distill(parse_distill(argv))
    summary = run_ray(job, RayConfig(workers=2, memory_gb_per_worker=STEP_MEMORY_GB))
    assert summary["global_step"] == 1 and summary["world_size"] == 2
    ray_ck = load_checkpoint(rundir.checkpoint_in(job.out_dir))
    assert all(k.startswith("student.") for k in ray_ck["model"])
    ref = _reference_step(job, tmp_path / "ref")

    init = job.make_model().state_dict()
    assert any(not torch.equal(init[k], ray_ck["model"][k]) for k in init)
    assert_same_weights(ray_ck["model"], ref["model"], atol=1e-6)
    ray_m = [s["exp_avg"] for _, s in sorted(ray_ck["optimizer"]["state"].items())]
    ref_m = [s["exp_avg"] for _, s in sorted(ref["opt"]["state"].items())]
    assert len(ray_m) == len(ref_m) > 0
    for a, b in zip(ray_m, ref_m, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)  # float32 reduction order: ~3e-7


def test_worker_shards_are_disjoint_cover_the_training_set_and_step_equally(one_step, store: Path) -> None:
    job, _ = one_step
    recs = [json.loads(rundir.worker_record(job.out_dir, r).read_text()) for r in range(2)]
    assert [r["rank"] for r in recs] == [0, 1]
    assert len({r["pid"] for r in recs}) == 2  # two processes
    assert recs[0]["steps_per_epoch"] == recs[1]["steps_per_epoch"] > 0
    assert all(r["loader_mode"] == "stream" and r["batch_size"] == 32 for r in recs)
    (a0, b0), (a1, b1) = (r["shard"] for r in recs)
    n_train = 540
    assert (a0, b0, a1, b1) == (0, 270, 270, 540)  # disjoint, together every training shower

    # What those loaders actually yield in an epoch: every pair of its own showers once, none of the other's.
    from hpc_calo.data.store import open_store

    e_all = np.asarray(open_store(store).array("train", "e_inc")[:], dtype=np.float32)
    assert len(e_all) == n_train and len(np.unique(e_all)) == n_train  # e_inc identifies a shower
    seen = []
    for r in range(2):
        loader = job.make_loaders(r, 2, STEP_MEMORY_GB * 0.75)[0]
        batches = list(loader)
        assert len(batches) == recs[r]["steps_per_epoch"]
        e = torch.cat([b["e_inc"] for b in batches]).numpy()
        n = torch.cat([b["n"] for b in batches]).numpy()
        pairs = set(zip(e.tolist(), n.tolist(), strict=True))
        assert len(pairs) == len(e) == 44 * 270  # each (shower, layer) pair exactly once
        seen.append({x for x, _ in pairs})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(e_all.tolist())


# ---------------------------------------------------------------------------------- resume and faults

# flow-1, global batch 32 -> 17 steps/epoch x 3 epochs = 51 steps, a checkpoint every 5 steps.
RUN_ARGS = ("--batch-size", "32", "--checkpoint-every", "5")
TOTAL, STEPS_PER_EPOCH = 51, 17


@pytest.fixture(scope="module")
def uninterrupted(cluster: str, store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    job = job_for(store, tmp_path_factory.mktemp("whole") / "run", 1, *RUN_ARGS)
    summary = run_ray(job, RayConfig(workers=2))
    assert summary["global_step"] == TOTAL and not summary["stopped"]
    return weights(rundir.checkpoint_in(job.out_dir))


class _Killer(threading.Thread):
    """Waits for a worker held by the step hook of ``_HELD_CLI`` to publish its pid, then SIGKILLs that process."""

    def __init__(self, pid_file: Path, timeout: float = 240.0) -> None:
        super().__init__(daemon=True)
        self.pid_file, self.timeout = pid_file, timeout
        self.killed: int | None = None
        self.start()

    def run(self) -> None:
        t_end = time.monotonic() + self.timeout
        while time.monotonic() < t_end:
            text = self.pid_file.read_text().strip() if self.pid_file.is_file() else ""
            if text:
                os.kill(int(text), signal.SIGKILL)
                self.killed = int(text)
                return
            time.sleep(0.1)


# The training command line (its parser, job and Ray path, its one-line errors) with a fault injected through
# RayConfig's public step hook: rank RANK stops before global step STEP (once per FOLDER), publishes its pid in
# FOLDER and waits to be killed. A new driver process each run, as a user's re-run would be; the hook is
# defined in the script, so Ray ships it to the workers by value. argv: RANK:STEP:FOLDER, then the flags.
_HELD_CLI = """
import dataclasses, json, os, sys, time
from pathlib import Path
from hpc_calo.errors import run_cli
from hpc_calo.train.__main__ import parse_request
from hpc_calo.train.distributed import run_ray
from hpc_calo.train.job import build_job

class Hold:
    def __init__(self, rank, step, folder):
        self.rank, self.step, self.folder = rank, step, Path(folder)

    def __call__(self, rank, step):
        marker = self.folder / f"hold-rank{self.rank}-step{self.step}.done"
        if (rank, step) != (self.rank, self.step) or marker.exists():
            return
        marker.touch()  # once: the restarted worker group must run through
        tmp = self.folder / f".hold-rank{rank}.pid.tmp"
        tmp.write_text(f"{os.getpid()}\\n")
        tmp.replace(self.folder / f"hold-rank{rank}.pid")
        time.sleep(300)
        raise RuntimeError(f"rank {rank} was not killed")

def main(argv):
    rank, step, folder = argv[0].split(":", 2)
    req = parse_request(argv[1:])
    hook = Hold(int(rank), int(step), folder)
    print(json.dumps(run_ray(build_job(req), dataclasses.replace(req.ray, step_hook=hook))))

run_cli(main, sys.argv[1:])
"""


def _cli(argv: list[str], env: dict[str, str], hold: tuple[int, int], killer_file: Path) -> tuple[int, str, str, int]:
    """Run the training command with rank ``hold[0]`` held before step ``hold[1]`` and killed from here."""
    killer = _Killer(killer_file)
    held = f"{hold[0]}:{hold[1]}:{killer_file.parent}"
    proc = subprocess.run([sys.executable, "-c", _HELD_CLI, held, *argv], capture_output=True, text=True,
                          env=env, timeout=400)
    killer.join(1)
    assert killer.killed is not None, f"the held worker was never killed:\n{proc.stderr[-3000:]}"
    return proc.returncode, proc.stdout, proc.stderr, killer.killed


def test_worker_killed_without_retries_fails_clearly_then_resumes_and_survives_a_kill_with_retries(
    cluster: str, store: Path, uninterrupted, tmp_path: Path
) -> None:
    """Through the CLI, attached to the test cluster with --address (each run a new driver process).

    1. --max-failures 0, rank 1 SIGKILLed before step 23 (mid-epoch 2): exit 2 with one error line; the checkpoint
       is intact at step 20, the last multiple of --checkpoint-every.
    2. The same command with --max-failures 1 resumes at epoch 2 step 20 (not epoch 1); rank 0 (the writer of
       the checkpoints) is SIGKILLed before step 43; Ray restarts the worker group, which resumes from step 40
       and finishes. The final weights equal those of the uninterrupted run, bit for bit.
    """
    out = tmp_path / "run"
    workers = rundir.worker_record(rundir.flow_dir(out, 1), 0).parent
    argv = train_args(store, out, 1, *RUN_ARGS, "--workers", "2", "--address", cluster, "--run-name", "cli-run")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}

    code, stdout, stderr, _ = _cli([*argv, "--max-failures", "0"], env, (1, 23), workers / "hold-rank1.pid")
    assert code == 2, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "distributed training failed" in last and "resume" in last, last
    assert '"global_step"' not in stdout  # no summary: the run did not finish
    ck = load_checkpoint(rundir.checkpoint_in(rundir.flow_dir(out, 1)))  # intact: it loads, at the last saved step
    assert (ck["global_step"], ck["epoch"], ck["step_in_epoch"]) == (20, 1, 20 - STEPS_PER_EPOCH)

    code, stdout, stderr, killed = _cli([*argv, "--max-failures", "1"], env, (0, 43), workers / "hold-rank0.pid")
    assert code == 0, stderr[-3000:]
    assert f"resuming at epoch 2 step 20/{TOTAL}" in stderr  # the re-run
    assert f"resuming at epoch 3 step 40/{TOTAL}" in stderr  # the restarted worker group
    assert json.loads(stdout.strip().splitlines()[-1])["global_step"] == TOTAL
    assert_same_weights(weights(rundir.checkpoint_in(rundir.flow_dir(out, 1))), uninterrupted)
    pids = {json.loads(rundir.worker_record(rundir.flow_dir(out, 1), r).read_text())["pid"] for r in range(2)}
    assert killed not in pids  # the finishing group is new processes
    assert (rundir.ray_dir(out) / "cli-run").is_dir()  # Ray's run record under the chosen name


def test_indivisible_global_batch_is_refused_before_starting_workers(store: Path, tmp_path: Path) -> None:
    from hpc_calo.errors import UserError

    job = job_for(store, tmp_path / "run", 1, "--batch-size", "33")
    with pytest.raises(UserError, match="does not divide over 2 workers"):
        run_ray(job, RayConfig(workers=2))


def test_request_a_fixed_cluster_cannot_place_is_refused(cluster: str) -> None:
    from hpc_calo.errors import UserError
    from hpc_calo.train.distributed import _check_resources

    _check_resources(RayConfig(workers=2, cpus_per_worker=1), fixed=True)  # the 2-CPU test cluster fits it
    with pytest.raises(UserError, match="GPU in all, but 2 workers x 1 were requested"):
        _check_resources(RayConfig(workers=2, gpus_per_worker=1), fixed=True)


def test_cli_with_workers_and_no_cluster_starts_a_local_ray_and_keeps_ray_noise_out(store: Path,
                                                                                     tmp_path: Path) -> None:
    """The user's command as written: ``--workers`` without a cluster starts a local Ray of its own, trains on it
    and stops it. Its output has hpc-calo's lines, not a warning every few seconds from Ray Train's placement
    group cleaner about the dashboard a local Ray does not start, nor torch's deprecation of a DDP flag."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-m", "hpc_calo.train", *train_args(store, tmp_path / "run", 3),
                        "--workers", "1", "--steps", "400"],
                       capture_output=True, text=True, env=env, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["global_step"] == 400
    assert "rank 0/1 on cpu" in out
    # Ray's plumbing in the worker runs SCHED_BATCH, the rank's training thread normally at the driver's niceness.
    rec = json.loads(rundir.worker_record(rundir.flow_dir(tmp_path / "run", 3), 0).read_text())
    assert (rec["sched_policy"], rec["niceness"]) == ("other", os.getpriority(os.PRIO_PROCESS, 0))
    assert "Failed to query Ray Train Controller" not in out
    assert "is deprecated" not in out
