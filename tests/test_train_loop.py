"""The one training loop on a real pair store made from a real synthetic file: learning, exact resume, CLI errors."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from data_prep.convert import main as convert_main
from hpc_calo import rundir
from hpc_calo.data.store import ShardedLoader, open_store
from hpc_calo.errors import run_cli
from hpc_calo.geometry import DS2
from hpc_calo.models import FlowModel, load_flow_model
from hpc_calo.train import TrainConfig, fit
from hpc_calo.train.__main__ import main as train_main
from hpc_calo.train.checkpoint import load_checkpoint, save_checkpoint
from hpc_calo.train.loop import finished

KINDS = {1: "energies", 2: "layer0", 3: "pairs"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(synthetic: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("train") / "ds2.zarr"
    assert convert_main(["--dataset", "ds2", str(synthetic("ds2", 1500)), "--out", str(out), "--quiet"]) == 0
    return out


def loaders(store: Path, flow: int, batch: int = 256, shards: int = 1) -> tuple[ShardedLoader, ShardedLoader]:
    """Rank 0 of ``shards`` pretend ranks: a smaller real slice of the store for the flow-3 tests."""
    s = open_store(store)
    return (ShardedLoader(s, "train", KINDS[flow], batch, 0, shards, 1.0, seed=0),
            ShardedLoader(s, "val", KINDS[flow], batch, 0, shards, 0.5, seed=0))


def model(flow: int, dtype: torch.dtype = torch.float32) -> FlowModel:
    torch.manual_seed(0)
    return FlowModel.from_preset(flow, DS2, "tiny").to(dtype)


def epochs(out: Path) -> list[dict]:
    lines = [json.loads(x) for x in rundir.metrics_in(out).read_text().splitlines()]
    return [x for x in lines if x["event"] == "epoch"]


@pytest.mark.parametrize(("flow", "n_epochs", "shards"), [(1, 4, 1), (2, 3, 1), (3, 2, 6)])
def test_likelihood_is_finite_and_improves(store: Path, tmp_path: Path, flow: int, n_epochs: int, shards: int) -> None:
    cfg = TrainConfig(epochs=n_epochs, batch_size=256, max_lr=3e-3, log_every=5, name=f"flow-{flow}")
    reports: list[dict] = []
    result = fit(model(flow), *loaders(store, flow, shards=shards), cfg, tmp_path, report=reports.append)
    ep = epochs(tmp_path)
    vals = [e["val_loss"] for e in ep]
    assert len(ep) == n_epochs and [r["epoch"] for r in reports] == list(range(1, n_epochs + 1))
    assert all(torch.isfinite(torch.tensor(vals)))
    assert vals[-1] < vals[0] - 1.0  # validation NLL (nats) goes down
    assert result["best_val"] == min(vals) and result["skipped_steps"] == 0 and not result["stopped"]
    best = load_flow_model(rundir.weights_in(tmp_path), dataset="ds2", flow=flow)
    assert best.preset == "tiny"


def _run(store: Path, out: Path, max_steps: int | None) -> dict:
    cfg = TrainConfig(epochs=2, batch_size=256, max_lr=3e-3, checkpoint_every=4, log_every=100, max_steps=max_steps)
    return fit(model(2), *loaders(store, 2), cfg, out)


def test_resume_is_bit_identical(store: Path, tmp_path: Path) -> None:
    reference = tmp_path / "uninterrupted"
    assert _run(store, reference, None)["global_step"] == 12  # 6 steps per epoch (1350 showers / 256)
    final = torch.load(rundir.checkpoint_in(reference), weights_only=True)["model"]
    for kill_at, resume_at in ((5, 4), (7, 6)):  # mid-epoch checkpoint at 4; epoch-end checkpoint at 6
        out = tmp_path / f"killed_{kill_at}"
        stopped = _run(store, out, kill_at)
        assert stopped["stopped"] and stopped["global_step"] == kill_at
        assert load_checkpoint(rundir.checkpoint_in(out))["global_step"] == resume_at
        resumed = _run(store, out, None)  # fresh model, fresh loaders: as after a restart
        assert resumed["global_step"] == 12 and not resumed["stopped"]
        weights = torch.load(rundir.checkpoint_in(out), weights_only=True)["model"]
        for k, w in final.items():
            assert torch.equal(w, weights[k]), f"{k} differs after a kill at step {kill_at}"
        assert resumed["best_val"] == torch.load(rundir.checkpoint_in(reference), weights_only=True)["best_val"]


def test_float64_training(store: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=1, batch_size=256, max_lr=3e-3, dtype="float64")
    m = model(1, torch.float64)
    result = fit(m, *loaders(store, 1), cfg, tmp_path)
    assert torch.isfinite(torch.tensor(result["best_val"]))
    assert load_flow_model(rundir.weights_in(tmp_path), dtype=torch.float64).dtype == torch.float64
    start = json.loads(rundir.metrics_in(tmp_path).read_text().splitlines()[0])
    assert start == {"event": "start", "step": 0, "torch_threads": 1}  # the one CPU the test owns (one_thread)


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_main, argv)
    return int(exit_info.value.code), capsys.readouterr().err


def test_cli_trains_and_refuses_bad_input(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    base = ["--store", str(store), "--out", str(run), "--epochs", "1", "--threads", "1"]
    code, _ = _cli(["--flow", "1", "--preset", "tiny", *base], capsys)
    assert code == 0
    record = rundir.read_run(run)
    assert record["dataset"] == "ds2" and record["preset"] == "tiny"
    assert 1e3 <= record["energy_range"][0] < record["energy_range"][1] <= 1e6
    flow1 = rundir.flow_dir(run, 1)
    written = (rundir.weights_in(flow1), rundir.checkpoint_in(flow1), rundir.metrics_in(flow1), rundir.config_in(flow1))
    assert all(p.is_file() for p in written)

    def refused(argv: list[str], match: str) -> None:
        code, err = _cli(argv, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and match in lines[0], err

    refused(["--flow", "1", "--preset", "tiny", *base[:1], str(tmp_path / "nope.zarr"), *base[2:]], "no such store")
    incomplete = tmp_path / "incomplete.zarr"
    shutil.copytree(store, incomplete)
    meta = json.loads((incomplete / "zarr.json").read_text())
    meta["attributes"]["complete"] = False
    (incomplete / "zarr.json").write_text(json.dumps(meta))
    refused(["--flow", "1", "--preset", "tiny", "--store", str(incomplete), *base[2:]], "incomplete store")
    refused(["--flow", "1", "--preset", "ds3", *base], "preset 'ds3' is for ds3")
    refused(["--flow", "1", "--preset", "small", *base], "not 'small'")  # run folder of another preset
    rundir.flow_dir(run, 2).mkdir()
    shutil.copy(rundir.checkpoint_in(flow1), rundir.checkpoint_in(rundir.flow_dir(run, 2)))
    refused(["--flow", "2", "--preset", "tiny", *base], "checkpoint has flow=1")
    rundir.checkpoint_in(rundir.flow_dir(run, 2)).write_bytes(b"garbage")
    refused(["--flow", "2", "--preset", "tiny", *base], "corrupt")


def test_noise_width_flag_reaches_the_model_file_resume_and_student(store: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from hpc_calo.distill.__main__ import main as distill_main

    run = tmp_path / "run"
    base = ["--flow", "2", "--preset", "tiny", "--store", str(store), "--out", str(run), "--steps", "2",
            "--threads", "1", "--noise-kev", "0.5"]
    assert _cli(base, capsys)[0] == 0
    assert load_flow_model(rundir.weights(run, 2)).noise_mev == 5e-4
    code, err = _cli([*base[:-1], "5", "--steps", "3"], capsys)  # resuming with another noise: another model
    assert code == 2 and "trained with 0.5 keV" in err and "asks for 5 keV" in err and "--noise-kev 0.5" in err, err
    code, err = _cli([*base[:-2], "--steps", "3"], capsys)  # the default width (absent from the file) is another
    assert code == 2 and "asks for 5 keV" in err, err
    assert distill_main(["--run", str(run), "--flow", "2", "--steps", "1", "--diagnostic-samples", "0",
                         "--threads", "1"]) == 0
    assert load_flow_model(rundir.weights(run, 2, student=True)).noise_mev == 5e-4  # the teacher's


def test_flow3_learns_nonempty_targets_and_an_older_run_resumes_on_every_pair(
        store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train, _ = loaders(store, 3)
    batch = next(iter(train))
    empty = batch["e_cur"] == 0
    assert empty.any() and not empty.all()  # the synthetic showers end before layer 44
    m = model(3)
    assert m.nonempty_targets and torch.equal(m.select(batch)["cur"], batch["cur"][~empty])
    assert not model(2).nonempty_targets and model(2).select(batch) is batch
    assert load_flow_model(_saved(m, tmp_path)).nonempty_targets  # kept in the model file

    run = tmp_path / "run"
    base = ["--flow", "3", "--preset", "tiny", "--store", str(store), "--out", str(run), "--threads", "1"]
    assert _cli([*base, "--steps", "2"], capsys)[0] == 0
    ckpt = rundir.checkpoint_in(rundir.flow_dir(run, 3, False))
    state = load_checkpoint(ckpt)
    assert state["meta"]["targets"] == "nonempty"
    del state["meta"]["targets"]  # a checkpoint from before the choice: it trained on every pair
    save_checkpoint(ckpt, state)
    code, err = _cli([*base, "--steps", "3"], capsys)
    assert code == 0, err  # extended, not refused
    assert "targets" not in load_checkpoint(ckpt)["meta"]
    assert not load_flow_model(rundir.weights(run, 3)).nonempty_targets


def _saved(m: FlowModel, tmp_path: Path) -> Path:
    path = tmp_path / "flow3.pt"
    m.save(path)
    return path


def test_step_budget_and_extending_a_finished_run(store: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A steps budget ends mid-epoch; re-running with a larger budget continues the same run instead of refusing."""
    def run(**budget: float) -> dict:
        cfg = TrainConfig(**{"epochs": 1, **budget}, batch_size=256, max_lr=3e-3, log_every=100)
        return fit(model(2), *loaders(store, 2), cfg, tmp_path)

    def done(**budget: float) -> dict | None:  # what a job asks before it loads data or starts workers
        return finished(TrainConfig(**{"epochs": 1, **budget}, batch_size=256), tmp_path)

    assert done(steps=9) is None  # no checkpoint yet
    first = run(steps=9)  # 6 steps per epoch: one full epoch and a partial one
    assert first["global_step"] == 9 and first["epochs"] == 2 and not first["stopped"]
    assert len(epochs(tmp_path)) == 2
    assert run(steps=9)["global_step"] == 9  # the same budget again: already done, nothing trained
    told = done(steps=9)
    assert told is not None and {k: told[k] for k in ("global_step", "epochs", "best_val", "stopped")} == {
        k: first[k] for k in ("global_step", "epochs", "best_val", "stopped")}
    assert done(steps=16) is None  # a larger budget: work left
    capsys.readouterr()
    extended = run(steps=16)
    assert extended["global_step"] == 16
    # the 7 steps left run as 2 more epochs (the budget of 9 closed the second one early): "epoch 4/4", not 4/3
    assert re.findall(r"epoch (\d+)/(\d+) train", capsys.readouterr().err) == [("3", "4"), ("4", "4")]
    ck = load_checkpoint(rundir.checkpoint_in(tmp_path))
    assert ck["total_steps"] == 16 and ck["budget"]["steps"] == 16
    assert ck["scheduler"]["total_steps"] == 16 and ck["scheduler"]["last_epoch"] == 16
    assert run(epochs=3)["global_step"] == 18  # a budget in another unit extends the same way


