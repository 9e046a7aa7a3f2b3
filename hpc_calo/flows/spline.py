"""The rational-quadratic spline with linear tails (Durkan et al. 2019), vectorised, forward and inverse.

The same maths and parameterisation as nflows' ``unconstrained_rational_quadratic_spline`` (so trained weights
give the same density, to rounding), computed differently:

- no boolean-mask indexing: the spline runs on the whole tensor with the inputs clamped into the interval and
  ``torch.where`` picks the identity tails (nflows gathers and scatters the inside points, which costs index /
  index_put / nonzero and a host sync on a GPU);
- parameter-major layout: the parameters are (..., 3K-1, D), so the softmax, cumsum, bin search and gathers over
  the K bins run along a strided axis with D contiguous, which ATen vectorises (a softmax over a last axis of 8
  is ~25x slower on CPU). The MADE's (B, D * (3K-1)) output is reordered once by :func:`parameter_major`;
- the knots and derivatives of each input's bin are gathered once (softplus only of the two gathered values);
- a hand-written backward for the per-bin part (:class:`_Spline`): the gradient of the two gathered knots
  reaches the widths and heights as two masked terms and the softmax backward, without the zero-filled scatter
  of gather's backward or the flips of cumsum's; the per-input part is differentiated by autograd.

Bin search as nflows': an input falls in bin k when it is >= the k-th inner knot (nflows' ``searchsorted`` with
its eps on the last knot gives the same bin for every input inside the interval).

Sampling has its own inverse, :func:`rq_spline_sample` (no log-determinant, no autograd, parameter-first).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MIN_BIN_WIDTH = 1e-3  # nflows' defaults (nflows.transforms.splines.rational_quadratic)
MIN_BIN_HEIGHT = 1e-3
MIN_DERIVATIVE = 1e-3


def parameter_major(params: torch.Tensor, features: int) -> torch.Tensor:
    """A MADE output (B, D * P), ordered (feature, parameter) as nflows lays it out -> contiguous (B, P, D)."""
    return params.view(params.shape[0], features, -1).transpose(1, 2).contiguous()


def rq_spline(
    inputs: torch.Tensor,
    params: torch.Tensor,
    inverse: bool = False,
    bound: float = 1.0,
    min_width: float = MIN_BIN_WIDTH,
    min_height: float = MIN_BIN_HEIGHT,
    min_derivative: float = MIN_DERIVATIVE,
    logdet: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Elementwise monotone spline on [-bound, bound], identity outside; returns (outputs, log|d out/d in|).

    ``inputs`` is (..., D); ``params`` is (..., 3K-1, D), parameter-major: K unnormalised widths, K unnormalised
    heights, K-1 unnormalised inner derivatives (the outer knots have derivative 1, nflows' linear tails). With
    ``inverse`` the inverse spline (its log-determinant is that of the inverse map). ``logdet=False`` skips the
    log-determinant (returns None): what sampling needs. Differentiable in both arguments (first order).
    """
    k = (params.shape[-2] + 1) // 3
    if min_width * k > 1.0 or min_height * k > 1.0:
        raise ValueError("Minimal bin width or height too large for the number of bins")
    consts = (inverse, float(bound), min_width, min_height, min_derivative)
    if torch.is_grad_enabled() and (inputs.requires_grad or params.requires_grad):
        out, lad = _Spline.apply(inputs, params, *consts)
        return out, lad if logdet else None
    with torch.no_grad():
        _, _, knots = _bins(inputs, params, *consts, keep_softmax=False)
        return _transform(inputs, *knots, *consts[:2], min_derivative, logdet)


