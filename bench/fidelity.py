"""Convergence benchmark: train the whole chain on synthetic DS2, then score its showers against the statistical
floor with the evaluation a user runs.

python -m bench.fidelity [--quick] [--work runs/fidelity] [--preset small] [--budget flow3=minutes:120 ...]
                         [--lr flow3=1e-3] [--jobs 2] [--threads 1] [--noise-kev 5] [--teachers-only] [--device cuda]
                         [--out bench/results/fidelity.json] [--figures docs/figures]

Every step runs the product's own command in a child process (as a user would) and is skipped when its output
exists, so the benchmark survives being stopped and restarted: training resumes from its checkpoints, and a
larger ``--budget`` on a re-run extends a flow's training. Generated files and their reports remember the weights
they came from: after more training they are made again. Steps:

1. synthetic files: training (``--train`` showers), held-out A and held-out B (``--heldout`` each, other seeds);
2. the pair store (``data_prep.convert``);
3. the teachers (``hpc_calo.train``), then the students (``hpc_calo.distill``; not with ``--teachers-only``), up
   to ``--jobs`` at a time (a student waits for its teacher), each child with ``--threads`` torch threads;
4. showers for held-out A's incident energies from the teacher chain and from the student chain
   (``hpc_calo.generate``), each with and without layer renormalisation, each as soon as its chain's models are
   trained (the teacher chain's while the students still distil);
5. ``hpc_calo.evaluate`` of each against held-out A, and of held-out B against held-out A: the floor, what two
   independent samples of the same physics score;
6. the JSON summary (``--out``) and figures (``--figures``): validation-loss curves per flow and the separation
   power of every feature group beside the floor.

Steps 3-5 run as one graph, ``--jobs`` at a time: the floor, which needs no model, fills any idle slot.

``--quick`` shrinks every size so that the whole plumbing runs in CI-sized time; its numbers mean nothing.

``--device cuda`` runs every training, generation and classifier on the GPU (the ``--jobs`` steps share it);
``bench/gpu/check.sh`` runs the benchmark so at the reference DS2 preset, with budgets in minutes.

To measure a lever, run the benchmark twice in two work folders with equal budgets, one with the lever
(``--noise-kev``, ``--preset``, a budget), and compare their JSON; ``--teachers-only`` halves the cost.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.report import machine
from hpc_calo import rundir
from hpc_calo.digest import files_digest
from hpc_calo.errors import run_cli
from hpc_calo.flags import noise_kev, positive_float
from launch.submit import parse_budget

FLOWS = ("flow1", "flow2", "flow3", "flow2_student", "flow3_student")
CHAINS = ("teacher", "student")
GROUPS = ("etot_einc", "e_layer", "ec_eta", "ec_phi", "width_eta", "width_phi", "ec_r", "width_r", "sparsity", "voxel")


@dataclass(frozen=True)
class Settings:
    work: Path
    preset: str
    train: int
    heldout: int
    budget: dict[str, str]
    jobs: int
    threads: int
    eval_epochs: int
    out: Path | None
    figures: Path | None
    quick: bool
    unnormalised: bool = True  # also the chains without layer renormalisation (cheap metrics only)
    noise_kev: float | None = None  # the teachers' dequantisation noise width; None: the preset's
    lr: dict[str, float] = field(default_factory=dict)  # a teacher's peak learning rate; absent: the preset's
    chains: tuple[str, ...] = CHAINS
    device: str = "cpu"  # where every step trains, samples and classifies
    seed: int = 11
    log: list[str] = field(default_factory=list)

    def path(self, *parts: str) -> Path:
        return self.work.joinpath(*parts)


def _budget_flags(s: Settings, name: str) -> list[str]:
    if name not in s.budget:
        return []
    unit, amount = s.budget[name].split(":")
    return [f"--{unit}", amount]


_print_lock = threading.Lock()
_children: set[subprocess.Popen] = set()  # the steps running now (each in a thread of its own)
_children_lock = threading.Lock()


def _say(msg: str) -> None:
    with _print_lock:
        print(f"[fidelity {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _run(s: Settings, name: str, module: str, args: list[str]) -> None:
    """Run ``python -m module args`` with its output in WORK/logs/NAME.log; raise with the log's tail on failure."""
    logs = s.path("logs")
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(s.threads), "MKL_NUM_THREADS": str(s.threads)}
    t = time.perf_counter()
    _say(f"{name}: python -m {module} {' '.join(args)}")
    with open(logs / f"{name}.log", "a") as log:
        child = subprocess.Popen([sys.executable, "-m", module, *args], stdout=log, stderr=subprocess.STDOUT,
                                 env=env)
        with _children_lock:
            _children.add(child)
        try:
            code = child.wait()
        finally:
            with _children_lock:
                _children.discard(child)
    if code:
        tail = (logs / f"{name}.log").read_text().splitlines()[-15:]
        raise SystemExit(f"{name} failed (exit {code}); the end of {logs / f'{name}.log'}:\n" + "\n".join(tail))
    _say(f"{name}: done in {time.perf_counter() - t:.0f} s")


