"""The launchers: configuration, dry runs, and the whole pipeline on this machine, on a real single-node SLURM
cluster (submitted, requeued, failed) and through ``ray job submit`` on a local Ray head."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpc_calo import rundir
from hpc_calo.cpus import owned_cpus
from hpc_calo.errors import UserError
from hpc_calo.io import check_file
from launch.config import load_file, resolve

PY = sys.executable
REPO = Path(__file__).resolve().parents[1]
# Small enough for CI, large enough that every stage does real work.
TINY = ["--dataset", "ds2", "--synthetic", "400", "--showers", "200", "--preset", "tiny", "--prep-ranks", "2",
        "--sample-workers", "2"]
# The rest, through --config (a TOML file, as a user would write one): each flow takes two optimiser steps (and
# validates, checkpoints and saves its weights); 10 validation showers (a student's validation and quality check
# sample its teacher, at a cost that grows with them); the evaluation without the costly metrics and figures
# (the evaluation's own tests cover them, test_every_setting_reaches_every_stage_that_uses_it the wiring).
CHEAP = """val_fraction = 0.025
eval_epochs = 1
eval_metrics = ["hist", "cls-high"]
eval_plots = false
""" + "".join(f"[budget.{flow}]\nsteps = 2\n" for flow in ("flow1", "flow2", "flow3", "flow2_student",
                                                          "flow3_student"))


def tiny(tmp_path: Path) -> list[str]:
    """TINY and the cheap settings' file."""
    (tmp_path / "cheap.toml").write_text(CHEAP)
    return [*TINY, "--config", str(tmp_path / "cheap.toml")]


def submit(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "launch.submit", *args], capture_output=True, text=True, timeout=timeout)


def assert_pipeline_outputs(out: Path, n: int = 200) -> None:
    summary = check_file(out / "production.h5")
    assert summary.n == n and summary.dataset == "ds2"
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["histograms"]["groups"] and 0.0 <= report["cls_high"]["auc"] <= 1.0
    assert "fpd" not in report and not list((out / "report").glob("*.png"))  # as the settings asked
    assert (out / "report" / "report.md").is_file()
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["preset"] == "tiny" and resolved["synthetic"] == 400 and resolved["val_fraction"] == 0.025


def test_config_precedence_file_then_flags(tmp_path: Path) -> None:
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text('preset = "small"\nepochs = 3\n[budget.flow1]\nepochs = 300\n[resources]\ntime = "00:10:00"\n'
                        'partition = "gpu"\n')
    site = tmp_path / "site.toml"
    site.write_text('seed = 7\nepochs = 9\n[resources]\npartition = "cpu"\naccount = "proj"\n')
    cfg, sources = resolve([
        ("site file", load_file(site)),
        ("config file", load_file(cfg_file)),
        ("flag", {"dataset": "ds2", "out": str(tmp_path / "o"), "synthetic": 500, "epochs": 1, "preset": None,
                  "budget": {"flow3": {"minutes": 120}}, "resources": {"time": None, "nodes": 2}}),
    ])
    assert cfg.budget == {"flow1": {"epochs": 300}, "flow3": {"minutes": 120}}  # per flow: both kept
    assert (sources["budget.flow1"], sources["budget.flow3"]) == ("config file", "flag")
    assert (cfg.preset, cfg.epochs, cfg.synthetic, cfg.seed) == ("small", 1, 500, 7)
    assert (cfg.resources.time, cfg.resources.partition, cfg.resources.nodes) == ("00:10:00", "gpu", 2)
    assert cfg.resources.account == "proj" and cfg.resources.minutes() == 10
    assert (sources["preset"], sources["epochs"], sources["seed"], sources["resources.account"]) == (
        "config file", "flag", "site file", "site file")
    assert "val_fraction" not in sources  # a plain default


