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
    for phase in ("1/3 wheels", "2/3 pytest exited 0", "3/3 benchmarks exited 0", "plan on cpu"):
        assert phase in r.stdout, phase
    assert "skipped" in (tmp_path / "pytest.txt").read_text()  # no CUDA here: the GPU tests skip cleanly
    results = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert results["meta"]["dry_run"] is True
    assert any("ms_per_shower" in c for c in results["chain"].values() if isinstance(c, dict))
    assert results["production"]["ds2"]["showers"] > 0
    assert "cpu" in results["classifier"] and any("pairs_per_s" in c for c in results["train"].values()
                                                   if isinstance(c, dict))