def make_data(s: Settings) -> None:
    for name, n, seed in (("train", s.train, s.seed), ("heldout_a", s.heldout, s.seed + 1),
                          ("heldout_b", s.heldout, s.seed + 2)):
        if not s.path("data", f"{name}.h5").exists():
            s.path("data").mkdir(parents=True, exist_ok=True)
            _run(s, f"synth_{name}", "data_prep.synth", ["--dataset", "ds2", "--showers", str(n), "--seed", str(seed),
                                                          "--out", str(s.path("data", f"{name}.h5"))])
    _run(s, "convert", "data_prep.convert", ["--dataset", "ds2", str(s.path("data", "train.h5")),
                                             "--out", str(s.path("store.zarr")), "--val-fraction",
                                             # --quick: 15 validation showers (see _train_one)
                                             "0.05" if s.quick else "0.1", "--quiet"])


def _train_one(s: Settings, name: str) -> None:
    flow = name[4]
    common = ["--threads", str(s.threads), "--log-every", "200", "--device", s.device, *_budget_flags(s, name)]
    if name.endswith("_student"):
        # A student's validation and quality check sample its teacher, at a cost that grows with the rows:
        # --quick keeps them few.
        quick = ["--diagnostic-samples", "256"] if s.quick else []
        _run(s, name, "hpc_calo.distill", ["--run", str(s.path("run")), "--flow", flow, *common, *quick])
    else:
        noise = [] if s.noise_kev is None else ["--noise-kev", str(s.noise_kev)]
        lr = ["--lr", str(s.lr[name])] if name in s.lr else []
        _run(s, name, "hpc_calo.train", ["--flow", flow, "--store", str(s.path("store.zarr")), "--preset", s.preset,
                                         "--out", str(s.path("run")), *noise, *lr, *common])


def _evaluate(s: Settings, key: str, gen: Path) -> None:
    out = s.path("reports", key)
    if (out / "report.json").exists():
        return
    metrics = "hist,cls-boost" if key.endswith("_unnormalised") else "hist,cls-low,cls-high,cls-boost,fpd"
    out.parent.mkdir(parents=True, exist_ok=True)
    _run(s, f"evaluate_{key}", "hpc_calo.evaluate", [
        str(gen), str(s.path("data", "heldout_a.h5")), "--dataset", "ds2", "--out", str(out), "--metrics", metrics,
        "--epochs", str(s.eval_epochs), "--device", s.device, *(["--no-plots"] if s.quick else [])])


