"""Probability Density Distillation: the block-by-block pass, the loss, a real distillation, the loop and CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from hpc_calo import rundir
from hpc_calo.distill import DistillModel, PDDConfig, pass_loss
from hpc_calo.errors import UserError
from hpc_calo.flows import FlowSpec, build_iaf, build_maf, one_pass
from hpc_calo.geometry import DS2, Geometry
from hpc_calo.models import FlowModel, load_flow_model
from hpc_calo.train.config import TrainConfig
from hpc_calo.train.loop import fit

# A real Geometry with 8 voxels per layer keeps the flows (and the teacher's 8-pass sampling) cheap.
SMALL = Geometry("ds2", n_alpha=2, n_r=4)
V = SMALL.voxels_per_layer


pytestmark = pytest.mark.usefixtures("one_thread")


def raw_batch(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Flow-2 loader batch (MeV): a falling profile with log-normal voxel fluctuations."""
    e_inc = 10 ** (3 + 3 * torch.rand(n, generator=g))
    profile = torch.exp(-torch.arange(V) / 3.0)
    layer = profile * torch.exp(0.5 * torch.randn(n, V, generator=g)) * e_inc[:, None] / 1e4
    return {"e_inc": e_inc, "e0": layer.sum(1), "layer": layer}


def test_manual_pass_equals_nflows() -> None:
    spec = FlowSpec(features=10, context=3, hidden=16, layers=2, blocks=4, bins=4)
    torch.manual_seed(0)
    teacher, student = build_maf(spec).double(), build_iaf(spec).double()
    x, c = torch.randn(40, 10, dtype=torch.float64), torch.randn(40, 3, dtype=torch.float64)
    with torch.no_grad():
        t = one_pass(teacher, x, c)
        z, ld = teacher._transform(x, c)
        assert torch.equal(t.outputs, z) and torch.equal(t.logabsdet, ld)
        s = one_pass(student, x, c)
        xs, lds = student._transform.inverse(x, c)
        assert torch.equal(s.outputs, xs) and torch.equal(s.logabsdet, lds)
        # The student's density direction undoes its one pass: it is an invertible IAF.
        back, ld_back = student._transform(xs, c)
        assert (back - x).abs().max() < 1e-10 and (ld_back + lds).abs().max() < 1e-10
    # 8 transforms (4 MADE + 4 permutations): input + 8 steps; one MADE output per block.
    assert len(t.steps) == 9 and len(t.params) == 4 and t.params[0].shape == (40, 10 * (3 * 4 - 1))


def test_a_student_copied_from_the_inverse_has_zero_loss() -> None:
    """Sanity of the matching order: the exact inverse of a one-block teacher scores ~0 on every term."""
    spec = FlowSpec(features=1, context=2, hidden=8, blocks=1, bins=4)  # 1-D: the MADE sees only the context
    torch.manual_seed(0)
    teacher = FlowModel(2, SMALL, spec).double()
    student = FlowModel(2, SMALL, spec, student=True).double()
    # In one dimension the student's MADE is a function of the context alone, as the teacher's: copy it.
    made = teacher.flow._transform._transforms[0].state_dict()
    student.flow._transform._transforms[0]._transform.load_state_dict(made)
    model = DistillModel(teacher, student).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, generator=g, dtype=torch.float64)
    c = torch.randn(64, 2, generator=g, dtype=torch.float64)
    t = one_pass(teacher.flow, x, c)
    s = one_pass(student.flow, t.outputs, c)
    assert float(pass_loss(t, s, x, model.cfg).detach()) < 1e-18
    z = torch.randn(64, 1, generator=g, dtype=torch.float64)
    s = one_pass(student.flow, z, c)
    t = one_pass(teacher.flow, s.outputs, c)
    assert float(pass_loss(s, t, z, model.cfg).detach()) < 1e-18
    log_q = student.flow._distribution.log_prob(z) - s.logabsdet
    log_p = teacher.flow._distribution.log_prob(t.outputs) + t.logabsdet
    kl = log_q - log_p
    assert kl.abs().max() < 1e-10


