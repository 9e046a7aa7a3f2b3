"""GPU code paths, on a real CUDA device: ``pytest -m gpu`` (skipped without one; ``bench/gpu/check.sh`` runs
them on the GPU machine). The CPU side of every device setting is tested in test_launch.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


class _SameNoise:
    """The CPU chain's row noise, handed to a chain on another device: both see the same random numbers."""

    def __init__(self, noise: object, device: torch.device) -> None:
        self.noise, self.device = noise, device

    def normal(self, features: int) -> torch.Tensor:
        return self.noise.normal(features).to(self.device)  # type: ignore[attr-defined]

    def uniform(self, features: int) -> torch.Tensor:
        return self.noise.uniform(features).to(self.device)  # type: ignore[attr-defined]


def test_cuda_generation_agrees_with_cpu(tiny_run: Path) -> None:
    from hpc_calo.generate import Chain, _RowNoise

    e = Chain.load(tiny_run, "cpu").random_energies(256, 0)
    showers = {}
    for device in ("cpu", "cuda"):
        chain = Chain.load(tiny_run, device, torch.float64, cuda_graphs=False)
        noise = _SameNoise(_RowNoise(0, 0, len(e), torch.device("cpu"), torch.float64), chain.device)
        t = torch.as_tensor(e, device=chain.device, dtype=torch.float64)
        showers[device] = chain._sample_rows(t, noise).cpu().numpy()
    np.testing.assert_allclose(showers["cuda"], showers["cpu"], rtol=1e-6, atol=1e-9)


def test_cuda_graph_replay_equals_eager(tiny_run: Path) -> None:
    from hpc_calo.generate import Chain

    e = Chain.load(tiny_run, "cpu").random_energies(512, 1)
    eager = Chain.load(tiny_run, "cuda", cuda_graphs=False).sample(e, 3, batch_size=128)
    graphed = Chain.load(tiny_run, "cuda")  # graphs are the CUDA default
    assert all(type(f).__name__ == "_Graphed" for f in graphed.from_latent.values())
    out = graphed.sample(e, 3, batch_size=128)  # 4 batches: the 2nd captures, the 3rd and 4th replay
    assert all(128 in f.graphs for f in graphed.from_latent.values())
    np.testing.assert_allclose(out, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_one_training_step_on_cuda(tiny_run: Path, tmp_path: Path, amp: str) -> None:
    from hpc_calo.train.job import TrainingOptions, TrainRequest, train

    opts = TrainingOptions(device="cuda", amp=amp, max_steps=2, log_every=1)
    summary = train(TrainRequest(flow=3, store=tiny_run.parent / "store.zarr", preset="tiny", out=tmp_path / "run",
                                 options=opts))
    assert summary["global_step"] == 2 and summary["stopped"]
    records = [json.loads(line) for line in (tmp_path / "run/flow3/metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["event"] == "step"]
    assert losses and all(np.isfinite(losses))


def test_sample_on_cuda_writes_the_requested_showers(tiny_run: Path, tmp_path: Path) -> None:
    from hpc_calo.io import check_file
    from hpc_calo.sample.backends import sample
    from hpc_calo.sample.job import Launch, Output, SampleRequest
    from hpc_calo.sample.plan import Request

    out = tmp_path / "gpu.h5"
    outcome = sample(SampleRequest(Request(run_dir=tiny_run, n=300, shard_size=100, batch_size=64, device="cuda"),
                                   Output(out), Launch(progress=False)))
    assert outcome is not None and outcome.generated == 3
    assert check_file(out).n == 300


def test_evaluate_classifier_on_cuda(synthetic, tmp_path: Path) -> None:
    from hpc_calo.evaluate import EvaluateRequest, evaluate

    gen, ref = synthetic("ds2", 400, 1), synthetic("ds2", 400, 2)
    report = evaluate(EvaluateRequest(gen=gen, ref=ref, dataset="ds2", out=tmp_path / "report",
                                      metrics=("cls-high",), device="cuda", epochs=2, plots=False))
    text = json.dumps(report)
    assert '"cuda"' in text and "auc" in text.lower()
