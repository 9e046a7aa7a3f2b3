"""Every preprocessing transform inverts its forward map, and the noise is fresh yet reproducible."""

from __future__ import annotations

import pytest
import torch

from hpc_calo import preprocess as pp
from hpc_calo.geometry import THRESHOLD_MEV, apply_threshold

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logit_round_trip(dtype: torch.dtype) -> None:
    x = torch.cat([torch.tensor([0.0, 1e-5, 0.5, 1 - 1e-5, 1.0]), torch.rand(1000)]).to(dtype)
    y = pp.logit(x)
    assert torch.isfinite(y).all()
    # the image of [0, 1] is [logit(alpha), logit(1 - alpha)], inside the flows' tail bound 14
    assert y.min() >= pp.logit(torch.tensor(0.0, dtype=dtype)) - 1e-4 and y.max() < 14
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(pp.inverse_logit(y), x, atol=tol, rtol=0)


def test_inverse_logit_clips_out_of_range_samples() -> None:
    y = torch.tensor([-50.0, 50.0])
    assert pp.inverse_logit(y).tolist() == [0.0, 1.0]


def test_normalise_round_trip_and_empty_layer() -> None:
    layer = torch.rand(6, 144, dtype=torch.float64) * 10
    layer[2] = 0.0  # an empty layer must not give NaN
    shape, total = pp.normalise(layer)
    assert torch.isfinite(shape).all()
    torch.testing.assert_close(shape.sum(-1), torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(shape[2], torch.full((144,), 1 / 144, dtype=torch.float64))
    torch.testing.assert_close(pp.denormalise(shape, total), layer)


def test_energy_encodings_round_trip() -> None:
    e_inc = torch.logspace(3, 6, 50, dtype=torch.float64)
    c = pp.encode_e_inc(e_inc)
    assert c.min() == pytest.approx(-1.5) and c.max() == pytest.approx(1.5)
    torch.testing.assert_close(pp.decode_e_inc(c), e_inc)
    e = torch.cat([torch.zeros(1), torch.logspace(-2, 4.7, 50)]).double()  # 0 .. 50 GeV
    torch.testing.assert_close(pp.decode_layer_energy(pp.encode_layer_energy(e)), e, atol=1e-6, rtol=1e-9)
    # above 65 GeV the reference encoding saturates instead of producing NaN
    assert torch.isfinite(pp.encode_layer_energy(torch.tensor([1e5]))).all()


def test_one_hot_round_trip() -> None:
    n = torch.arange(1, 45)
    oh = pp.one_hot_layer(n, torch.float32)
    assert oh.shape == (44, 44) and oh.sum().item() == 44
    assert torch.equal(pp.layer_index(oh), n)


def test_shape_encoding_decodes_to_layer_energies() -> None:
    layer = torch.rand(4, 144, dtype=torch.float64) * (torch.rand(4, 144) > 0.6)
    y = pp.encode_shape(layer, noise=False)
    energy = layer.sum(-1)
    torch.testing.assert_close(pp.decode_shape(y, energy), layer, atol=1e-9, rtol=1e-9)
    wrong = apply_threshold(pp.decode_shape(y, 1.3 * energy) * (torch.rand(4, 144) > 0.1), 0.2)
    rescaled = pp.rescale(wrong, energy)
    torch.testing.assert_close(rescaled.sum(-1), energy)  # a wrong shape keeps the layer energy
    assert torch.equal(rescaled > 0, wrong > 0)  # and its sparsity
    assert torch.equal(pp.rescale(torch.zeros(2, 144), torch.ones(2)), torch.zeros(2, 144))  # empty stays empty


def test_renormalised_decoding_cuts_before_scaling_and_keeps_a_voxel() -> None:
    thr = THRESHOLD_MEV
    energy = torch.tensor([13.0, 13.0, 13.0, 0.0], dtype=torch.float64)
    shape = torch.full((4, 144), 1e-5, dtype=torch.float64)  # every voxel at the noise level: "no voxel hit"
    shape[0, 7] = 0.98
    shape[1, 9] = 2e-5  # row 1 stays a no-hit sample: its most probable voxel takes the energy
    shape[2, :3] = torch.tensor([0.7, 0.6, 0.0012])  # fractions summing past 1: scaled down, 0.0012 * E falls under
    layer = pp.decode_shape_renormalised(pp.logit(shape), energy)
    torch.testing.assert_close(layer.sum(-1), energy)
    assert torch.all((layer == 0) | (layer >= thr))
    assert (layer[0] > 0).nonzero().flatten().tolist() == [7]  # the noise-level voxels are cut, not inflated
    assert (layer[1] > 0).nonzero().flatten().tolist() == [9]
    assert (layer[2] > 0).nonzero().flatten().tolist() == [0, 1]
    assert not layer[3].any()
    # Normalising first would have lit every voxel of the no-hit row.
    assert (apply_threshold(pp.denormalise(pp.normalise(shape)[0], energy))[1] > 0).all()


def test_noise_is_fresh_bounded_and_reproducible() -> None:
    x = torch.zeros(2000)
    a, b = pp.add_noise(x), pp.add_noise(x)
    assert not torch.equal(a, b)  # fresh every call
    assert a.min() >= 0 and a.max() < pp.NOISE_MEV and a.mean() == pytest.approx(pp.NOISE_MEV / 2, rel=0.1)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(pp.add_noise(x, g1), pp.add_noise(x, g2))
    torch.manual_seed(5)
    c = pp.add_noise(x)
    torch.manual_seed(5)
    assert torch.equal(c, pp.add_noise(x))  # the global RNG (restored on resume) drives it by default
    # after the threshold cut the noise disappears: it is far below 15.15 keV
    assert apply_threshold(a, 0.01515).abs().sum() == 0


@pytest.mark.parametrize("encoding", pp.ENERGY_ENCODINGS)
def test_flow1_encodings_invert(encoding: str) -> None:
    g = torch.Generator().manual_seed(3)
    e_inc = 1e3 * 1e3 ** torch.rand(64, generator=g, dtype=torch.float64)
    layers = torch.rand(64, 45, generator=g, dtype=torch.float64)  # no layer above the absolute 65 GeV cap
    layers = layers / layers.sum(1, keepdim=True) * e_inc[:, None] * 0.95
    layers[:5, 30:] = 0.0  # showers that end early
    layers = pp.add_noise(layers, g)
    x = pp.encode_flow1(layers, e_inc, encoding)
    assert torch.isfinite(x).all()
    back = pp.decode_flow1(x, e_inc, encoding)
    torch.testing.assert_close(back, layers, rtol=1e-6, atol=1e-9)
    assert x.shape[1] == pp.flow1_features(encoding)
    if encoding != "absolute":  # the first feature is E_tot / E_inc alone
        torch.testing.assert_close(pp.inverse_logit(x[:, 0]) * pp.E_TOT_SCALE, layers.sum(1) / e_inc)