def test_only_the_student_trains_and_gradients_flow_through_the_teacher() -> None:
    spec = FlowSpec(features=V, context=2, hidden=8, blocks=2, bins=4)
    torch.manual_seed(0)
    teacher, student = FlowModel(2, SMALL, spec), FlowModel(2, SMALL, spec, student=True)
    model = DistillModel(teacher, student)
    names = [n for n, _ in model.named_parameters()]
    assert names and all(n.startswith("student.") for n in names)
    assert all(k.startswith("student.") for k in model.state_dict())
    assert not any(p.requires_grad for p in teacher.parameters())
    g = torch.Generator().manual_seed(0)
    batch = raw_batch(32, g)
    # z-pass alone (beta 0): its gradient reaches the student only through the teacher's x -> z map.
    model_z = DistillModel(teacher, student, PDDConfig(beta=0.0, match_steps=False, match_params=False))
    model_z.train()
    model_z(batch).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert any(p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    model.train()
    assert not teacher.training  # frozen teacher stays in eval mode
    model.double()
    assert teacher.dtype == torch.float64 and student.dtype == torch.float64  # .to() moves the hidden teacher
    model.eval()
    kl = model(batch)
    assert kl.ndim == 0 and set(model.metrics) == {"kl", "x_loss", "z_loss", "loss"}
    assert torch.equal(kl, model.metrics["kl"])


def test_distilled_student_reproduces_a_tiny_teacher() -> None:
    spec = FlowSpec(features=V, context=2, hidden=32, blocks=2, bins=8)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    teacher = FlowModel(2, SMALL, spec)
    opt = torch.optim.Adam(teacher.parameters(), 3e-3)
    for _ in range(150):
        loss = teacher(raw_batch(256, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    student = FlowModel(2, SMALL, spec, student=True)
    model = DistillModel(teacher, student)
    val = raw_batch(4000, torch.Generator().manual_seed(99))
    model.eval()
    with torch.random.fork_rng():
        torch.manual_seed(5)
        kl_before = float(model(val))
    steps = 300
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 5e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 5e-3, total_steps=steps)
    model.train()
    for _ in range(steps):
        loss = model(raw_batch(256, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(5)
        kl = float(model(val))
        x, c = teacher.inputs(val)
        # x-reconstruction: data -> teacher -> student -> data.
        xs = one_pass(student.flow, one_pass(teacher.flow, x, c).outputs, c).outputs
        x_rms = float((xs - x).pow(2).mean().sqrt())
        # z-reconstruction: noise -> student -> teacher -> noise.
        z = torch.randn_like(x)
        gen_s = one_pass(student.flow, z, c).outputs
        z_rms = float((one_pass(teacher.flow, gen_s, c).outputs - z).pow(2).mean().sqrt())
        gen_t = teacher.sample(c, torch.Generator().manual_seed(3))
    assert kl_before > 20 and 0 <= kl < 1.5 and kl < kl_before / 20, (kl_before, kl)
    assert x_rms < 0.3 * float(x.std()), x_rms
    assert z_rms < 0.5, z_rms
    # Generated histograms: per-voxel separation power of student vs teacher samples (same contexts).
    for d in range(V):
        lo, hi = float(gen_t[:, d].quantile(0.005)), float(gen_t[:, d].quantile(0.995))
        h_t = torch.histc(gen_t[:, d], 30, lo, hi)
        h_s = torch.histc(gen_s[:, d], 30, lo, hi)
        h_t, h_s = h_t / h_t.sum(), h_s / h_s.sum()
        sep = 0.5 * float(((h_t - h_s) ** 2 / (h_t + h_s).clamp_min(1e-12)).sum())
        assert sep < 0.03, (d, sep)


def test_distillation_runs_in_the_training_loop(tmp_path: Path) -> None:
    """fit() moves, trains, validates by KL, checkpoints the student only, and writes a loadable best.pt."""
    spec = FlowSpec(features=V, context=2, hidden=16, blocks=2, bins=4)
    torch.manual_seed(0)
    teacher, student = FlowModel(2, SMALL, spec), FlowModel(2, SMALL, spec, student=True)
    g = torch.Generator().manual_seed(0)
    train, val = [raw_batch(64, g) for _ in range(6)], [raw_batch(200, g)]
    cfg = TrainConfig(epochs=3, batch_size=64, max_lr=3e-3, log_every=2, dtype="float64")
    model = DistillModel(teacher, student)
    out = rundir.flow_dir(tmp_path, 2, student=True)
    summary = fit(model, train, val, cfg, out)
    assert summary["global_step"] == 18 and summary["skipped_steps"] == 0
    epochs = [json.loads(line) for line in rundir.metrics_in(out).read_text().splitlines()]
    vals = [r["val_loss"] for r in epochs if r.get("event") == "epoch"]
    assert len(vals) == 3 and min(vals) == summary["best_val"]  # the validation loss is the KL estimate
    best = load_flow_model(rundir.weights_in(out), dtype=torch.float64, flow=2)
    assert best.student
    ck = torch.load(rundir.checkpoint_in(out), weights_only=True)
    assert all(k.startswith("student.") for k in ck["model"]) and ck["meta"]["kind"] == "distill"


def test_distill_cli_writes_a_student_the_chain_uses(tiny_run: Path, tmp_path: Path) -> None:
    from hpc_calo.distill.__main__ import main
    from hpc_calo.generate import Chain

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert main(["--run", str(run), "--flow", "2", "--epochs", "1", "--log-every", "1000"]) == 0
    assert rundir.weights(run, 2, student=True).is_file()
    quality = json.loads(rundir.diagnostics_in(rundir.flow_dir(run, 2, student=True)).read_text())
    assert quality["samples"] > 0 and 0.0 <= quality["student_vs_teacher_auc"] <= 1.0
    assert quality["teacher_loglik_teacher_samples"] is not None
    # The same command again: the distillation is found finished and its score, of the same weights, reported
    # from the record rather than sampled again.
    recorded = rundir.diagnostics_in(rundir.flow_dir(run, 2, student=True)).stat().st_mtime_ns
    assert main(["--run", str(run), "--flow", "2", "--epochs", "1", "--log-every", "1000"]) == 0
    assert rundir.diagnostics_in(rundir.flow_dir(run, 2, student=True)).stat().st_mtime_ns == recorded
    # Re-running resumes the finished distillation (its checkpoint is a distillation's, not a bare flow's).
    assert main(["--run", str(run), "--flow", "2", "--epochs", "1", "--diagnostic-samples", "0"]) == 0
    chain = Chain.load(run, fast=False)
    assert chain.students[1] is False and chain.students[2] is True
    a = chain.sample([5e3, 5e4, 5e5], seed=1)
    b = Chain.load(run).sample([5e3, 5e4, 5e5], seed=1)  # the default: the fast student sampler
    assert a.shape == (3, chain.geometry.n_voxels) and abs(a - b).max() < 1e-2 * max(1.0, abs(a).max())
    # A teacher laid out otherwise than the run preset's student (a model file copied in from another run): refused
    # before anything is written, not an index error in the middle of the loss.
    student_dir = rundir.flow_dir(run, 3, student=True)
    before = sorted(p.name for p in student_dir.iterdir())
    FlowModel.from_preset(3, DS2, "small").save(rundir.weights(run, 3))
    with pytest.raises(UserError, match=r"not laid out as the student of preset 'tiny' \(blocks 4 against 2"):
        main(["--run", str(run), "--flow", "3", "--epochs", "1"])
    assert sorted(p.name for p in student_dir.iterdir()) == before
    rundir.weights(run, 3).unlink()
    with pytest.raises(UserError, match="no trained flow-3 teacher"):
        main(["--run", str(run), "--flow", "3", "--epochs", "1"])


def test_the_quality_auc_takes_a_validation_set_of_ten_rows() -> None:
    """A quick run's 10 validation showers: the boosted trees train without early stopping (and, with fewer rows
    than a leaf's minimum, score 0.5: no separation, rather than an error at the end of a distillation)."""
    import numpy as np

    from hpc_calo.distill.diagnose import _auc

    rng = np.random.default_rng(0)
    auc = _auc(rng.normal(size=(10, 4)), rng.normal(size=(10, 4)) + 3.0, seed=0)
    assert auc == 0.5


def test_the_quality_auc_of_a_student_that_copies_its_teacher_is_one_half() -> None:
    """Student and teacher samples come in twins (the same noise and context). With a twin in each half the
    classifier recognises a training row's twin and scores far below 0.5 (0.2-0.35 on these rows)."""
    import numpy as np

    from hpc_calo.distill.diagnose import _auc

    rng = np.random.default_rng(1)
    teacher = rng.standard_t(3, size=(2000, 40))
    assert abs(_auc(teacher + 0.01 * rng.normal(size=teacher.shape), teacher, seed=0) - 0.5) < 0.05
    assert _auc(teacher + 1.0, teacher, seed=0) > 0.9  # and a student that is off is still seen
