"""bench.flow1: every encoding trains and is scored against the same held-out file, on one torch thread."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bench.flow1 import main
from hpc_calo import preprocess as pp


def test_every_encoding_is_trained_and_scored_on_one_thread(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    out = tmp_path / "flow1.json"
    assert main(["--train", "200", "--heldout", "100", "--steps", "5", "--preset", "tiny", "--noise-kev", "0.5",
                 "--out", str(out)]) == 0
    assert torch.get_num_threads() == 1  # the bench says one thread; training must not take the machine's
    result = json.loads(out.read_text())
    assert [c["encoding"] for c in result["cases"]] == list(pp.ENERGY_ENCODINGS)
    assert result["noise_kev"] == 0.5
    for case in [result["floor"], *result["cases"]]:
        for key in ("S_etot_einc", "mean_S_e_layer", "mean_empty_diff"):
            assert math.isfinite(case[key]) and case[key] >= 0.0
    assert all(c["steps"] == 5 for c in result["cases"])


def test_a_bad_noise_width_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from hpc_calo.errors import run_cli

    with pytest.raises(SystemExit) as done:
        run_cli(main, ["--noise-kev", "-1"])
    assert done.value.code == 2
    assert capsys.readouterr().err.startswith("error: --noise-kev must be")
