"""The standard protocol: GEN must be generated at REF's incident energies. Check it, never stop on it."""

from __future__ import annotations

import numpy as np

_RTOL = 1e-6


def compare_incident_energies(e_gen: np.ndarray, e_ref: np.ndarray) -> dict[str, object]:
    """``status``: "identical" (same values, same order), "same_set" (equal after sorting) or "mismatch"."""
    out: dict[str, object] = {"n_gen": len(e_gen), "n_ref": len(e_ref), "rtol": _RTOL}
    if len(e_gen) == len(e_ref) and np.allclose(e_gen, e_ref, rtol=_RTOL, atol=0):
        out.update(status="identical", ok=True, message="GEN uses REF's incident energies, row by row")
        return out
    if len(e_gen) == len(e_ref) and np.allclose(np.sort(e_gen), np.sort(e_ref), rtol=_RTOL, atol=0):
        out.update(status="same_set", ok=True, message="GEN uses REF's incident energies in another order")
        return out
    n = min(len(e_gen), len(e_ref))
    diff = np.abs(np.sort(e_gen[:n]) - np.sort(e_ref[:n])) / np.sort(e_ref[:n]) if n else np.zeros(0)
    msg = (
        f"GEN ({len(e_gen)} showers) does not use REF's ({len(e_ref)} showers) incident energies "
        f"(largest relative difference of sorted energies {float(diff.max(initial=0)):.3g}); "
        "comparisons mix generator quality with differences in the energy spectrum"
    )
    out.update(status="mismatch", ok=False, message=msg, max_rel_diff_sorted=float(diff.max(initial=0)))
    return out