@pytest.mark.parametrize(
    ("text", "flags", "message"),
    [
        ("colour = 1\n", {}, "unknown setting"),
        ("", {"synthetic": 500, "data": ["x.h5"]}, "exactly one of"),
        ("", {"synthetic": 500, "sample_backend": "carrier-pigeon"}, "--sample-backend"),
        ("", {"synthetic": 500, "eval_metrics": ["hist", "magic"]}, "--eval-metrics: unknown magic"),
        ("noise_kev = 'small'\n", {"synthetic": 500}, "--noise-kev must be a number > 0 and <= 1000"),
        ("", {"synthetic": 500, "noise_kev": 0.0}, "--noise-kev must be a number > 0 and <= 1000"),
        ("[resources]\ntime = '90 minutes'\n", {"synthetic": 500}, "HH:MM:SS"),
        ("[resources]\ntime = '00:02:00'\n", {"synthetic": 500}, "up to 60 s earlier"),
        ("", {"data": ["/nonexistent.h5"], "reference": "/nonexistent.h5"}, "no such file"),
    ],
)
def test_config_errors(tmp_path: Path, text: str, flags: dict, message: str) -> None:
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text(text)
    with pytest.raises(UserError, match=message):
        resolve([("config file", load_file(cfg_file)),
                 ("flag", {"dataset": "ds2", "out": str(tmp_path / "o"), **flags, "resources": {}})])


def test_dry_run_prints_plan_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = submit("--cluster", "slurm", *TINY, "--out", str(out), "--nodes", "2", "--gpus-per-node", "4",
               "--sample-backend", "mpi", "--dry-run")
    assert r.returncode == 0, r.stderr
    for stage in ("prep", "teacher", "student", "sample", "evaluate"):
        assert stage in r.stdout
    assert "MPI (srun --mpi=pmi2)" in r.stdout and "Ray in allocation" in r.stdout
    assert not out.exists()


def test_bad_request_is_one_line(tmp_path: Path) -> None:
    r = submit("--cluster", "local", "--dataset", "ds2", "--out", str(tmp_path / "o"), "--data", "/nope.h5",
               "--reference", "/nope.h5")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: /nope.h5: no such file"]


