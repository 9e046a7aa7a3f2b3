"""``python -m bench.contention [--preset P] [--steps N] [--reps R] [--out FILE]``: training speed when another
process takes one of this process's cores.

Trains a DS2 flow-3 teacher (``tiny`` by default; optimiser steps on random raw batches of the preset's size)
and reports samples/s idle and with one competitor: a Python busy loop pinned to the last CPU this process may
use, started before the case. Each case runs in a fresh process, because OpenMP reads its settings when torch
loads it. The settings:

- ``before``: torch's defaults (one thread per core; OpenMP spins a while at the end of each parallel region);
- ``passive``: one thread per owned CPU with ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at once instead);
- ``after``: what ``hpc_calo.train`` does by default: torch's defaults, with ``hpc_calo.cpus.ThreadGovernor``
  sizing the threads to the owned CPUs other processes leave free (looked at before the first step and polled
  after every step, as the training loop does);
- ``one_thread``: one torch thread.

``--timeline``: one governed training of ``--preset`` for 22 s with the competitor from 6 s to 14 s: every thread
change (when, to what, the CPUs the others used) and samples/s every 2 s.

Cases are interleaved over the repetitions and the median is reported. Other jobs on the machine count as
load: the JSON records the load average before and after, so that a busy "idle" is visible.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench.report import emit, machine

VARIANTS = ("before", "passive", "after", "one_thread")

# Both children: ``preset`` and ``gov`` (a ThreadGovernor or None) set before; one optimiser step per ``step()``,
# the governor polled after it as the training loop does.
_TRAINING = """
import torch
from bench.train import raw_pairs
from hpc_calo.flows.presets import get_preset
from hpc_calo.geometry import DS2
from hpc_calo.models import FlowModel
torch.manual_seed(0)
model = FlowModel.from_preset(3, DS2, preset)
opt = torch.optim.Adam(model.parameters(), lr=1e-4)
g = torch.Generator().manual_seed(0)
batch = get_preset(preset).batch_size
def step():
    loss = model(raw_pairs(DS2.voxels_per_layer, batch, g))
    opt.zero_grad()
    loss.backward()
    opt.step()
    return None if gov is None else gov.poll()
"""

_CHILD = """
import json, os, sys, time
variant, preset, steps, max_s = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
policy = os.environ.get("OMP_WAIT_POLICY")  # the one OpenMP will see
import torch
from hpc_calo.cpus import governed_threads, torch_threads
gov = None
if variant == "passive":
    torch_threads(0)
elif variant != "before":
    gov = governed_threads(1 if variant == "one_thread" else 0)
first = torch.get_num_threads()
""" + _TRAINING + """
for _ in range(3):  # warm-up
    step()
t0 = time.perf_counter()
done = 0
while done < steps and (done < 3 or time.perf_counter() - t0 < max_s):
    step()
    done += 1
dt = time.perf_counter() - t0
print(json.dumps({"samples_per_s": done * batch / dt, "steps": done, "threads_first": first,
                  "threads_last": torch.get_num_threads(), "wait_policy": policy}))
"""

_BUSY = "while True:\n    pass\n"

_TIMELINE = """
import json, os, subprocess, sys, time
preset, busy_code, cpu = sys.argv[1], sys.argv[2], int(sys.argv[3])
from hpc_calo.cpus import governed_threads
def say(**event):
    print(json.dumps({"t_s": round(time.monotonic() - t0, 2), **event}), flush=True)
t0 = time.monotonic()
gov = governed_threads(0)
say(event="start", threads=gov.threads)
""" + _TRAINING + """
competitor, rows, since = None, 0, time.monotonic()
while time.monotonic() - t0 < 22:
    if competitor is None and time.monotonic() - t0 >= 6:
        competitor = subprocess.Popen([sys.executable, "-c", busy_code])
        os.sched_setaffinity(competitor.pid, {cpu})
        say(event="competitor starts", cpu=cpu)
    if competitor and time.monotonic() - t0 >= 14:
        competitor.kill()
        competitor.wait()
        competitor = False
        say(event="competitor stops")
    changed = step()
    rows += batch
    if changed is not None:
        say(event="threads", threads=changed, other_cpus=round(gov.others, 2))
    if time.monotonic() - since >= 2:
        say(event="speed", samples_per_s=round(rows / (time.monotonic() - since)), threads=gov.threads)
        rows, since = 0, time.monotonic()
if competitor:
    competitor.kill()
"""


def timeline(preset: str, cpu: int) -> list[dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", _TIMELINE, preset, _BUSY, str(cpu)], env=env, check=True,
                         capture_output=True, text=True).stdout
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    for e in events:
        print(e, file=sys.stderr)
    return events


def run_case(variant: str, preset: str, steps: int, max_s: float) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if variant == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    out = subprocess.run([sys.executable, "-c", _CHILD, variant, preset, str(steps), str(max_s)], env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.contention", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", help="the flow-3 preset trained (default tiny)")
    p.add_argument("--steps", type=int, default=40, help="timed optimiser steps per case (default 40)")
    p.add_argument("--max-seconds", type=float, default=20.0,
                   help="stop a case after this long (at least 3 steps), so collapsed cases stay short")
    p.add_argument("--reps", type=int, default=3, help="repetitions of every case (default 3)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--timeline", action="store_true",
                   help="one governed run with the competitor from 6 s to 14 s: thread changes and speed over time")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("needs at least 2 CPUs: the competitor takes one of them")
    if args.timeline:
        emit({"bench": "contention --timeline", "model": f"{args.preset} DS2 flow-3 teacher, float32",
              "competitor_cpu": cpus[-1], "events": timeline(args.preset, cpus[-1]), "machine": machine()}, args.out)
        return 0
    load_before = os.getloadavg()
    runs: dict[str, list[dict[str, Any]]] = {}
    for _ in range(args.reps):
        for busy in (False, True):
            competitor = None
            if busy:
                competitor = subprocess.Popen([sys.executable, "-c", _BUSY])
                os.sched_setaffinity(competitor.pid, {cpus[-1]})
                time.sleep(0.5)
            try:
                for v in args.variants:
                    r = run_case(v, args.preset, args.steps, args.max_seconds)
                    runs.setdefault(f"{v}/{'busy' if busy else 'idle'}", []).append(r)
                    print(v, "busy" if busy else "idle", r, file=sys.stderr)
            finally:
                if competitor is not None:
                    competitor.kill()
                    competitor.wait()
    cases = {}
    for v in args.variants:
        idle, busy = (statistics.median(r["samples_per_s"] for r in runs[f"{v}/{c}"]) for c in ("idle", "busy"))
        first = runs[f"{v}/idle"][0]
        cases[v] = {"idle_samples_per_s": round(idle, 1), "busy_samples_per_s": round(busy, 1),
                    "busy_over_idle": round(busy / idle, 3), "wait_policy": first["wait_policy"],
                    "threads_first_last": {
                        c: sorted({(r["threads_first"], r["threads_last"]) for r in runs[f"{v}/{c}"]})
                        for c in ("idle", "busy")},
                    "samples_per_s_each_run": {c: [round(r["samples_per_s"], 1) for r in runs[f"{v}/{c}"]]
                                               for c in ("idle", "busy")}}
    report = {"bench": "contention", "model": f"{args.preset} DS2 flow-3 teacher, float32", "steps": args.steps,
              "max_seconds": args.max_seconds, "reps": args.reps, "competitor_cpu": cpus[-1],
              "goal": "after: busy >= 0.4x idle, and idle not slower than before", "cases": cases, "machine": machine(),
              "loadavg_before": [round(x, 2) for x in load_before],
              "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