def _parallel(s: Settings, tasks: dict[str, Any], after: dict[str, tuple[str, ...]]) -> None:
    """Run ``tasks`` (name -> callable), ``jobs`` at a time; a free slot takes the first task, in this order, whose
    ``after[name]`` have all finished (a waiting task never holds a slot)."""
    waiting, finished, failures = list(tasks), set(), []
    with ThreadPoolExecutor(max_workers=s.jobs) as pool:
        running: dict[Any, str] = {}
        while waiting or running:
            ready = [n for n in waiting if finished.issuperset(after.get(n, ()))]
            while ready and len(running) < s.jobs and not failures:
                name = ready.pop(0)
                waiting.remove(name)
                running[pool.submit(tasks[name])] = name
            if not running:
                break  # a failure stopped new tasks, or what is left waits on a task that failed
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in done:
                finished.add(running.pop(f))
                if f.exception() is not None:
                    failures.append(f.exception())
    if failures:
        raise failures[0]


def _chain_weights(s: Settings, chain: str) -> list[Path]:
    student = chain == "student"
    return [rundir.weights(s.path("run"), k, student and k > 1) for k in (1, 2, 3)]


def _current(s: Settings, out: Path, chain: str, key: str) -> bool:
    """Whether ``out`` was generated from the chain's present weights; a stale file and its report are removed."""
    stamp = out.with_suffix(".weights")
    digest = files_digest(_chain_weights(s, chain))
    if out.exists() and stamp.exists() and stamp.read_text() == digest:
        return True
    out.unlink(missing_ok=True)
    shutil.rmtree(s.path("reports", key), ignore_errors=True)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(digest)  # written before the file it describes: a crash leaves no file, so nothing stale
    return False


def _generate(s: Settings, key: str, out: Path, chain: str, renormalise: bool) -> None:
    """Showers of ``chain`` for held-out A's energies, unless ``out`` holds those of the present weights."""
    if _current(s, out, chain, key):
        return
    _run(s, f"generate_{key}", "hpc_calo.generate", [
        "--run", str(s.path("run")), "--energies", str(s.path("data", "heldout_a.h5")), "--out", str(out),
        "--seed", "0", "--students", "yes" if chain == "student" else "no", "--threads", str(s.threads),
        "--device", s.device,
        "--no-progress", "--renormalise" if renormalise else "--no-renormalise"])


def train_generate_evaluate(s: Settings) -> dict[str, dict[str, Any]]:
    """Every step as one graph, ``jobs`` at a time: the teachers and students (a student after its teacher,
    flow-3 first: the longest), each chain's showers for held-out A's energies as soon as that chain's models
    are trained (with and without renormalisation unless ``--renormalised-only``) and their reports (the chains
    with every metric, the unnormalised variants with the cheap ones), and the floor, which needs no model and
    so fills a free slot whenever one is idle. Returns the reports."""
    students = "student" in s.chains
    tasks: dict[str, Any] = {name: (lambda n=name: _train_one(s, n))
                             for name in ("flow3", "flow1", "flow2", *(("flow2_student", "flow3_student")
                                                                       if students else ()))}
    after: dict[str, tuple[str, ...]] = {"flow2_student": ("flow2",), "flow3_student": ("flow3",)}
    cases = {}
    for chain in s.chains:
        models = ("flow1", "flow2", "flow3") if chain == "teacher" else ("flow1", "flow2_student", "flow3_student")
        for renorm in (True, False) if s.unnormalised else (True,):
            key = chain + ("" if renorm else "_unnormalised")
            cases[key] = out = s.path("gen", f"{key}.h5")
            tasks[f"generate_{key}"] = lambda k=key, o=out, c=chain, r=renorm: _generate(s, k, o, c, r)
            after[f"generate_{key}"] = models
            tasks[key] = lambda k=key, o=out: _evaluate(s, k, o)
            after[key] = (f"generate_{key}",)
    cases["floor"] = s.path("data", "heldout_b.h5")
    tasks["floor"] = lambda: _evaluate(s, "floor", cases["floor"])
    _parallel(s, tasks, after)
    return {key: json.loads(s.path("reports", key, "report.json").read_text()) for key in cases}


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    groups = report.get("histograms", {}).get("groups", {})
    out: dict[str, Any] = {
        "mean_e_tot_over_e_inc": report["mean_e_tot_over_e_inc"],
        "separation_power": {g: groups[g]["mean_separation_power"] for g in GROUPS if g in groups},
    }
    for key in ("cls_low", "cls_high", "cls_boost"):
        if key in report:
            out[key] = {k: report[key][k] for k in ("auc", "jsd") if k in report[key]}
            if "optimiser_steps" in report[key]:
                out[key]["optimiser_steps"] = report[key]["optimiser_steps"]
    for key in ("fpd", "kpd"):
        if key in report:
            out[key] = {"value": report[key]["value"], "error": report[key]["error"]}
    return out