def test_the_bare_slurm_command_takes_the_official_files_and_the_site_resources(
    synthetic: Callable[..., Path], tmp_path: Path
) -> None:
    """`python -m launch.submit --cluster slurm --dataset ds3`, as a user types it on a configured site."""
    data, site = tmp_path / "calo", tmp_path / "site.toml"
    data.mkdir()
    names = ("dataset_3_1.hdf5", "dataset_3_2.hdf5", "dataset_3_3.hdf5")
    for name in names:  # small synthetic stand-ins under the official names
        shutil.copy(synthetic("ds3", 100), data / name)
    site.write_text('[resources]\npartition = "gpu"\naccount = "calo"\nqos = "normal"\ngpus_per_node = 4\n'
                    'time = "24:00:00"\n')
    env = {**os.environ, "HPC_CALO_DATA": str(data), "HPC_CALO_CONFIG": str(site), "PYTHONPATH": str(REPO)}
    card = [PY, "-m", "launch.submit", "--cluster", "slurm", "--dataset", "ds3", "--dry-run"]
    r = subprocess.run(card, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    settings = {line.split()[0]: line for line in r.stdout.splitlines() if line.strip()}
    assert settings["preset"].split()[1] == "ds3" and "reference preset" in settings["preset"]
    assert settings["data"].split()[1:3] == [str(data / names[0]), str(data / names[1])]
    assert settings["reference"].split()[1] == str(data / names[2])
    assert f"{data}  [$HPC_CALO_DATA]" in settings["data_dir"]
    for key, value in (("partition", "gpu"), ("account", "calo"), ("qos", "normal"), ("gpus_per_node", "4"),
                       ("time", "24:00:00")):
        assert settings[f"resources.{key}"].endswith(f" {value}  [site file {site}]")
    assert f"run folder: {tmp_path / 'runs' / 'ds3-ds3'}" in r.stdout
    for stage in ("prep", "teacher", "student", "sample", "evaluate"):
        assert "24:00:00" in settings[stage]
    assert not (tmp_path / "runs").exists()
    # Without the files: one line naming them and the command that downloads them.
    empty = tmp_path / "empty"
    r = subprocess.run(card, capture_output=True, text=True, env={**env, "HPC_CALO_DATA": str(empty)},
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: missing {', '.join(names)} in {empty} (the data directory, from $HPC_CALO_DATA); "
        f"download with: python -m data_prep.download --dataset ds3 --out {empty}"]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole pipeline through ``--cluster local``; two jobs: the teachers, then the students, train side by
    side in their own processes (the quickstart's way)."""
    out = tmp_path_factory.mktemp("pipeline") / "local"
    r = submit("--cluster", "local", *tiny(out.parent), "--out", str(out), "--jobs", "2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


@pytest.mark.integration
def test_local_pipeline_end_to_end(local_run: Path) -> None:
    assert_pipeline_outputs(local_run)
    # Re-running the same command finds everything done and changes nothing.
    before = (local_run / "production.h5").stat().st_mtime_ns
    r = submit("--cluster", "local", *tiny(local_run.parent), "--out", str(local_run), "--stage", "sample")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (local_run / "production.h5").stat().st_mtime_ns == before


# --- SLURM ---------------------------------------------------------------------------------------------

def _slurm_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    r = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    return r.returncode == 0 and any(s in r.stdout for s in ("idle", "mix", "alloc"))


@pytest.fixture
def slurm() -> None:
    if not _slurm_up():
        if os.environ.get("HPC_CALO_REQUIRE_SLURM") == "1":
            pytest.fail("HPC_CALO_REQUIRE_SLURM=1 but no SLURM cluster answers (slurm/local_cluster.sh up)")
        pytest.skip("no SLURM cluster (start one with slurm/local_cluster.sh up)")


def _sacct_states(job_ids: list[str]) -> dict[str, list[str]]:
    r = subprocess.run(["sacct", "-n", "-X", "-D", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)],
                       capture_output=True, text=True, check=True)
    states: dict[str, list[str]] = {}
    for line in filter(None, r.stdout.splitlines()):  # a state may have spaces: "CANCELLED by 0"
        jid, state = line.split("|")
        states.setdefault(jid, []).append(state.split()[0])
    return states


def _job_ids(stdout: str) -> dict[str, str]:
    ids = {}
    for line in stdout.splitlines():
        if line.startswith("submitted"):
            words = line.split()
            ids[words[1]] = words[3]
    return ids


@pytest.mark.integration
def test_slurm_pipeline_end_to_end(slurm: None, tmp_path: Path) -> None:
    out = tmp_path / "slurm"
    r = submit("--cluster", "slurm", *tiny(tmp_path), "--out", str(out), "--sample-backend", "mpi", "--time",
               "00:10:00")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ids = _job_ids(r.stdout)
    assert list(ids) == ["prep", "teacher", "student", "sample", "evaluate"]
    states = _sacct_states(list(ids.values()))
    assert all(states[j][-1] == "COMPLETED" for j in ids.values()), states
    assert_pipeline_outputs(out)
    # prep ran as 2 MPI ranks under srun: the store records the ranks of its conversion.
    store_attrs = json.loads((out / "store.zarr" / "zarr.json").read_text())["attributes"]
    assert store_attrs["timing"]["ranks"] == 2


@pytest.mark.integration
def test_slurm_failed_stage_cancels_the_rest(slurm: None, tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(4096))
    out = tmp_path / "failing"
    r = submit("--cluster", "slurm", "--dataset", "ds2", "--data", str(bad), "--reference", str(bad),
               "--preset", "tiny", "--out", str(out), "--time", "00:05:00")
    assert r.returncode == 2
    assert "stage 'prep'" in r.stderr and "the stages after it were cancelled" in r.stderr
    assert "corrupt.h5" in r.stderr  # the tail of the failing job's log names the file
    ids = _job_ids(r.stdout)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        states = _sacct_states(list(ids.values()))
        if states.get(ids["evaluate"], ["PENDING"])[-1] == "CANCELLED":
            break
        time.sleep(0.5)
    assert states[ids["prep"]][-1] == "FAILED"
    assert all(states[ids[s]][-1] == "CANCELLED" for s in ("teacher", "student", "sample", "evaluate")), states


@pytest.mark.integration
def test_slurm_training_requeues_on_the_checkpoint_signal_and_resumes(slurm: None, tmp_path: Path) -> None:
    """The teacher job gets SLURM's time-limit warning (USR2, what ``--signal=USR2@delay`` sends to the job's
    step) once training is under way: it checkpoints, submitit requeues it, and the second attempt resumes the
    run from its last checkpoint. The test sends the signal itself: SLURM sends it up to 60 s early, so with a
    one-minute limit every attempt can be signalled in its first second and never progress (seen in CI)."""
    out = tmp_path / "requeue"
    common = ["--dataset", "ds2", "--synthetic", "400", "--showers", "200", "--preset", "tiny", "--out", str(out)]
    r = submit("--cluster", "local", *common, "--stage", "prep", "--prep-ranks", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    # Flow-3 trains first: enough steps left when its second epoch is logged (step 100 of 248; an epoch is 62
    # steps) for the signal to land mid-training; flows 1 and 2 then take one step each.
    r = submit("--cluster", "slurm", *common, "--stage", "teacher", "--budget", "flow3=epochs:4", "--budget",
               "flow1=steps:1", "--budget", "flow2=steps:1", "--time", "00:10:00", "--no-wait")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    job = _job_ids(r.stdout)["teacher"]

    def log_text() -> str:
        return "".join(p.read_text(errors="replace") for p in (out / "logs" / "teacher").glob("*_log.*"))

    deadline = time.monotonic() + 300
    while "[flow-3] epoch 2/" not in log_text():  # flow-3 is under way; its epoch 1 is checkpointed
        assert time.monotonic() < deadline, log_text()[-3000:]
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    deadline = time.monotonic() + 600
    while (states := _sacct_states([job]).get(job, ["PENDING"]))[-1] not in ("COMPLETED", "FAILED", "CANCELLED"):
        assert time.monotonic() < deadline, states
        time.sleep(1)
    assert states[-1] == "COMPLETED" and "REQUEUED" in states, (states, log_text()[-3000:])
    assert "resuming at epoch" in log_text()
    for flow in (1, 2, 3):
        assert rundir.weights(out / "run", flow).is_file()


# --- Ray job submission ---------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_head(env: dict[str, str]) -> tuple[str, int, str]:
    """Start a local Ray head; return the ray CLI, its dashboard port and its temp dir.

    Every port is a free one: the dashboard agent's HTTP port is otherwise a fixed 52365, and with another Ray
    on the machine (or a head just stopped) the agent fails to bind it and every `ray job submit` is answered
    "No available agent"."""
    ray = str(Path(PY).parent / "ray")
    port, dash, client, agent = _free_port(), _free_port(), _free_port(), _free_port()
    temp = f"/tmp/rj{port}"  # one per head: a second head in the same folder meets the first one's leftovers
    # In a session of its own: every process the head starts stays in its process group, which _stop_head ends.
    head = subprocess.Popen([ray, "start", "--head", f"--port={port}", f"--dashboard-port={dash}", "--num-cpus=2",
                             f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
                             f"--temp-dir={temp}", "--disable-usage-stats"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    out, _ = head.communicate()
    assert head.returncode == 0, out[-3000:]
    _HEAD_GROUPS[temp] = head.pid
    return ray, dash, temp


_HEAD_GROUPS: dict[str, int] = {}  # temp dir of a head -> the process group of everything it started


def _stop_head(temp: str) -> None:
    """Stop the head started with ``temp`` and every process it started, and only those (``ray stop`` would stop
    every Ray on the machine). Some of them (the dashboard agent, the client server) do not name ``temp`` on
    their command line: they are found by the head's process group; left running, they would take CPU from every
    later test."""
    pids = sorted({int(p) for pattern in (["-f", temp], ["-g", str(_HEAD_GROUPS.pop(temp))])
                   for p in subprocess.run(["pgrep", *pattern], capture_output=True, text=True).stdout.split()})
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 3
        while (pids := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.1)
    shutil.rmtree(temp, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Still running (not gone, not a zombie awaiting its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _submit(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``ray job submit``; a head just started may not have its job agent up yet, which Ray answers with
    "No available agent" before creating any job, so that answer is retried."""
    for _ in range(30):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
        if r.returncode == 0 or "No available agent" not in r.stdout + r.stderr:
            return r
        time.sleep(2)
    return r


@pytest.mark.integration
def test_ray_job_submit_against_local_head(local_run: Path) -> None:
    """The pipeline's command under ``ray job submit``, in the run folder of the local pipeline with its
    production and report removed: the trained flows are found done without starting a Ray Train worker group,
    and Ray actors make the production again, bit for bit the local pool's. (Ray Train on an existing cluster:
    test_distributed and test_multinode.)"""
    with h5py.File(local_run / "production.h5", "r") as f:
        local_showers = f["showers"][:]
    (local_run / "production.h5").unlink()
    shutil.rmtree(local_run / "report")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    ray, dash, temp = _ray_head(env)
    try:
        r = _submit([ray, "job", "submit", f"--address=http://127.0.0.1:{dash}", "--",
                     PY, "-m", "launch.ray_job", *tiny(local_run.parent), "--out", str(local_run)], env)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
        assert "succeeded" in r.stdout.lower()
        for name in ("flow-3", "flow-3-student"):
            assert f"[{name}] already trained to its budget" in r.stdout, r.stdout[-4000:]
        assert "RayTrainWorker" not in r.stdout and "backend='ray'" in r.stdout
        assert_pipeline_outputs(local_run)
        with h5py.File(local_run / "production.h5", "r") as f:
            np.testing.assert_array_equal(f["showers"][:], local_showers)
    finally:
        _stop_head(temp)


# --- the stage registry ----------------------------------------------------------------------------------------

# Which stages compute with each pipeline setting, and the request field that carries it.
USES = {
    "device": ("device", "cuda", {"teacher", "student", "sample", "evaluate"}),
    "dtype": ("dtype", "float64", {"teacher", "student", "sample"}),
    "threads": ("threads", 3, {"teacher", "student", "sample", "evaluate"}),
    "seed": ("seed", 7, {"teacher", "student", "sample", "evaluate"}),
    "epochs": ("epochs", 2, {"teacher", "student"}),
    "eval_epochs": ("epochs", 4, {"evaluate"}),
    "workers": ("workers", 2, {"teacher", "student"}),
    "sample_workers": ("workers", 5, {"sample"}),
    "sample_compile": ("compile", True, {"sample"}),
    "eval_metrics": ("metrics", ("hist", "cls-low"), {"evaluate"}),
    "eval_plots": ("plots", False, {"evaluate"}),
    "noise_kev": ("noise_kev", 0.5, {"teacher"}),
}


def _fields(obj: object) -> list[tuple[str, object]]:
    """Every (name, value) of a request, through nested requests (options, Ray config, launch)."""
    import dataclasses

    out = []
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        out.append((f.name, value))
        if dataclasses.is_dataclass(value):
            out += _fields(value)
    return out


def test_every_setting_reaches_every_stage_that_uses_it(tmp_path: Path) -> None:
    from launch import stages

    flags = {setting: value for setting, (_, value, _) in USES.items()}
    cfg = resolve([("flag", {"dataset": "ds2", "out": str(tmp_path / "o"), "synthetic": 500, "showers": 100,
                             **flags, "resources": {}})])[0]
    for name, stage in stages.REGISTRY.items():
        steps = stage.steps(cfg, stages.Where())
        assert steps, name
        fields = [_fields(s.request) for s in steps]
        for setting, (field, value, users) in USES.items():
            if name not in users:
                continue
            carried = [v for fs in fields for k, v in fs if k == field]
            assert value in carried, f"{setting} does not reach {name}: {steps}"
            if setting not in ("epochs", "workers"):  # epochs/workers fields of other settings share the name
                assert all(v == value for v in carried), f"{name} resolves another {setting}: {carried}"
    # Flow-3 trains on Ray Train workers with one GPU each (ScalingConfig(use_gpu=True)); flows 1-2 in-process.
    teacher = {s.request.flow: s.request for s in stages.REGISTRY["teacher"].steps(cfg, stages.Where())}
    assert {k: r.ray is not None for k, r in teacher.items()} == {1: False, 2: False, 3: True}
    assert teacher[3].ray.use_gpu and teacher[3].ray.workers == 2
    # Inside an MPI job the sampler runs as every rank (each picks the GPU of its local rank).
    (mpi_sample,) = stages.REGISTRY["sample"].steps(cfg, stages.Where(mpi=True))
    assert mpi_sample.request.launch.backend == "mpi" and mpi_sample.request.request.device == "cuda"
    # A flow's own budget wins over the pipeline's epochs, for that flow only.
    budgeted = resolve([("flag", {"dataset": "ds2", "out": str(tmp_path / "o"), "synthetic": 500, "epochs": 2,
                                  "budget": {"flow3_student": {"steps": 9}}, "resources": {}})])[0]
    students = {s.request.flow: s.request.options for s in stages.REGISTRY["student"].steps(budgeted,
                                                                                          stages.Where())}
    assert {k: (o.epochs, o.steps) for k, o in students.items()} == {2: (2, None), 3: (None, 9)}


def test_side_by_side_training_shares_the_cores(tmp_path: Path) -> None:
    """--jobs N: training steps get cores/N threads each (oversubscribed torch threads collapse throughput),
    flow-3 (the longest) starts first; one job leaves the count to the command (0: the CPUs it owns); --threads wins."""
    from launch import stages

    cores = owned_cpus()
    base = {"dataset": "ds2", "out": str(tmp_path / "o"), "synthetic": 500, "resources": {}}
    for jobs, threads, expected in ((1, None, 0), (2, None, max(1, cores // 2)), (2, 3, 3)):
        cfg = resolve([("flag", {**base, "jobs": jobs, "threads": threads})])[0]
        for name in ("teacher", "student"):
            assert stages.REGISTRY[name].independent
            steps = stages.REGISTRY[name].steps(cfg, stages.Where())
            assert steps[0].request.flow == 3
            assert {s.request.options.threads for s in steps} == {expected}, (name, jobs, threads)
    with pytest.raises(UserError, match="--jobs"):
        resolve([("flag", {**base, "jobs": 0})])[0].validate()


def test_device_defaults_and_gpus_only_for_stages_that_use_them(tmp_path: Path) -> None:
    from launch import slurm, stages

    base = {"dataset": "ds2", "out": str(tmp_path / "o"), "synthetic": 500, "showers": 100}
    cpu = resolve([("flag", {**base, "resources": {}})])[0]
    assert cpu.compute_device == "cpu" and cpu.seed == 0  # one default seed, every command's
    gpu = resolve([("flag", {**base, "resources": {"gpus_per_node": 4}})])[0]
    assert gpu.compute_device == "cuda"
    (evaluate,) = stages.REGISTRY["evaluate"].steps(gpu, stages.Where())
    assert evaluate.request.device == "cuda"
    planned = {p.stage: p.gpus for p in slurm.plan(gpu, list(stages.REGISTRY))}
    assert planned == {"prep": 0, "teacher": 4, "student": 4, "sample": 4, "evaluate": 4}
    on_cpu = resolve([("flag", {**base, "device": "cpu", "resources": {"gpus_per_node": 4}})])[0]
    assert {p.gpus for p in slurm.plan(on_cpu, list(stages.REGISTRY))} == {0}
    with pytest.raises(UserError, match="--amp bf16 needs"):
        resolve([("flag", {**base, "amp": "bf16", "resources": {}})])[0]


@pytest.mark.integration
def test_ray_job_submit_with_the_shipped_runtime_env(tmp_path: Path) -> None:
    """The README's command: launch/runtime_env.yaml ships the checkout and pip-installs it into the job's
    environment on the node; the job's first stage runs from there."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    # The node's pip works offline: everything but hpc-calo itself is already installed, and the build uses the
    # node's setuptools instead of fetching one.
    ray, dash, temp = _ray_head({**env, "PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0"})
    try:
        out = tmp_path / "rayjob"
        r = _submit([ray, "job", "submit", f"--address=http://127.0.0.1:{dash}", "--runtime-env",
                     "launch/runtime_env.yaml", "--", "python", "-m", "launch.ray_job", "--dataset", "ds2",
                     "--synthetic", "200", "--preset", "tiny", "--prep-ranks", "1", "--stage", "prep",
                     "--out", str(out)], env)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
        assert "succeeded" in r.stdout.lower()
        assert check_file(out / "data" / "train.h5").n == 200
        assert (out / "store.zarr" / "zarr.json").is_file()
        installed = list(Path(temp).glob("session_*/runtime_resources/pip/*/virtualenv/lib/python*/site-packages/"
                                         "hpc_calo-*.dist-info"))
        assert installed, "hpc-calo was not pip-installed into the job's runtime environment"
    finally:
        _stop_head(temp)
