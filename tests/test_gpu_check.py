"""``bench/gpu/check.sh --dry-run``: the GPU check's plan, rehearsed on the CPU at toy sizes, so that the one
script the GPU machine runs is known to work before that machine is there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(400)
def test_gpu_check_dry_run_runs_every_phase_and_writes_every_item(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    r = subprocess.run(["bash", "bench/gpu/check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=390)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for phase in ("1/4 wheels", "2/4 pytest exited 0", "3/4 benchmarks exited 0", "4/4 convergence benchmark exited 0",
                  "plan on cpu"):
        assert phase in r.stdout, phase
    assert "skipped" in (tmp_path / "pytest.txt").read_text()  # no CUDA here: the GPU tests skip cleanly
    results = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert results["meta"]["dry_run"] is True
    assert any("ms_per_shower" in c for c in results["chain"].values() if isinstance(c, dict))
    assert results["production"]["ds2"]["showers"] > 0
    assert "cpu" in results["classifier"] and any("pairs_per_s" in c for c in results["train"].values()
                                                   if isinstance(c, dict))
    fidelity = json.loads((tmp_path / "fidelity.json").read_text())  # the convergence benchmark, end to end
    assert fidelity["settings"]["device"] == "cpu" and fidelity["settings"]["quick"] is True
    assert {"teacher", "floor"} <= set(fidelity["chains"]) and "cls_high" in fidelity["chains"]["teacher"]
    assert any(p.name.startswith("flow3") for p in (tmp_path / "fidelity_logs").iterdir())