def _bins(
    inputs: torch.Tensor, params: torch.Tensor, inverse: bool, bound: float, min_width: float, min_height: float,
    min_derivative: float, keep_softmax: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """The softmax of the widths and heights (..., 2, K, D), each input's bin (..., 1, D) and the bin's knots:
    x and y at its lower and upper end and the unnormalised derivatives there, each (..., D)."""
    k = (params.shape[-2] + 1) // 3
    sm = torch.softmax(params[..., : 2 * k, :].unflatten(-2, (2, k)), dim=-2)
    # (In place where it is safe: this runs without autograd; sm is kept for the backward when asked.)
    scale = sm.new_tensor([1 - min_width * k, 1 - min_height * k]).view(2, 1, 1)
    wh = (sm * scale if keep_softmax else sm.mul_(scale)).add_(sm.new_tensor([min_width, min_height]).view(2, 1, 1))
    # Inner knots 1..K-1 on [0, 1] (knots 0 and K are pinned to -bound and bound, as nflows pins them); mapped to
    # [-bound, bound] (as nflows: 2 * bound * knot - bound) only along the searched axis and once gathered.
    cum = torch.cumsum(wh[..., : k - 1, :], dim=-2)  # (..., 2, K-1, D)
    x = inputs.clamp(-bound, bound).unsqueeze(-2)
    search = cum[..., 1 if inverse else 0, :, :].mul(2 * bound).add_(-bound)
    idx = (x >= search).sum(dim=-2, keepdim=True)  # (..., 1, D): the bin, 0..K-1
    first, last = idx[..., 0, :] == 0, idx[..., 0, :] == k - 1
    lo_i, hi_i = (idx - 1).clamp_(min=0), idx.clamp(max=k - 2)
    lo = cum.gather(-2, lo_i.unsqueeze(-3).expand(*cum.shape[:-2], 1, -1))[..., 0, :].mul_(2 * bound).add_(-bound)
    hi = cum.gather(-2, hi_i.unsqueeze(-3).expand(*cum.shape[:-2], 1, -1))[..., 0, :].mul_(2 * bound).add_(-bound)
    lo = torch.where(first.unsqueeze(-2), -bound, lo)
    hi = torch.where(last.unsqueeze(-2), bound, hi)
    # The linear tails' unnormalised derivative at knots 0 and K, as nflows computes it: softplus of it is
    # 1 - min_derivative.
    edge = float(np.log(np.exp(1 - min_derivative) - 1))
    ud = params[..., 2 * k :, :]
    u0 = torch.where(first, edge, ud.gather(-2, lo_i)[..., 0, :])
    u1 = torch.where(last, edge, ud.gather(-2, hi_i)[..., 0, :])
    return sm, idx, (lo[..., 0, :], hi[..., 0, :], lo[..., 1, :], hi[..., 1, :], u0, u1)


def _transform(
    inputs: torch.Tensor, x_k: torch.Tensor, x_k1: torch.Tensor, y_k: torch.Tensor, y_k1: torch.Tensor,
    u0: torch.Tensor, u1: torch.Tensor, inverse: bool, bound: float, min_derivative: float, logdet: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The spline of each input in its bin (nflows' formulas), identity outside [-bound, bound]."""
    x = inputs.clamp(-bound, bound)  # the spline branch never sees the tails (finite values and gradients)
    w, h = x_k1 - x_k, y_k1 - y_k
    d0 = min_derivative + F.softplus(u0)
    d1 = min_derivative + F.softplus(u1)
    delta = h / w
    s = d0 + d1 - 2 * delta
    if inverse:
        dy = x - y_k
        a = dy * s + h * (delta - d0)
        b = h * d0 - dy * s
        c = -delta * dy
        theta = (2 * c) / (-b - torch.sqrt(b.pow(2) - 4 * a * c))
        t1mt = theta * (1 - theta)
        out = theta * w + x_k
    else:
        theta = (x - x_k) / w
        t1mt = theta * (1 - theta)
        out = y_k + h * (delta * theta.pow(2) + d0 * t1mt) / (delta + s * t1mt)
    inside = (inputs >= -bound) & (inputs <= bound)
    out = torch.where(inside, out, inputs)
    if not logdet:
        return out, None
    num = delta.pow(2) * (d1 * theta.pow(2) + 2 * delta * t1mt + d0 * (1 - theta).pow(2))
    lad = torch.log(num) - 2 * torch.log(delta + s * t1mt)
    return out, torch.where(inside, -lad if inverse else lad, 0.0)


class _Spline(torch.autograd.Function):
    """rq_spline with a hand-written backward for the per-bin part (see the module docstring)."""

    @staticmethod
    def forward(ctx, inputs, params, inverse, bound, min_width, min_height, min_derivative):  # type: ignore[override]
        sm, idx, knots = _bins(inputs, params, inverse, bound, min_width, min_height, min_derivative)
        out, lad = _transform(inputs, *knots, inverse, bound, min_derivative)
        ctx.save_for_backward(inputs, sm, idx, *knots)
        ctx.consts = (inverse, bound, min_width, min_height, min_derivative)
        return out, lad

    @staticmethod
    def backward(ctx, g_out, g_lad):  # type: ignore[override]
        inputs, sm, idx, *knots = ctx.saved_tensors
        inverse, bound, min_width, min_height, min_derivative = ctx.consts
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (inputs, *knots)]
            out, lad = _transform(*leaves, inverse, bound, min_derivative)
            g_x, g_xk, g_xk1, g_yk, g_yk1, g_u0, g_u1 = torch.autograd.grad((out, lad), leaves, (g_out, g_lad))
        if not ctx.needs_input_grad[1]:
            return g_x, None, None, None, None, None, None
        k = sm.shape[-2]
        # 0/1 masks over the bins j by arithmetic (bool masks' conversions and torch.where are several times
        # slower on CPU): below[j] = [j < idx], upto[j] = [j <= idx], each (..., 1, K, D).
        idx = idx.to(sm.dtype)
        j = torch.arange(k, dtype=sm.dtype, device=sm.device).view(k, 1)
        below = (idx - j).clamp_(0, 1)
        upto = (idx + 1 - j).clamp_(0, 1)
        # Inner knot m (1 <= m <= K-1) is 2 * bound * sum_{j < m} width_j - bound (heights alike): the lower knot
        # (m = idx) takes the widths j < idx, the upper one (m = idx + 1, unless it is the pinned knot K) j <= idx.
        g_lo = torch.stack([g_xk, g_yk], dim=-2).unsqueeze(-2)  # (..., 2, 1, D)
        g_hi = torch.stack([g_xk1, g_yk1], dim=-2).unsqueeze(-2) * (idx < k - 1).unsqueeze(-3)
        scale = sm.new_tensor([1 - min_width * k, 1 - min_height * k]).view(2, 1, 1) * (2 * bound)
        g_sm = (g_lo * below.unsqueeze(-3) + g_hi * upto.unsqueeze(-3)) * scale
        g_w = sm * (g_sm - (g_sm * sm).sum(dim=-2, keepdim=True))  # softmax backward
        # Inner derivative parameter j belongs to knot j + 1: the lower knot's if j == idx - 1, the upper's if j == idx.
        at_lo = below[..., : k - 1, :] - below[..., 1:, :]
        at_hi = upto[..., : k - 1, :] - below[..., : k - 1, :]
        g_u = g_u0.unsqueeze(-2) * at_lo + g_u1.unsqueeze(-2) * at_hi
        return g_x, torch.cat([g_w.flatten(-3, -2), g_u], dim=-2), None, None, None, None, None



def rq_spline_sample(
    y: torch.Tensor, params: torch.Tensor, bound: float, min_width: float = MIN_BIN_WIDTH,
    min_height: float = MIN_BIN_HEIGHT, min_derivative: float = MIN_DERIVATIVE,
) -> torch.Tensor:
    """The inverse spline of :func:`rq_spline` (outputs only), for sampling: ``params`` is (3K-1, *y.shape), any
    strides (FastStudent passes a permuted view of its grouped GEMM output; nothing is copied).

    Parameter-first: each parameter is a slab the shape of ``y`` whose rows are contiguous (FastStudent's GEMMs
    write them so), so every op runs on contiguous rows. ``params`` may be of a lower precision than ``y`` (bf16
    GEMM outputs): they are read as they are and the spline is computed in ``y``'s dtype. Written for few passes
    over memory: the softmax is normalised only where it is used (the y knots, for the bin search, and the
    gathered knots).
    Same formulas as :func:`_transform`, the same bin as nflows' search.
    """
    k = (params.shape[0] + 1) // 3
    ones = (1,) * y.dim()  # broadcasting shape of a per-parameter constant
    wh = params[: 2 * k].unflatten(0, (2, k))  # (2, K, *y.shape): a view, whatever params' strides
    e = torch.sub(wh, wh.amax(dim=1, keepdim=True).to(y.dtype)).exp_()  # in y's dtype
    # cum[a, j] = sum_{i<j} e[a, i], j = 0..K: the unnormalised knots (a = 0: x from the widths, a = 1: y from the
    # heights); cum[a, K] is the softmax denominator. Knot j is f * cum[a, j] + 2 * bound * j * min - bound.
    if torch.compiler.is_compiling():  # the compiler refuses a non-contiguous out=; same values
        cum = torch.cat([torch.zeros_like(e[:, :1]), torch.cumsum(e, dim=1)], dim=1)
    else:
        cum = e.new_empty(2, k + 1, *y.shape)
        cum[:, 0].zero_()
        torch.cumsum(e, dim=1, out=cum[:, 1:])
    mins = torch.tensor([min_width, min_height], dtype=y.dtype, device=y.device).view(2, *ones)
    f = cum[:, k].reciprocal().mul_((1 - mins * k) * (2 * bound))  # (2, *y.shape)
    yc = y.clamp(-bound, bound)
    j = torch.arange(1, k, dtype=y.dtype, device=y.device).view(k - 1, *ones)
    knots_y = torch.addcmul(j * (2 * bound * min_height) - bound, cum[1, 1:k], f[1])  # inner y knots (K-1, ...)
    idx = (knots_y <= yc).sum(0)  # the bin, 0..K-1
    both = torch.stack([idx, idx + 1])  # (2, ...): its lower and upper knot
    g = cum.gather(1, both.unsqueeze(0).expand(2, *both.shape))  # (2, 2, ...)
    knot = torch.addcmul(both.to(y.dtype) * (2 * bound * mins.unsqueeze(1)) - bound, g, f.unsqueeze(1))
    knot[:, 1].masked_fill_(idx == k - 1, bound)  # the outer knots pinned, as nflows pins them
    x_k, y_k = knot[0, 0], knot[1, 0]
    w, h = knot[0, 1] - x_k, knot[1, 1] - y_k
    # The outer knots' derivative is the linear tails' (as nflows: its softplus is 1 - min_derivative).
    edge = float(np.log(np.exp(1 - min_derivative) - 1))
    ud = params[2 * k :].gather(0, torch.stack([idx - 1, idx]).clamp_(0, k - 2)).to(y.dtype)
    ud[0].masked_fill_(idx == 0, edge)
    ud[1].masked_fill_(idx == k - 1, edge)
    d = F.softplus(ud).add_(min_derivative)
    d0 = d[0]
    delta = h / w
    s = d0 + d[1] - 2 * delta
    dy = yc - y_k
    a = dy * s + h * (delta - d0)
    b = h * d0 - dy * s
    c = -delta * dy
    theta = (2 * c) / (-b - torch.sqrt(b * b - 4 * a * c))
    out = theta.mul_(w).add_(x_k)
    return torch.where((y >= -bound) & (y <= bound), out, y)