def test_core_seconds_count_each_invocation_at_its_own_threads(store: Path, tmp_path: Path) -> None:
    def run(steps: int, threads: int) -> dict:
        cfg = TrainConfig(epochs=1, steps=steps, batch_size=256, max_lr=3e-3, log_every=100, num_threads=threads)
        fit(model(2), *loaders(store, 2), cfg, tmp_path)
        return load_checkpoint(rundir.checkpoint_in(tmp_path))

    first = run(3, 1)
    assert first["core_s"] == pytest.approx(first["train_s"], abs=1e-3)
    second = run(6, 2)  # resumed on two threads: its seconds count twice
    assert second["core_s"] == pytest.approx(first["core_s"] + 2 * (second["train_s"] - first["train_s"]), abs=1e-3)
    # CPU seconds used, kept beside the allocated ones: they add up over invocations too
    assert 0 < first["cpu_s"] < second["cpu_s"]


def test_minutes_budget_becomes_a_fixed_step_budget(store: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=1, batch_size=256, max_lr=3e-3, log_every=100, minutes=0.05)
    result = fit(model(1), *loaders(store, 1), cfg, tmp_path)
    ck = load_checkpoint(rundir.checkpoint_in(tmp_path))
    assert ck["timed"] and ck["total_steps"] == result["global_step"] >= 20  # timed after its first 20 steps
    assert 0 < result["train_s"] < 60
    again = fit(model(1), *loaders(store, 1), cfg, tmp_path)  # same budget: the recorded plan is kept
    assert again["global_step"] == result["global_step"]


