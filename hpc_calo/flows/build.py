"""Build the masked autoregressive spline flows with nflows.

Teachers are MAFs: density in one pass, sampling in ``features`` sequential passes. Students are IAFs built
from the same blocks used in the inverse direction: sampling in one pass. Permutations alternate reverse /
fixed random as in the reference; the random ones come from a seeded generator so a spec always builds the
same flow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from nflows import distributions, flows, transforms


@dataclass(frozen=True)
class FlowSpec:
    features: int
    context: int
    hidden: int = 256
    layers: int = 1  # hidden layers per MADE
    blocks: int = 8  # MADE blocks in the flow
    bins: int = 8
    tail_bound: float = 14.0
    dropout: float = 0.0
    perm_seed: int = 0


def permutations(spec: FlowSpec) -> list[torch.Tensor]:
    """The permutation after each block: reverse on even blocks, a fixed random one on odd blocks."""
    g = torch.Generator().manual_seed(spec.perm_seed)
    perms = []
    for i in range(spec.blocks):
        if i % 2 == 0:
            perms.append(torch.arange(spec.features - 1, -1, -1))
        else:
            perms.append(torch.randperm(spec.features, generator=g))
    return perms


def made_transform(
    spec: FlowSpec, hidden: int | None = None, cls: type | None = None
) -> transforms.MaskedPiecewiseRationalQuadraticAutoregressiveTransform:
    cls = cls or transforms.MaskedPiecewiseRationalQuadraticAutoregressiveTransform
    return cls(
        features=spec.features,
        hidden_features=hidden or spec.hidden,
        context_features=spec.context,
        num_bins=spec.bins,
        tails="linear",
        tail_bound=spec.tail_bound,
        num_blocks=spec.layers,
        use_residual_blocks=False,
        random_mask=False,
        activation=F.relu,
        dropout_probability=spec.dropout,
        use_batch_norm=False,
    )


class InverseSplineAutoregressiveTransform(transforms.MaskedPiecewiseRationalQuadraticAutoregressiveTransform):
    """A student block: its one-pass direction applies the INVERSE spline to the MADE's parameters.

    Wrapped in ``InverseTransform``, the student's sampling direction (z -> x) computes the spline parameters
    from its z-side input and inverts the spline, which is exactly what inverting a teacher block needs: the
    teacher's parameters for dimension i are a function of x_<i, hence of z_<i. So a perfect student's MADE
    outputs equal the teacher's, and distillation can match them one to one (as the reference IAFRQS does).
    """

    def _elementwise_forward(self, inputs, autoregressive_params):
        return self._elementwise(inputs, autoregressive_params, inverse=True)

    def _elementwise_inverse(self, inputs, autoregressive_params):
        return self._elementwise(inputs, autoregressive_params)


def build_maf(spec: FlowSpec) -> flows.Flow:
    """Teacher: x -> z runs the MADE blocks directly (fast density, sequential sampling)."""
    steps: list[transforms.Transform] = []
    for perm in permutations(spec):
        steps.append(made_transform(spec))
        steps.append(transforms.Permutation(perm))
    return flows.Flow(transforms.CompositeTransform(steps), distributions.StandardNormal([spec.features]))


def build_iaf(spec: FlowSpec, hidden: int | None = None) -> flows.Flow:
    """Student: the same block layout with every MADE inverted (one-pass sampling, sequential density).

    Block i of the student mirrors block i of the teacher, with the teacher's permutations, so that the
    intermediate tensors and the MADE outputs of the two can be matched one to one by the distillation.
    """
    steps: list[transforms.Transform] = []
    for perm in permutations(spec):
        steps.append(transforms.InverseTransform(made_transform(spec, hidden, InverseSplineAutoregressiveTransform)))
        steps.append(transforms.Permutation(perm))
    return flows.Flow(transforms.CompositeTransform(steps), distributions.StandardNormal([spec.features]))


def n_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
