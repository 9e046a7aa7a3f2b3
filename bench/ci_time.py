"""Wall time of the CI suite's slowest tests, each in its own pytest run, one after the other (as CI runs them:
the environment as it is, OMP_NUM_THREADS included; SLURM tests need ``slurm/local_cluster.sh up``).

python -m bench.ci_time [--quick] [--out bench/results/ci_time.json] [TEST_ID ...]

Run it on two checkouts to compare them. ``--quick``: the three shortest of the list only.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from bench.report import emit, machine

ROOT = Path(__file__).resolve().parents[1]
SLOWEST = (
    "tests/test_launch.py::test_ray_job_submit_against_local_head",
    "tests/test_launch.py::test_slurm_training_requeues_on_the_checkpoint_signal_and_resumes",
    "tests/test_launch.py::test_slurm_pipeline_end_to_end",
    "tests/test_bench_fidelity.py::test_quick_fidelity_run_resumes_and_reports",
    "tests/test_launch.py::test_local_pipeline_end_to_end",
    "tests/test_evaluate_cli.py::test_cli_end_to_end_writes_every_output",
    "tests/test_safety.py::test_ctrl_c_on_mpi_convert_ends_every_rank",
    "tests/test_safety.py::test_generate_and_evaluate_never_replace_what_is_not_theirs",
)
QUICK = SLOWEST[-3:]


def measure(test: str) -> dict[str, object]:
    """One pytest run of ``test``: its outcome, the test's own time (setup + call + teardown) and the run's."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--timeout=900", "-q",
                            f"--junitxml={xml}", test], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "HPC_CALO_REQUIRE_SLURM": "1"})
        wall = time.perf_counter() - t0
        case = ET.parse(xml).find(".//testcase") if xml.exists() else None
    return {"rc": r.returncode, "test_s": None if case is None else round(float(case.get("time", "nan")), 1),
            "run_s": round(wall, 1)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ci_time", description=__doc__.split("\n\n")[0])
    p.add_argument("tests", nargs="*", help="test ids (default: the suite's slowest)")
    p.add_argument("--quick", action="store_true", help="the three shortest of the default list")
    p.add_argument("--out", default="bench/results/ci_time.json", help="JSON result file")
    a = p.parse_args(argv)
    tests = a.tests or (QUICK if a.quick else SLOWEST)
    results = {}
    for test in tests:
        results[test] = measure(test)
        print(f"{results[test]['test_s']!s:>8} s  rc={results[test]['rc']}  {test}", file=sys.stderr, flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    emit({"machine": machine(), "commit": commit.stdout.strip(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
          "tests": results}, a.out)
    return 0 if all(r["rc"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