def _training_seconds(flow_dir: Path, threads: int) -> tuple[float, float]:
    """Training core-seconds (wall x threads) and CPU seconds used, over every invocation: the checkpoint's running
    totals (a metrics line's ``elapsed_s`` counts only the invocation that wrote it, and the thread count may
    differ between invocations). A checkpoint from before the totals were kept counts its seconds at ``threads``;
    one without CPU seconds reports its core-seconds for both."""
    from hpc_calo.train.checkpoint import load_checkpoint

    ck = rundir.checkpoint_in(flow_dir)
    if not ck.exists():
        return 0.0, 0.0
    state = load_checkpoint(ck)
    core = float(state.get("core_s", float(state.get("train_s", 0.0)) * threads))
    return core, float(state.get("cpu_s", core))


def training_record(s: Settings) -> dict[str, Any]:
    """Per flow: validation-loss curve, steps, core-hours (training seconds x torch threads) and the CPU-hours
    used; per student, its quality against its teacher."""
    rec = {}
    for name in FLOWS:
        d = rundir.flow_dir(s.path("run"), int(name[4]), name.endswith("_student"))
        if not rundir.metrics_in(d).exists():
            continue
        epochs = [json.loads(x) for x in rundir.metrics_in(d).read_text().splitlines()]
        epochs = [e for e in epochs if e.get("event") == "epoch"]
        cfg = json.loads(rundir.config_in(d).read_text())
        core_s, cpu_s = _training_seconds(d, s.threads)
        rec[name] = {
            "curve": [{"step": e["step"], "val": e["val_loss"], "train": e["train_loss"]} for e in epochs],
            "steps": epochs[-1]["step"] if epochs else 0,
            "best_val": min((e["val_loss"] for e in epochs), default=None),
            "core_hours": core_s / 3600,
            "cpu_hours": cpu_s / 3600,
            "batch_size": cfg["train"]["batch_size"],
            "budget": s.budget.get(name, "preset epochs"),
        }
        quality = rundir.diagnostics_in(d)  # a student's score against its teacher (hpc_calo.distill)
        if quality.is_file():
            rec[name]["quality"] = {k: v for k, v in json.loads(quality.read_text()).items() if k != "of"}
    return rec


