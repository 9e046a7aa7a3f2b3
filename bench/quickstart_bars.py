"""The quickstart's bars, read from its report: python -m bench.quickstart_bars [REPORT_DIR]

Prints one line per bar (value, bar, pass/fail) and exits 1 when one is missed:
|mean E_tot/E_inc (GEN) / mean (REF) - 1| <= 3 %, S(E_tot/E_inc) <= 0.2, mean S(E_layer) <= 0.15.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

BARS = {"energy response |GEN/REF - 1|": 0.03, "S(E_tot/E_inc)": 0.2, "mean S(E_layer)": 0.15}


def values(report: dict) -> dict[str, float]:
    m = report["mean_e_tot_over_e_inc"]
    groups = report["histograms"]["groups"]
    return {
        "energy response |GEN/REF - 1|": abs(m["gen"] / m["ref"] - 1.0),
        "S(E_tot/E_inc)": groups["etot_einc"]["mean_separation_power"],
        "mean S(E_layer)": groups["e_layer"]["mean_separation_power"],
    }


def check(report: dict) -> dict[str, tuple[float, float, bool]]:
    """{bar: (value, limit, met)}; a missing or undefined value (None: nothing in range) fails its bar."""
    return {k: (v, BARS[k], v is not None and v <= BARS[k]) for k, v in values(report).items()}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    report = Path(argv[0] if argv else "runs/quickstart/report") / "report.json"
    result = check(json.loads(report.read_text()))
    for name, (v, limit, ok) in result.items():
        shown = "n/a" if v is None else f"{v:.4f}"
        print(f"{'PASS' if ok else 'FAIL'}  {name:32s} {shown} (bar {limit})")
    return 0 if all(ok for *_, ok in result.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
