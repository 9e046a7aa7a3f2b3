"""Student IAFs for flows 2 and 3 by Probability Density Distillation from the frozen teacher MAFs."""

from hpc_calo.distill.pdd import DistillModel, PDDConfig, pass_loss, sq_err
from hpc_calo.distill.trace import Trace, one_pass

__all__ = ["DistillModel", "PDDConfig", "Trace", "one_pass", "pass_loss", "sq_err"]