def plot(s: Settings, result: dict[str, Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert s.figures is not None
    s.figures.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, axes = plt.subplots(1, len(result["training"]), figsize=(3.2 * len(result["training"]), 3.0))
    for ax, (name, rec) in zip(axes if len(result["training"]) > 1 else [axes], result["training"].items(),
                               strict=True):
        steps = [p["step"] for p in rec["curve"]]
        ax.plot(steps, [p["val"] for p in rec["curve"]], "o-", ms=3, label="validation")
        ax.plot(steps, [p["train"] for p in rec["curve"]], "--", lw=1, label="training")
        ax.set_title(f"{name} ({rec['core_hours']:.2f} core-h)", fontsize=9)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("KL estimate" if name.endswith("student") else "NLL (nats)")
    axes_list = axes if len(result["training"]) > 1 else [axes]
    axes_list[0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(s.figures / "fidelity_loss.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.4))
    groups = [g for g in GROUPS if g in result["chains"]["floor"]["separation_power"]]
    keys = [k for k in ("teacher", "student", "floor") if k in result["chains"]]
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        sp = result["chains"][key]["separation_power"]
        offset = (i - (len(keys) - 1) / 2) * width
        ax.bar([j + offset for j in range(len(groups))], [float("nan") if sp.get(g) is None else sp[g] for g in groups],
               width, label=key)  # no bar: no generated shower in the reference's range
    ax.set_xticks(range(len(groups)), groups, rotation=30, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("mean separation power")
    ax.legend(fontsize=8)
    ax.set_title(f"synthetic DS2, {result['settings']['heldout']} showers vs held-out; floor: a second held-out file")
    fig.tight_layout()
    paths.append(s.figures / "fidelity_separation.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def goals(result: dict[str, Any]) -> dict[str, Any]:
    c, floor = result["chains"], result["chains"]["floor"]["separation_power"]
    t = c["teacher"]
    out = {
        "teacher_cls_high_auc<=0.80": t.get("cls_high", {}).get("auc", 1.0) <= 0.80,
        "teacher_cls_low_auc<=0.85": t.get("cls_low", {}).get("auc", 1.0) <= 0.85,
        "core_hours<=12": sum(r["core_hours"] for r in result["training"].values()) <= 12,
    }
    if "student" in c:
        out["student_within_0.05_of_teacher"] = all(
            c["student"].get(k, {}).get("auc", 1.0) <= t.get(k, {}).get("auc", 0.0) + 0.05
            for k in ("cls_low", "cls_high"))
    for chain in (ch for ch in CHAINS if ch in c):
        for g in ("e_layer", "etot_einc"):
            sp = c[chain]["separation_power"].get(g)  # None: no generated shower in the reference's range
            out[f"{chain}_S({g})<=2x_floor"] = sp is not None and sp <= 2 * floor[g]
    return out


def run(s: Settings) -> dict[str, Any]:
    t0 = time.perf_counter()
    make_data(s)
    reports = train_generate_evaluate(s)
    result: dict[str, Any] = {
        "command": "python -m bench.fidelity " + " ".join(sys.argv[1:]),
        "machine": {**machine(), "torch": torch.__version__,
                    **({"gpu": torch.cuda.get_device_name(0)} if s.device == "cuda" else {})},
        "settings": {"preset": s.preset, "train": s.train, "heldout": s.heldout, "budget": s.budget,
                     "threads": s.threads, "jobs": s.jobs, "eval_epochs": s.eval_epochs, "quick": s.quick,
                     "noise_kev": s.noise_kev, "lr": s.lr, "chains": list(s.chains), "device": s.device},
        "training": training_record(s),
        "chains": {k: _summary(r) for k, r in reports.items()},
    }
    result["goals"] = goals(result)
    if s.figures is not None:
        result["figures"] = [str(p) for p in plot(s, result)]
    result["wall_s_this_invocation"] = round(time.perf_counter() - t0, 1)
    if s.out is not None:
        s.out.parent.mkdir(parents=True, exist_ok=True)
        s.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _check_budget(text: str) -> tuple[str, str]:
    name, budget = parse_budget(text)  # the launcher's syntax and checks, one parser for both
    (unit, amount), = budget.items()
    if name not in FLOWS or unit not in ("epochs", "steps", "minutes"):
        raise argparse.ArgumentTypeError(f"expected FLOW=UNIT:N with FLOW one of {', '.join(FLOWS)}, not {text!r}")
    return name, f"{unit}:{amount}"


def _check_lr(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    if name not in ("flow1", "flow2", "flow3"):
        raise argparse.ArgumentTypeError(f"expected FLOW=LR with FLOW one of flow1, flow2, flow3, not {text!r}")
    return name, positive_float("--lr")(value)  # hpc_calo.train's own check of the value


def _stop_children(signum: int, frame: Any) -> None:
    """SIGTERM to the benchmark reaches the steps it runs (a terminal's Ctrl-C reaches them anyway): they
    checkpoint and exit, instead of training on, orphaned, into the files a restarted benchmark resumes from."""
    with _children_lock:
        children = list(_children)
    for child in children:
        child.send_signal(signum)
    for child in children:
        child.wait()
    _say(f"{signal.Signals(signum).name}: stopped {len(children)} running step(s); run the same command to resume")
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fidelity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("runs/fidelity"), help="work folder (resumable)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the plumbing in CI-sized time")
    p.add_argument("--preset", default=None, help="model preset (default small; --quick: tiny)")
    p.add_argument("--train", type=int, default=None, help="training showers (default 20000)")
    p.add_argument("--heldout", type=int, default=None, help="showers in each held-out file (default 10000)")
    p.add_argument("--budget", action="append", type=_check_budget, default=[], metavar="FLOW=UNIT:N",
                   help="per-flow training budget (as launch.submit --budget); a larger one on a re-run extends")
    p.add_argument("--lr", action="append", type=_check_lr, default=[], metavar="FLOW=LR",
                   help="a teacher's OneCycle peak learning rate, e.g. flow3=1e-3 (default: the preset's)")
    p.add_argument("--jobs", type=int, default=1,
                   help="processes at a time: training, generation, evaluation (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per child process (default 1)")
    p.add_argument("--eval-epochs", type=int, default=None, help="DNN classifier epochs (default 50; --quick: 1)")
    p.add_argument("--noise-kev", type=noise_kev, default=None,
                   help="the teachers' dequantisation noise width in keV (default: the preset's)")
    p.add_argument("--teachers-only", action="store_true",
                   help="no students: train, generate and evaluate the teacher chain only")
    p.add_argument("--renormalised-only", action="store_true",
                   help="skip the chains without layer renormalisation (saves one teacher-chain generation)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where every step trains, generates and classifies (default cpu)")
    p.add_argument("--out", type=Path, default=None, help="summary JSON (default WORK/fidelity.json)")
    p.add_argument("--figures", type=Path, default=None, help="figure folder (default WORK/figures)")
    a = p.parse_args(argv)
    if a.jobs < 1 or a.threads < 1:
        p.error("--jobs and --threads must be >= 1")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch here")
    quick_budget = {"flow1": "steps:30", "flow2": "steps:20", "flow3": "steps:30", "flow2_student": "steps:10",
                    "flow3_student": "steps:10"}
    s = Settings(
        work=a.work,
        preset=a.preset or ("tiny" if a.quick else "small"),
        train=a.train or (300 if a.quick else 20_000),
        heldout=a.heldout or (200 if a.quick else 10_000),
        budget={**(quick_budget if a.quick else {}), **dict(a.budget)},
        jobs=a.jobs,
        threads=a.threads,
        eval_epochs=a.eval_epochs or (1 if a.quick else 50),
        out=a.out or a.work / "fidelity.json",
        figures=a.figures or a.work / "figures",
        quick=a.quick,
        unnormalised=not a.renormalised_only,
        noise_kev=a.noise_kev,
        lr=dict(a.lr),
        chains=("teacher",) if a.teachers_only else CHAINS,
        device=a.device,
    )
    signal.signal(signal.SIGTERM, _stop_children)
    result = run(s)
    for chain, r in result["chains"].items():
        sp = r["separation_power"]
        aucs = " ".join(f"{k}={r[k]['auc']:.3f}" for k in ("cls_low", "cls_high", "cls_boost") if k in r)
        print(f"{chain:24s} S(E_tot/E_inc)={_num(sp.get('etot_einc'))} S(E_layer)={_num(sp.get('e_layer'))} {aucs}")
    print("goals:", json.dumps(result["goals"]))
    print(f"wrote {s.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
