"""The docs and the code speak of the product: no paths of the machine that wrote them, no work history.

Absolute paths under a home, root's home or a scratch area only exist on one machine, so a figure or an
example that names one cannot be reproduced from the repository; issue numbers point at a tracker the reader
of the repository does not have.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT = (".md", ".py", ".sh", ".toml", ".cfg", ".txt", ".yaml", ".yml")
# Written piecewise so that this file does not match itself.
MACHINE = re.compile(r"(?<![\w.$-])/(?:" + "work|root|home" + r")/")
# /tmp is fine as a place the product chooses for its own sockets and state (Ray, the local SLURM cluster),
# not as where data or scripts are said to be.
TMP = re.compile(r"(?<![\w.$-])/tmp/(?!ray-|hpc-calo-slurm)")
ISSUE = re.compile(r"\b(?:issue|deliverable)s?\s*#?\s*\d+", re.IGNORECASE)


def tracked() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    paths = [ROOT / n for n in names.splitlines() if n.endswith(TEXT) or n in ("Makefile", ".ci/run")]
    return [p for p in paths if p.is_file() and p != Path(__file__).resolve()]


def offences(pattern: re.Pattern[str], suffixes: tuple[str, ...] | None = None) -> list[str]:
    found = []
    for path in tracked():
        if suffixes and not path.name.endswith(suffixes):
            continue
        for no, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if pattern.search(line):
                found.append(f"{path.relative_to(ROOT)}:{no}: {line.strip()}")
    return found


def test_no_machine_paths_in_docs_or_code() -> None:
    assert offences(MACHINE) == []


def test_no_scratch_paths_as_data_locations_in_docs() -> None:
    assert offences(TMP, (".md",)) == []


def test_no_issue_numbers_in_docs_or_code() -> None:
    assert offences(ISSUE) == []


def test_the_checks_catch_what_they_are_for() -> None:
    assert MACHINE.search("JSON copied to `" + "/work" + "/brief/bench.json`")
    assert MACHINE.search("see " + "/home" + "/alice/x.h5") and not MACHINE.search("$HOME/x.h5")
    assert TMP.search("python -m bench.evaluate --work " + "/tmp" + "/bev/work")
    assert not TMP.search("temp dir `" + "/tmp" + "/ray-<jobid>`")
    assert ISSUE.search("### Agreement (issue 9, deliverable 3)") and ISSUE.search("see Issue #12")
    assert not ISSUE.search("a known issue with the driver")


def test_readme_is_an_entry_point() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for page in ("data", "training", "production", "evaluation", "slurm-and-ray", "reliability", "design"):
        assert f"docs/{page}.md" in readme and (ROOT / "docs" / f"{page}.md").is_file()
