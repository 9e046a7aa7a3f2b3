"""The fast samplers equal the plain nflows path (float64 to ~1e-12, float32 to ~1e-4)."""

from __future__ import annotations

import pytest
import torch

from hpc_calo.flows.build import FlowSpec, build_iaf, build_maf
from hpc_calo.flows.fast import FastMAF, FastStudent
from hpc_calo.flows.presets import PRESETS
from hpc_calo.flows.spline import rq_spline_sample
from hpc_calo.geometry import DS2

pytestmark = pytest.mark.usefixtures("one_thread")


def _student(spec: FlowSpec, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_iaf(spec).to(dtype).eval()


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 2e-4)]
)
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("features", [24, 23])  # 4 block-triangular GEMM groups; a prime count: one dense GEMM
def test_fast_student_equals_nflows(dtype: torch.dtype, tol: float, layers: int, features: int) -> None:
    spec = FlowSpec(features=features, context=5, hidden=32, layers=layers, blocks=4, bins=8)
    flow = _student(spec, dtype)
    g = torch.Generator().manual_seed(1)
    # Scale 4 puts ~1 % of the inputs beyond the tail bound 14, exercising the linear tails too.
    z = 4 * torch.randn(3000, spec.features, generator=g, dtype=dtype)
    c = torch.randn(3000, spec.context, generator=g, dtype=dtype)
    assert (z.abs() > spec.tail_bound).any()
    with torch.no_grad():
        ref, _ = flow._transform.inverse(z, c)
        out = FastStudent(flow)(z, c)
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.allclose(out, ref, atol=tol, rtol=tol), (out - ref).abs().max()


def test_fast_student_in_cpu_chunks_equals_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    from hpc_calo.flows import fast

    spec = FlowSpec(features=24, context=5, hidden=32, blocks=2, bins=8)
    flow = _student(spec, torch.float64)
    z, c = torch.randn(100, 24, dtype=torch.float64), torch.randn(100, 5, dtype=torch.float64)
    with torch.no_grad():
        whole = FastStudent(flow)(z, c)
        monkeypatch.setattr(fast, "CPU_CHUNK_BYTES", 1)  # 16-row chunks, the last one short
        chunked = FastStudent(flow)(z, c)
    assert torch.allclose(chunked, whole, atol=1e-12, rtol=0)


def test_fast_student_at_the_ds2_flow3_reference_size() -> None:
    spec = PRESETS["ds2"].spec(3, DS2, student=True)
    flow = _student(spec, torch.float64)
    z = torch.randn(64, spec.features, dtype=torch.float64)
    c = torch.randn(64, spec.context, dtype=torch.float64)
    with torch.no_grad():
        ref, _ = flow._transform.inverse(z, c)
        out = FastStudent(flow)(z, c)
    assert (out - ref).abs().max() < 1e-10


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 2e-4)])
@pytest.mark.parametrize(("hidden", "layers"), [(32, 1), (7, 2)])  # 7 < 11 features: some degrees have no unit
def test_fast_maf_equals_nflows_sampling(dtype: torch.dtype, tol: float, hidden: int, layers: int) -> None:
    spec = FlowSpec(features=11, context=3, hidden=hidden, layers=layers, blocks=3, bins=6)
    torch.manual_seed(2)
    flow = build_maf(spec).to(dtype).eval()
    g = torch.Generator().manual_seed(3)
    z = 4 * torch.randn(500, spec.features, generator=g, dtype=dtype)  # some beyond the tail bound
    c = torch.randn(500, spec.context, generator=g, dtype=dtype)
    with torch.no_grad():
        ref, _ = flow._transform.inverse(z, c)
        out = FastMAF(flow)(z, c)
        back, _ = flow._transform(out, c)  # and it is the inverse of the teacher's density direction
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.allclose(out, ref, atol=tol, rtol=tol), (out - ref).abs().max()
    assert torch.allclose(back, z, atol=10 * tol, rtol=10 * tol)


