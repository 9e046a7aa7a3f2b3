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

from hpc_calo.flows.spline import parameter_major, rq_spline


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


class SplineAutoregressiveTransform(transforms.MaskedPiecewiseRationalQuadraticAutoregressiveTransform):
    """nflows' masked autoregressive rational-quadratic spline block with linear tails, its spline replaced by
    the vectorised one of ``hpc_calo.flows.spline``: same parameters and state_dict, same maths to rounding, ~2x
    faster teacher training steps on CPU (bench/spline.py), no host sync on a GPU. The teachers' blocks, and the
    students' through ``InverseSplineAutoregressiveTransform``."""

    def _elementwise(self, inputs, autoregressive_params, inverse=False):
        if self.tails != "linear" or hasattr(self.autoregressive_net, "hidden_features"):
            # Not our blocks (nflows rescales widths and heights for MADEs with ``hidden_features``; its
            # MADE has none): nflows' own spline.
            return super()._elementwise(inputs, autoregressive_params, inverse)
        params = parameter_major(autoregressive_params, inputs.shape[1])  # (B, 3K-1, D)
        outputs, logabsdet = rq_spline(
            inputs, params, inverse, float(self.tail_bound), self.min_bin_width, self.min_bin_height,
            self.min_derivative,
        )
        return outputs, logabsdet.sum(dim=1)


def made_transform(
    spec: FlowSpec, hidden: int | None = None, cls: type | None = None
) -> SplineAutoregressiveTransform:
    cls = cls or SplineAutoregressiveTransform
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


class InverseSplineAutoregressiveTransform(SplineAutoregressiveTransform):
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
