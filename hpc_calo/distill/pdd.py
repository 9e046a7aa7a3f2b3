"""Probability Density Distillation (CaloFlow II, iCaloFlow): an IAF student learns to invert a frozen MAF teacher.

Both passes run each flow in its one-pass direction and compare, block by block, what the two produce:

- x-pass: data x -> teacher -> z_T -> student -> x_S.  The student must return the data.
- z-pass: noise z -> student -> x_S -> teacher -> z_T.  The teacher must return the noise; gradients flow
  THROUGH the frozen teacher into the student.

Each pass's loss (sum over dimensions, mean over the batch of squared errors) is the end point, plus every
intermediate tensor (the tensor after each MADE block and each permutation; the student's k-th step is
matched with the teacher's k-th from the end), plus every MADE output (the spline parameters; student block
i against teacher block i — the student's spline is the inverse spline, so a perfect student's parameters
ARE the teacher's). Total: ``beta * x + (1 - beta) * z``.

The KL estimate E_z[log q_S(x) - log p_T(x)], x = student(z), uses the student's log-det from its one-pass
direction and the teacher's exact log-likelihood. In eval mode ``forward`` returns it: the training loop's
validation loss then IS the KL, so the loop's keep-best keeps the student with the lowest validation KL.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from hpc_calo.flows import Trace, base_log_prob, one_pass


@dataclass(frozen=True)
class PDDConfig:
    beta: float = 0.5  # weight of the x-pass; the z-pass gets 1 - beta
    match_steps: bool = True  # intermediate tensors
    match_params: bool = True  # MADE outputs


def sq_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared error summed over features, averaged over the batch."""
    return (a - b).pow(2).flatten(1).sum(dim=1).mean()


def pass_loss(first: Trace, second: Trace, target: torch.Tensor, cfg: PDDConfig) -> torch.Tensor:
    """Loss of one pass: ``first`` ran on the pass's input, ``second`` on ``first``'s output; target = input."""
    loss = sq_err(second.outputs, target)
    if cfg.match_steps:
        # steps[0] of ``second`` is ``first``'s output and ``second``'s end point is scored above: both skipped.
        n = len(first.steps)
        for k in range(1, n - 1):
            loss = loss + sq_err(first.steps[k], second.steps[n - 1 - k])
    if cfg.match_params:
        n = len(first.params)
        for k in range(n):
            loss = loss + sq_err(first.params[k], second.params[n - 1 - k])
    return loss


class DistillModel(nn.Module):
    """``forward(batch)`` -> PDD loss (train mode) or the KL estimate (eval mode); only the student trains.

    ``teacher`` and ``student`` are FlowModel-like: ``.flow`` (a flow of :mod:`hpc_calo.flows`), and the teacher's
    ``.inputs(batch) -> (x, context)`` does the preprocessing (fresh dequantisation noise included). The teacher
    is held outside the module tree: not in ``parameters()``, ``state_dict()`` or DDP's buckets (so DDP sees
    exactly the student, and a checkpoint holds only the student), yet ``.to()`` moves it along.

    After each call ``metrics`` holds detached scalars: loss, x_loss, z_loss, kl.
    The z-pass noise is ``torch.randn`` (the loop seeds it; validation uses a fixed seed) unless the batch
    carries ``"pdd_z"`` (B, features), which tests use to make the pass deterministic.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, cfg: PDDConfig | None = None) -> None:
        super().__init__()
        if not 0.0 <= (cfg or PDDConfig()).beta <= 1.0:
            raise ValueError("beta must lie in [0, 1]")
        self.cfg = cfg or PDDConfig()
        teacher.requires_grad_(False)
        teacher.eval()
        self._teacher = (teacher,)  # a tuple hides it from nn.Module's registration
        self.student = student
        self.metrics: dict[str, torch.Tensor] = {}

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def _apply(self, fn: Any, recurse: bool = True) -> DistillModel:  # .to(), .double(), .cuda() ...
        super()._apply(fn, recurse)
        self.teacher._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> DistillModel:
        super().train(mode)
        self.teacher.eval()  # frozen: no dropout, whatever the loop asks
        return self

    def select(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The teacher's rows: the student learns the conditions its teacher was trained on."""
        select = getattr(self.teacher, "select", None)
        return select(batch) if callable(select) else batch

    def meta(self) -> dict[str, Any]:
        """Identity checked on resume: the student's, plus the teacher it distils and the PDD settings."""
        base = self.student.meta() if callable(getattr(self.student, "meta", None)) else {}
        teacher = self.teacher.meta() if callable(getattr(self.teacher, "meta", None)) else {}
        return {**base, "kind": "distill", "teacher_spec": teacher.get("spec"), "pdd": asdict(self.cfg)}

    def save(self, path: Any) -> None:
        """``best.pt`` is the student alone, as a model file the generation chain loads."""
        saver = getattr(self.student, "save", None)
        if not callable(saver):
            raise TypeError("the student has no save(path)")
        saver(path)

    def _noise(self, batch: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        z = batch.get("pdd_z")
        return torch.randn_like(x) if z is None else z.to(x.device, x.dtype)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        teacher, student = self.teacher.flow, self.student.flow
        with torch.no_grad():
            x, c = self.teacher.inputs(batch)
            # x-pass: the teacher's half needs no gradient (its outputs are targets only).
            t_x = one_pass(teacher, x, c)
        z = self._noise(batch, x)
        s_z = one_pass(student, z, c)
        t_z = one_pass(teacher, s_z.outputs, c)  # gradients flow through the frozen teacher
        with torch.no_grad():
            log_q = base_log_prob(student, z) - s_z.logabsdet
            log_p = base_log_prob(teacher, t_z.outputs) + t_z.logabsdet
            kl = (log_q - log_p).mean()
        if not self.training:
            # Validation: the KL is what the loop keeps the best student by; the pass losses are logged too.
            s_x = one_pass(student, t_x.outputs, c)
            self.metrics = {"kl": kl, "x_loss": pass_loss(t_x, s_x, x, self.cfg),
                            "z_loss": pass_loss(s_z, t_z, z, self.cfg)}
            self.metrics["loss"] = self.cfg.beta * self.metrics["x_loss"] + (1 - self.cfg.beta) * self.metrics["z_loss"]
            return kl
        s_x = one_pass(student, t_x.outputs, c)
        x_loss = pass_loss(t_x, s_x, x, self.cfg)
        z_loss = pass_loss(s_z, t_z, z, self.cfg)
        loss = self.cfg.beta * x_loss + (1 - self.cfg.beta) * z_loss
        self.metrics = {"loss": loss.detach(), "x_loss": x_loss.detach(), "z_loss": z_loss.detach(), "kl": kl}
        return loss