def test_fast_maf_at_the_ds2_flow1_reference_size_and_refuses_a_student() -> None:
    spec = PRESETS["ds2"].spec(1, DS2)
    torch.manual_seed(0)
    flow = build_maf(spec).double().eval()
    z, c = torch.randn(32, spec.features, dtype=torch.float64), torch.randn(32, spec.context, dtype=torch.float64)
    with torch.no_grad():
        ref, _ = flow._transform.inverse(z, c)
        assert (FastMAF(flow)(z, c) - ref).abs().max() < 1e-10
    with pytest.raises(TypeError, match="teacher"):
        FastMAF(build_iaf(FlowSpec(features=6, context=2, hidden=8, blocks=2, bins=4)))


def test_spline_inverse_inverts_the_nflows_forward_spline() -> None:
    """The spline alone: nflows' forward spline, then ours, gives the input back (inside and in the tails)."""
    from nflows.transforms.splines.rational_quadratic import unconstrained_rational_quadratic_spline

    g = torch.Generator().manual_seed(0)
    b, d, k = 500, 7, 8
    x = 6 * torch.randn(b, d, generator=g, dtype=torch.float64)
    params = torch.randn(b, d, 3 * k - 1, generator=g, dtype=torch.float64)
    y, _ = unconstrained_rational_quadratic_spline(
        x, params[..., :k], params[..., k : 2 * k], params[..., 2 * k :], tails="linear", tail_bound=14.0
    )
    back = rq_spline_sample(y, params.permute(2, 0, 1), 14.0, 1e-3, 1e-3, 1e-3)
    assert (back - x).abs().max() < 1e-9


def test_bf16_gemms_stay_close_in_float32() -> None:
    spec = FlowSpec(features=24, context=5, hidden=32, blocks=4, bins=8)
    flow = _student(spec, torch.float32)
    z, c = torch.randn(500, 24), torch.randn(500, 5)
    with torch.no_grad():
        ref = FastStudent(flow)(z, c)
        out = FastStudent(flow, matmul_dtype=torch.bfloat16)(z, c)
    assert out.dtype == torch.float32
    err = (out - ref).abs()
    assert err.mean() < 0.02 and err.max() < 0.5


def test_fast_student_refuses_a_teacher() -> None:
    with pytest.raises(TypeError, match="student"):
        FastStudent(build_maf(FlowSpec(features=6, context=2, hidden=8, blocks=2, bins=4)))


@pytest.mark.integration  # Inductor compiles C++: ~20-50 s on the 2-core box
def test_compiled_spline_equals_eager() -> None:
    spec = FlowSpec(features=24, context=5, hidden=32, blocks=2, bins=8)
    flow = _student(spec, torch.float32)
    z, c = 4 * torch.randn(300, 24), torch.randn(300, 5)
    with torch.no_grad():
        ref, _ = flow._transform.inverse(z, c)
        out = FastStudent(flow).compile()(z, c)
        out2 = FastStudent(flow).compile()(z[:77], c[:77])  # another batch size: no recompile needed
    assert torch.allclose(out, ref, atol=2e-4, rtol=2e-4)
    assert torch.allclose(out2, ref[:77], atol=2e-4, rtol=2e-4)


def test_fast_student_gemms_do_five_eighths_of_the_dense_work() -> None:
    # That they leave out only masked-out weights is what the equality with nflows above shows.
    spec = PRESETS["ds2"].spec(3, DS2, student=True)
    fast = FastStudent(_student(spec, torch.float32))
    done = sum((b - a) * c for gemms in fast.gemms for groups in gemms for a, b, c in groups)
    dense = sum(w.numel() for name, w in build_iaf(spec).named_parameters() if name.endswith("weight")
                and "context_layer" not in name)
    assert fast.n_groups == 4 and done / dense < 0.66, done / dense  # 5/8, plus the groups' rounding
