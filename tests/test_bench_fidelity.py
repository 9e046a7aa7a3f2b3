"""The convergence benchmark's plumbing (``bench.fidelity --quick``) and the quickstart's bars read from reports."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.fidelity import FLOWS
from bench.quickstart_bars import check
from hpc_calo import rundir
from hpc_calo.flows.presets import get_preset


@pytest.mark.integration
def test_quick_fidelity_run_resumes_and_reports(tmp_path: Path) -> None:
    work = tmp_path / "fid"
    # Renormalised chains only: the unnormalised ones run the same commands with one flag more (its record in
    # the output file: test_generate), and a teacher chain samples one feature at a time.
    cmd = [sys.executable, "-m", "bench.fidelity", "--quick", "--work", str(work), "--jobs", "2",
           "--renormalised-only", "--lr", "flow3=2e-3"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    result = json.loads((work / "fidelity.json").read_text())
    assert set(result["training"]) == set(FLOWS)
    lr = {k: json.loads(rundir.config_in(work / "run" / k).read_text())["train"]["max_lr"] for k in ("flow1", "flow3")}
    assert lr == {"flow1": get_preset("tiny").max_lr[1], "flow3": 2e-3}  # --lr reaches the flow it names alone
    for rec in result["training"].values():
        assert rec["steps"] > 0 and rec["curve"] and rec["core_hours"] > 0
    for name in ("flow2_student", "flow3_student"):
        assert 0.0 <= result["training"][name]["quality"]["student_vs_teacher_auc"] <= 1.0
    chains = result["chains"]
    assert set(chains) == {"teacher", "student", "floor"}
    for key in ("teacher", "student", "floor"):
        assert {"cls_low", "cls_high", "cls_boost", "fpd", "kpd"} <= set(chains[key])
        assert 0.0 <= chains[key]["cls_boost"]["auc"] <= 1.0
    assert {"e_layer", "etot_einc"} <= set(chains["floor"]["separation_power"])
    assert (work / "figures" / "fidelity_loss.png").stat().st_size > 0
    assert (work / "figures" / "fidelity_separation.png").stat().st_size > 0
    # Run again: every step is found done; training resumes at its end and takes no step.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:]
    assert json.loads((work / "fidelity.json").read_text())["training"] == result["training"]
    assert "python -m hpc_calo.generate" not in again.stdout and "python -m hpc_calo.evaluate" not in again.stdout
    bars = check(json.loads((work / "reports" / "floor" / "report.json").read_text()))
    assert all(ok for *_, ok in bars.values()), bars  # two samples of one distribution meet the quickstart's bars
    bars = check(json.loads((work / "reports" / "teacher" / "report.json").read_text()))
    assert not all(ok for *_, ok in bars.values())  # a few steps of a tiny model do not


def test_quickstart_preset_exists() -> None:
    p = get_preset("quickstart")
    assert p.dataset is None and p.energies == "shares" and p.noise_mev == 5e-4
    assert get_preset("ds2").noise_mev == 5e-3  # the reference's width, for the reference architecture


def test_generated_files_are_remade_after_more_training(tmp_path: Path) -> None:
    from bench.fidelity import Settings, _chain_weights, _current

    s = Settings(work=tmp_path, preset="tiny", train=1, heldout=1, budget={}, jobs=1, threads=1, eval_epochs=1,
                 out=None, figures=None, quick=True)
    for w in {*_chain_weights(s, "teacher"), *_chain_weights(s, "student")}:
        w.parent.mkdir(parents=True, exist_ok=True)
        w.write_bytes(b"weights of " + w.parent.name.encode())
    out, report = s.path("gen", "student.h5"), s.path("reports", "student", "report.json")
    assert not _current(s, out, "student", "student")  # nothing generated yet
    out.write_bytes(b"showers")
    report.parent.mkdir(parents=True)
    report.write_text("{}")
    assert _current(s, out, "student", "student") and out.exists() and report.exists()
    assert _current(s, s.path("gen", "teacher.h5"), "teacher", "teacher") is False
    _chain_weights(s, "student")[2].write_bytes(b"trained further")  # flow-3 student changed
    assert not _current(s, out, "student", "student")
    assert not out.exists() and not report.exists()  # the stale file and its report are gone


def test_a_task_waiting_for_another_does_not_hold_a_slot(tmp_path: Path) -> None:
    import threading

    from bench.fidelity import Settings, _parallel

    s = Settings(work=tmp_path, preset="tiny", train=1, heldout=1, budget={}, jobs=2, threads=1, eval_epochs=1,
                 out=None, figures=None, quick=True)
    c_ran, order = threading.Event(), []
    tasks = {"a": lambda: order.append(("a", c_ran.wait(timeout=10))), "b": lambda: order.append(("b", True)),
             "c": lambda: (c_ran.set(), order.append(("c", True)))}
    _parallel(s, tasks, {"b": ("a",)})  # b waits for a; c must run beside a meanwhile, not after it
    assert order == [("c", True), ("a", True), ("b", True)]


def test_goals_of_a_teachers_only_run_leave_the_student_out() -> None:
    from bench.fidelity import GROUPS, goals

    sp = {g: 0.01 for g in GROUPS}
    chain = {"separation_power": sp, "cls_low": {"auc": 0.84}, "cls_high": {"auc": 0.9}}
    result = {"chains": {"teacher": chain, "floor": {"separation_power": {g: 0.006 for g in GROUPS}}},
              "training": {"flow3": {"core_hours": 1.0}}}
    out = goals(result)
    assert out["teacher_cls_low_auc<=0.85"] and not out["teacher_cls_high_auc<=0.80"]
    assert out["teacher_S(e_layer)<=2x_floor"] and not any(k.startswith("student") for k in out)

    sp["etot_einc"] = None  # an untrained chain: no generated shower in the reference's range
    assert not goals(result)["teacher_S(etot_einc)<=2x_floor"]


@pytest.mark.integration
def test_stopping_the_benchmark_stops_the_step_it_runs(tmp_path: Path) -> None:
    """SIGTERM to the benchmark: the training it runs checkpoints and ends with it, instead of training on
    orphaned into the files that the restarted benchmark resumes from."""
    work = tmp_path / "fid"
    bench = subprocess.Popen([sys.executable, "-m", "bench.fidelity", "--quick", "--work", str(work), "--jobs", "1",
                              "--teachers-only", "--renormalised-only", "--budget", "flow3=steps:1000000"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    flow3 = rundir.flow_dir(work / "run", 3)
    deadline = time.monotonic() + 300
    while not rundir.metrics_in(flow3).exists():  # written once the training loop runs (and watches signals)
        assert bench.poll() is None and time.monotonic() < deadline, bench.stdout.read() if bench.stdout else ""
        time.sleep(0.2)
    bench.send_signal(signal.SIGTERM)
    out, _ = bench.communicate(timeout=120)
    assert bench.returncode == 128 + signal.SIGTERM, out[-2000:]
    assert "run the same command to resume" in out
    left = subprocess.run(["pgrep", "-f", str(work)], capture_output=True, text=True).stdout.split()
    assert left == [], f"steps still running after the benchmark stopped: {left}"
    assert rundir.checkpoint_in(flow3).exists()  # the step stopped the way a stopped training stops