def test_quickstart_preset_models_energy_shares() -> None:
    from hpc_calo.flows.presets import get_preset

    p = get_preset("quickstart")
    assert p.energies == "shares"
    # Flow-3 and its student train for less than an epoch: a step budget, which a budget of the request replaces.
    from hpc_calo.train.job import TrainingOptions, train_config

    assert p.default_steps(3) and p.default_steps(3, student=True)
    for student in (False, True):
        assert train_config(TrainingOptions(), p, 3, "f", student).steps == p.default_steps(3, student)
        own = train_config(TrainingOptions(epochs=2), p, 3, "f", student)
        assert (own.epochs, own.steps) == (2, None)
    assert train_config(TrainingOptions(), p, 1, "f").steps is None
    m = FlowModel.from_preset(1, DS2, "quickstart")
    assert m.meta()["energies"] == "shares" and m.spec.features == 46  # the total, then a share per layer


def test_a_shares_flow1_resumes(store: Path, tmp_path: Path) -> None:
    """The checkpoint of a flow-1 with the `shares` encoding (46 features) is recognised as the same model on
    resume."""
    from hpc_calo.train.__main__ import main as train

    args = ["--flow", "1", "--store", str(store), "--preset", "quickstart", "--out", str(tmp_path / "r"),
            "--epochs", "2", "--log-every", "1000", "--threads", "1"]
    train([*args, "--max-steps", "2", "--checkpoint-every", "1"])
    assert rundir.checkpoint_in(tmp_path / "r" / "flow1").exists()
    assert train(args) in (0, None)
    assert rundir.weights(tmp_path / "r", 1).exists()
