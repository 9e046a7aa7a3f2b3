"""The flow library seam: every line of hpc-calo that knows nflows is in this package.

The rest of hpc-calo (the flow modules in ``hpc_calo.models``, the distillation, the generation chain) uses
only these names, and holds a built flow as an opaque ``torch.nn.Module``:

- ``FlowSpec``, ``build_maf(spec)``, ``build_iaf(spec, hidden)``: a teacher MAF and a student IAF with the same
  block layout (``build``);
- ``log_prob(flow, x, c)``, ``from_latent(flow, z, c)``, ``base_log_prob(flow, z)``, ``is_student(flow)``;
- ``one_pass(flow, inputs, c) -> Trace``: a flow in its one-pass direction, block by block, with every
  intermediate tensor and MADE output (what the distillation matches), and ``maf_step`` (benchmarks);
- ``fast_sampler(flow, matmul_dtype, compile)``: the fast z -> x of a student or a MAF (``fast``).

docs/design.md says what another flow library needs.
"""

from hpc_calo.flows.build import FlowSpec, build_iaf, build_maf, n_parameters
from hpc_calo.flows.fast import fast_sampler
from hpc_calo.flows.passes import Trace, base_log_prob, from_latent, is_student, log_prob, maf_step, one_pass

__all__ = [
    "FlowSpec", "Trace", "base_log_prob", "build_iaf", "build_maf", "fast_sampler", "from_latent", "is_student",
    "log_prob", "maf_step", "n_parameters", "one_pass",
]
