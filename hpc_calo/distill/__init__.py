"""Student IAFs for flows 2 and 3 by Probability Density Distillation from the frozen teacher MAFs."""

from hpc_calo.distill.pdd import DistillModel, PDDConfig, pass_loss, sq_err

__all__ = ["DistillModel", "PDDConfig", "pass_loss", "sq_err"]
