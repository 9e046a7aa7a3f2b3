"""Running a built nflows flow: density, sampling from a latent, and the block-by-block trace of distillation.

nflows' ``CompositeTransform`` returns only the end point and the log-determinant; PDD also needs every
intermediate tensor and every MADE output (the spline parameters). So :func:`one_pass` runs the blocks by hand
with nflows' own pieces (``autoregressive_net``, ``_elementwise_forward``, ``Permutation``), which keeps the
result identical to ``flow._transform(x, c)`` (teacher) or ``flow._transform.inverse(z, c)`` (student) — tested.

One-pass directions: a teacher MAF maps data to latent (blocks in order); a student IAF (blocks wrapped in
``InverseTransform``) maps latent to data (blocks in reverse order, permutations inverted).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from nflows import flows, transforms
from nflows.transforms.autoregressive import AutoregressiveTransform


@dataclass
class Trace:
    outputs: torch.Tensor
    logabsdet: torch.Tensor  # log |det d outputs / d inputs| of the map that was applied
    steps: list[torch.Tensor] = field(default_factory=list)  # the input, then the tensor after every transform
    params: list[torch.Tensor] = field(default_factory=list)  # each MADE's output, in the order the blocks ran


def log_prob(flow: flows.Flow, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """log p(x | c) per row."""
    return flow.log_prob(x, context=context)


def from_latent(flow: flows.Flow, z: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Base-distribution samples z (B, F) -> x (B, F): one pass for a student, F passes for a MAF."""
    x, _ = flow._transform.inverse(z, context=flow._embedding_net(context))
    return x


def base_log_prob(flow: flows.Flow, z: torch.Tensor) -> torch.Tensor:
    """log density of the latent z under the flow's base distribution, per row."""
    return flow._distribution.log_prob(z)


def is_student(flow: flows.Flow) -> bool:
    return any(isinstance(t, transforms.InverseTransform) for t in flow._transform._transforms)


def one_pass(flow: flows.Flow, inputs: torch.Tensor, context: torch.Tensor | None) -> Trace:
    """Teacher: x -> z; student: z -> x. Records steps and MADE outputs in execution order."""
    context = flow._embedding_net(context) if context is not None else None
    student = is_student(flow)
    seq = list(flow._transform._transforms)
    if student:
        seq.reverse()
    h = inputs
    logabsdet = inputs.new_zeros(inputs.shape[0])
    steps, params = [h], []
    for t in seq:
        if isinstance(t, transforms.Permutation):
            h, _ = t.inverse(h) if student else t(h)
        else:
            block = t._transform if student else t
            if not isinstance(block, AutoregressiveTransform):
                raise TypeError(f"unexpected transform {type(t).__name__} in a spline flow")
            p = block.autoregressive_net(h, context)
            h, ld = block._elementwise_forward(h, p)
            params.append(p)
            logabsdet = logabsdet + ld
        steps.append(h)
    return Trace(h, logabsdet, steps, params)


def maf_step(flow: flows.Flow, x: torch.Tensor, z: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The work of one of the F sequential steps that sampling a MAF block costs: its MADE on the current x,
    then its spline on z (the first block's; every block costs the same)."""
    block = flow._transform._transforms[0]
    out, _ = block._elementwise_forward(z, block.autoregressive_net(x, context))
    return out
