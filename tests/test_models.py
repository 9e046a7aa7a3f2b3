"""The flow modules: reference sizes, what they feed the flows, the loss, sampling, and the model file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hpc_calo.errors import UserError
from hpc_calo.flows.build import n_parameters
from hpc_calo.flows.presets import get_preset
from hpc_calo.geometry import DS2, DS3, Geometry
from hpc_calo.models import FlowModel, load_flow_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(("geometry", "expected"), [(DS2, 19_470_168), (DS3, 95_088_152)])
def test_reference_teachers_have_the_published_parameter_counts(geometry: Geometry, expected: int) -> None:
    total = sum(n_parameters(FlowModel.from_preset(k, geometry, geometry.name)) for k in (1, 2, 3))
    assert total == expected


def test_medium_is_small_with_the_reference_ds2_flow3() -> None:
    small, medium, ds2 = (get_preset(name) for name in ("small", "medium", "ds2"))
    assert medium.spec(3, DS2) == ds2.spec(3, DS2)  # the teacher: the same flow, the same initial weights
    for flow in (1, 2):
        assert medium.spec(flow, DS2) == small.spec(flow, DS2)
    assert (medium.energies, medium.noise_mev, medium.batch_size) == (small.energies, small.noise_mev, 500)


def test_reference_presets_refuse_the_other_dataset() -> None:
    with pytest.raises(UserError, match="ds3"):
        FlowModel.from_preset(3, DS2, "ds3")


def _raw_batch(flow: int, b: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(flow)
    v = DS2.voxels_per_layer

    def layer() -> torch.Tensor:
        return torch.rand(b, v, generator=g) * (torch.rand(b, v, generator=g) > 0.5)

    if flow == 1:
        return {"e_inc": torch.full((b,), 5e4), "layer_e": torch.rand(b, 45, generator=g) * 1e3}
    if flow == 2:
        lay = layer()
        return {"e_inc": torch.full((b,), 5e4), "e0": lay.sum(1), "layer": lay}
    prev, cur = layer(), layer()
    n = torch.randint(1, 45, (b,), generator=g)
    return {"e_inc": torch.full((b,), 5e4), "prev": prev, "cur": cur, "e_prev": prev.sum(1), "e_cur": cur.sum(1),
            "n": n}


@pytest.mark.parametrize("flow", [1, 2, 3])
def test_inputs_loss_and_sample_shapes(flow: int) -> None:
    model = FlowModel.from_preset(flow, DS2, "tiny")
    batch = _raw_batch(flow)
    x, c = model.inputs(batch)
    assert x.shape == (16, model.spec.features) and c.shape == (16, model.spec.context)
    assert torch.isfinite(x).all() and torch.isfinite(c).all()
    x2, _ = model.inputs(batch)
    assert not torch.equal(x, x2)  # fresh dequantisation noise on every call
    loss = model(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    torch.testing.assert_close(loss, -model.log_prob(*model.inputs(batch, torch.Generator().manual_seed(0))).mean(),
                               rtol=0.05, atol=0)
    s1 = model.sample(c[:3], torch.Generator().manual_seed(1))
    s2 = model.sample(c[:3], torch.Generator().manual_seed(1))
    assert s1.shape == (3, model.spec.features) and torch.equal(s1, s2)


def test_flow3_context_layout() -> None:
    model = FlowModel.from_preset(3, DS2, "tiny")
    batch = _raw_batch(3, 4)
    _, c = model.inputs(batch)
    v = DS2.voxels_per_layer
    # [enc E_inc, enc E_n, enc E_{n-1}, V logit voxels of layer n-1, one-hot(n - 1) over 44]
    torch.testing.assert_close(c[:, 0], torch.log10(batch["e_inc"]) - 4.5)
    assert torch.equal(c[:, 3 + v :].argmax(1) + 1, batch["n"])
    assert torch.equal(c[:, 3 + v :].sum(1), torch.ones(4))


def test_student_is_an_iaf_with_one_pass_sampling() -> None:
    student = FlowModel.from_preset(2, DS2, "tiny", student=True)
    assert student.student and torch.isfinite(student(_raw_batch(2)))
    assert student.sample(torch.zeros(5, 2)).shape == (5, DS2.voxels_per_layer)


def test_model_file_round_trip(tmp_path: Path) -> None:
    model = FlowModel.from_preset(2, DS2, "tiny")
    path = tmp_path / "best.pt"
    model.save(path)
    back = load_flow_model(path, "cpu", torch.float64, dataset="ds2", flow=2)
    assert back.dtype == torch.float64 and back.meta() == model.meta() and not back.training
    for (k, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a.double(), b), k


def test_model_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "best.pt"
    FlowModel.from_preset(1, DS2, "tiny").save(path)
    with pytest.raises(UserError, match="for ds2, not ds3"):
        load_flow_model(path, dataset="ds3")
    with pytest.raises(UserError, match="flow-1, not flow-3"):
        load_flow_model(path, flow=3)
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match="corrupt"):
        load_flow_model(bad)
    with pytest.raises(UserError, match="no such model file"):
        load_flow_model(tmp_path / "missing.pt")
    torch.save({"something": 1}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="not an hpc-calo flow model"):
        load_flow_model(tmp_path / "foreign.pt")


def test_noise_width_is_the_models_own_and_kept_in_its_file(tmp_path: Path) -> None:
    """What ``--noise-kev`` sets: the width of the noise on the zero voxels the flow sees, in the file, and absent
    from the file at the default (files made before the choice existed still match their checkpoints)."""
    v = DS2.voxels_per_layer
    layer = torch.zeros(64, v)
    layer[:, 0] = 1.0  # one 1 MeV voxel; the other 143 are zero and carry only the noise
    batch = {"e_inc": torch.full((64,), 5e4), "e0": layer.sum(1), "layer": layer}
    for width in (5e-3, 5e-4):
        model = FlowModel.from_preset(2, DS2, "tiny", noise_mev=width)
        x, _ = model.inputs(batch, torch.Generator().manual_seed(0))
        shape = (torch.sigmoid(x.double()) - 1e-6) / (1 - 2e-6)
        noise = shape[:, 1:] / shape[:, :1]  # back to MeV: voxel 0 holds 1 MeV (plus noise below 0.5 %)
        assert noise.max() < 1.01 * width and noise.max() > 0.9 * width, (width, noise.max())
        path = tmp_path / f"{width}.pt"
        model.save(path)
        back = load_flow_model(path)
        assert back.noise_mev == width and back.meta() == model.meta()
        assert ("noise_mev" in model.meta()) == (width != 5e-3)
    with pytest.raises(UserError, match="noise width must be positive"):
        FlowModel.from_preset(2, DS2, "tiny", noise_mev=0.0)
