"""The vectorised spline (hpc_calo.flows.spline) equals nflows' own: values, log-determinants and gradients, alone
and inside the teacher (MAF) and student (IAF) flows, whose state_dicts are nflows'."""

from __future__ import annotations

import pytest
import torch
from nflows import transforms
from nflows.transforms.splines.rational_quadratic import unconstrained_rational_quadratic_spline

from hpc_calo.flows import build
from hpc_calo.flows.build import FlowSpec
from hpc_calo.flows.spline import parameter_major, rq_spline

pytestmark = pytest.mark.usefixtures("one_thread")

BOUND = 14.0
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
DTYPES = [torch.float32, torch.float64]


def _close(new: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, exact: torch.Tensor | None = None) -> None:
    """Equal to ``TOL`` relative to the tensor's scale (rounding of values near 0 is relative to their scale).

    With ``exact`` (a more exact value of ``ref``: nflows in float64), elements may also differ by twice nflows' own
    error |ref - exact| there: where the spline is ill-conditioned (a nearly flat bin, a steep derivative), two
    correct float32 evaluations differ by more than 1e-5 (measured: up to 1.3e-4 relative, 1 of 3600 elements).
    """
    new, ref = new.detach(), ref.detach()
    assert new.shape == ref.shape and new.dtype == ref.dtype
    allowed = TOL[dtype] * (ref.abs().max() + ref.abs())
    if exact is not None:
        allowed = allowed + 2 * (ref.double() - exact).abs().to(dtype)
    bad = (new - ref).abs() > allowed
    assert not bad.any(), f"{int(bad.sum())} elements, worst {((new - ref).abs() - allowed).max():.3g} over"


def _inputs(b: int, d: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Mostly inside [-BOUND, BOUND], some beyond it on either side, and both bounds exactly."""
    g = torch.Generator().manual_seed(seed)
    x = 6 * torch.randn(b, d, generator=g, dtype=dtype)
    x[0, 0], x[1, 0] = -BOUND, BOUND
    assert (x < -BOUND).any() and (x > BOUND).any() and (x.abs() < BOUND).float().mean() > 0.9
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_spline_equals_nflows_with_gradients(inverse: bool, dtype: torch.dtype) -> None:
    b, d, k = 400, 9, 8
    x = _inputs(b, d, dtype, seed=0)
    params = torch.randn(b, d, 3 * k - 1, generator=torch.Generator().manual_seed(1), dtype=dtype)

    def run(fn, x, params):
        xs, ps = x.clone().requires_grad_(), params.clone().requires_grad_()
        out, lad = fn(xs, ps)
        # A loss that weights every element differently, so that the gradients test every path.
        w = torch.linspace(0.5, 2, d, dtype=x.dtype)
        loss = (out.sin() * w).sum() + (lad * lad.detach().sign()).sum()
        return (out, lad, *torch.autograd.grad(loss, [xs, ps]))

    def stock(xs, ps):
        return unconstrained_rational_quadratic_spline(
            xs, ps[..., :k], ps[..., k : 2 * k], ps[..., 2 * k :], inverse=inverse, tail_bound=BOUND)

    new = run(lambda xs, ps: rq_spline(xs, parameter_major(ps.flatten(1), d), inverse, BOUND), x, params)
    ref = run(stock, x, params)
    exact = run(stock, x.double(), params.double())
    for n, r, e in zip(new, ref, exact, strict=True):
        _close(n, r, dtype, e)
    tails = x.abs() > BOUND
    assert torch.equal(new[0][tails], x[tails]) and (new[1][tails] == 0).all()  # identity in the tails


@pytest.mark.parametrize("dtype", DTYPES)
def test_spline_inverse_inverts_forward_and_negates_the_logdet(dtype: torch.dtype) -> None:
    b, d, k = 300, 7, 6
    x = _inputs(b, d, dtype, seed=2)
    raw = torch.randn(b, d, 3 * k - 1, generator=torch.Generator().manual_seed(3), dtype=dtype)
    params = parameter_major(raw.flatten(1), d)
    y, lad = rq_spline(x, params, False, BOUND)
    back, lad_inv = rq_spline(y, params, True, BOUND)
    # In float32, nflows' own round trip is off by up to ~1e-4 where a bin is nearly flat: allowed twice that.
    y_ref, _ = unconstrained_rational_quadratic_spline(
        x, raw[..., :k], raw[..., k : 2 * k], raw[..., 2 * k :], tail_bound=BOUND)
    back_ref, _ = unconstrained_rational_quadratic_spline(
        y_ref, raw[..., :k], raw[..., k : 2 * k], raw[..., 2 * k :], inverse=True, tail_bound=BOUND)
    _close(back, x, dtype, exact=back_ref.double())
    _close(lad_inv, -lad, dtype)
    out, none = rq_spline(y, params, True, BOUND, logdet=False)
    assert none is None and torch.equal(out, back)


class _StockInverse(transforms.MaskedPiecewiseRationalQuadraticAutoregressiveTransform):
    """nflows' own block in the student's direction (what InverseSplineAutoregressiveTransform was before)."""

    _elementwise_forward = build.InverseSplineAutoregressiveTransform._elementwise_forward
    _elementwise_inverse = build.InverseSplineAutoregressiveTransform._elementwise_inverse


def _pair(kind: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch):
    """The flow as built now, and the same flow with nflows' stock spline blocks, with the same weights."""
    spec = FlowSpec(features=6, context=3, hidden=16, blocks=2, bins=8, tail_bound=BOUND)
    make = build.build_maf if kind == "maf" else build.build_iaf
    torch.manual_seed(0)
    new = make(spec).to(dtype)
    with monkeypatch.context() as m:
        stock_block = transforms.MaskedPiecewiseRationalQuadraticAutoregressiveTransform
        m.setattr(build, "SplineAutoregressiveTransform", stock_block)
        m.setattr(build, "InverseSplineAutoregressiveTransform", _StockInverse)
        stock = make(spec).to(dtype)
    for flow, block in ((new, build.SplineAutoregressiveTransform), (stock, stock_block)):
        blocks = [getattr(t, "_transform", t) for t in flow._transform._transforms]
        assert sum(getattr(type(b), "_elementwise", None) is block._elementwise for b in blocks) == spec.blocks
    stock.load_state_dict(new.state_dict())  # strict: the same keys and shapes
    return spec, new, stock


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["maf", "iaf"])
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_flows_equal_nflows_stock_blocks(
    kind: str, direction: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, new, stock = _pair(kind, dtype, monkeypatch)
    x = _inputs(64, spec.features, dtype, seed=3)
    c = torch.randn(64, spec.context, generator=torch.Generator().manual_seed(4), dtype=dtype)

    def run(flow):
        flow.zero_grad()
        xs = x.clone().requires_grad_()
        t = flow._transform if direction == "forward" else flow._transform.inverse
        out, lad = t(xs, context=c)
        lp = flow.log_prob(x, context=c)
        loss = (out.sin()).sum() + lad.sum() + lp.sum()
        g_x, = torch.autograd.grad(loss, [xs], retain_graph=True)
        loss.backward()
        grads = [p.grad.clone() for p in flow.parameters()]
        return [out, lad, lp, g_x, *grads]

    new_r, ref_r = run(new), run(stock)
    assert len(new_r) == len(ref_r) == 4 + len(list(new.parameters()))
    for n, r in zip(new_r, ref_r, strict=True):
        _close(n, r, dtype)
    # One direction undoes the other.
    with torch.no_grad():
        out, _ = new._transform(x, context=c)
        back, _ = new._transform.inverse(out, context=c)
    _close(back, x, dtype)
