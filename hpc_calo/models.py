"""The three conditional flows of iCaloFlow as modules whose ``forward`` is the training loss.

``FlowModel(batch) -> mean NLL`` lets DDP wrap the module and lets one training loop serve every flow.
The NLL is that of the PREPROCESSED features x given the context c (as the reference reports it): the
log-Jacobians of noise, normalisation and logit are NOT in the loss, so losses compare with the reference
but not with a density in MeV.

Features and context per flow (context fields in this order, as in the reference code):

====  ==========================================  ================================================================
flow  x (features)                                c (context)
====  ==========================================  ================================================================
1     encode_flow1(E_i + u), i=0..44        (45)  encode_e_inc(E_inc)                                          (1)
2     logit(normalise(layer_0 + u))         (V)   encode_e_inc(E_inc), encode_layer_energy(E_0 + u) / 4        (2)
3     logit(normalise(layer_n + u))         (V)   encode_e_inc(E_inc), encode_layer_energy(E_n + u),
                                                  encode_layer_energy(E_{n-1} + u), logit(normalise(layer_{n-1}
                                                  + u')), one_hot(n - 1, 44)                             (V + 47)
====  ==========================================  ================================================================

``u`` is fresh U[0, w) noise on every call, w = ``noise_mev`` (the preset's, the reference's 5 keV unless set otherwise;
see :mod:`hpc_calo.preprocess`).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hpc_calo import preprocess as pp
from hpc_calo.errors import UserError
from hpc_calo.flows import FlowSpec, build_iaf, build_maf, from_latent, log_prob
from hpc_calo.flows.presets import FLOWS, get_preset
from hpc_calo.geometry import Geometry, get_geometry
from hpc_calo.torchfile import load_versioned, save_versioned

MODEL_FORMAT = "hpc-calo-flow"
MODEL_VERSION = 1


def flow_meta(flow: int, geometry: Geometry, spec: FlowSpec, student: bool, preset: str,
              energies: str = "absolute", noise_mev: float = pp.NOISE_MEV,
              nonempty_targets: bool = True) -> dict[str, Any]:
    meta = {"kind": "flow", "flow": flow, "student": student, "dataset": geometry.name, "preset": preset,
            "spec": asdict(spec)}
    if flow == 1:  # only flow-1 models the layer energies
        meta["energies"] = energies
    if noise_mev != pp.NOISE_MEV:  # only when set: files and checkpoints made before the choice existed still match
        meta["noise_mev"] = noise_mev
    if flow == 3 and nonempty_targets and not student:
        meta["targets"] = "nonempty"
    return meta


class FlowModel(nn.Module):
    """Flow ``k`` (1, 2 or 3): a teacher MAF, or with ``student=True`` an IAF with the same block layout."""

    def __init__(
        self, flow: int, geometry: Geometry, spec: FlowSpec, student: bool = False, preset: str = "custom",
        energies: str = "absolute", noise_mev: float = pp.NOISE_MEV, nonempty_targets: bool = True,
    ) -> None:
        super().__init__()
        if flow not in FLOWS:
            raise UserError(f"flow must be one of 1, 2, 3, not {flow}")
        self.k = flow
        self.geometry = geometry
        self.spec = spec
        self.student = student
        self.preset = preset
        if energies not in pp.ENERGY_ENCODINGS:
            raise UserError(f"flow-1 energy encoding must be one of {', '.join(pp.ENERGY_ENCODINGS)}, not {energies!r}")
        self.energies = energies
        if not 0.0 < noise_mev < pp.E_NORM_MEV:
            raise UserError(f"dequantisation noise width must be positive (MeV), not {noise_mev}")
        self.noise_mev = float(noise_mev)
        # Flow-3 learns only the pairs whose layer n has energy: an empty layer is empty whatever shape is drawn for
        # it, and its noise-only shape would teach the flow a diffuse mode (models saved before: every pair).
        self.nonempty_targets = nonempty_targets and flow == 3 and not student
        self.flow = build_iaf(spec) if student else build_maf(spec)

    @classmethod
    def from_preset(cls, flow: int, geometry: Geometry, preset: str, student: bool = False,
                    noise_mev: float | None = None, nonempty_targets: bool = True) -> FlowModel:
        """``noise_mev`` None: the preset's noise width."""
        p = get_preset(preset)
        return cls(flow, geometry, p.spec(flow, geometry, student), student, preset, p.energies,
                   p.noise_mev if noise_mev is None else noise_mev, nonempty_targets)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def meta(self) -> dict[str, Any]:
        """What identifies this model; a checkpoint with different meta must not be resumed into it."""
        return flow_meta(self.k, self.geometry, self.spec, self.student, self.preset, self.energies, self.noise_mev,
                         self.nonempty_targets)

    # ---- preprocessing -------------------------------------------------------------------------------------

    def select(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The rows of a raw loader batch this flow learns from (flow-3: the pairs whose layer n has energy)."""
        if not self.nonempty_targets:
            return batch
        keep = batch["e_cur"].reshape(-1) > 0
        return {key: t[keep] for key, t in batch.items()}

    def inputs(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw loader batch (MeV) -> (x, c) in the flow's space, with fresh dequantisation noise."""
        dev, dt = self.device, self.dtype

        def get(key: str) -> torch.Tensor:
            t = batch[key].to(dev)
            return t if not t.is_floating_point() else t.to(dt)

        w = self.noise_mev
        raw_e_inc = get("e_inc").reshape(-1, 1)
        e_inc = pp.encode_e_inc(raw_e_inc)
        if self.k == 1:
            x = pp.encode_flow1(pp.add_noise(get("layer_e"), generator, w), raw_e_inc, self.energies)
            return x, e_inc
        if self.k == 2:
            x = pp.encode_shape(get("layer"), generator, width=w)
            e0 = pp.encode_layer_energy(pp.add_noise(get("e0"), generator, w)).reshape(-1, 1) / pp.FLOW2_E_SCALE
            return x, torch.cat([e_inc, e0], dim=1)
        x = pp.encode_shape(get("cur"), generator, width=w)
        e_cur = pp.encode_layer_energy(pp.add_noise(get("e_cur"), generator, w)).reshape(-1, 1)
        e_prev = pp.encode_layer_energy(pp.add_noise(get("e_prev"), generator, w)).reshape(-1, 1)
        prev = pp.encode_shape(get("prev"), generator, width=w)
        return x, torch.cat([e_inc, e_cur, e_prev, prev, pp.one_hot_layer(get("n"), dt)], dim=1)

    @staticmethod
    def context3(
        e_inc: torch.Tensor, e_cur: torch.Tensor, e_prev: torch.Tensor, prev_shape_logit: torch.Tensor, n: int
    ) -> torch.Tensor:
        """Flow-3 context at generation time (energies in MeV, no noise on them, as in the reference)."""
        b = e_inc.shape[0]
        idx = torch.full((b,), n, dtype=torch.long, device=e_inc.device)
        return torch.cat(
            [
                pp.encode_e_inc(e_inc).reshape(-1, 1),
                pp.encode_layer_energy(e_cur).reshape(-1, 1),
                pp.encode_layer_energy(e_prev).reshape(-1, 1),
                prev_shape_logit,
                pp.one_hot_layer(idx, e_inc.dtype),
            ],
            dim=1,
        )

    @staticmethod
    def context2(e_inc: torch.Tensor, e0: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                pp.encode_e_inc(e_inc).reshape(-1, 1),
                pp.encode_layer_energy(e0).reshape(-1, 1) / pp.FLOW2_E_SCALE,
            ],
            dim=1,
        )

    @staticmethod
    def context1(e_inc: torch.Tensor) -> torch.Tensor:
        return pp.encode_e_inc(e_inc).reshape(-1, 1)

    # ---- density and sampling ------------------------------------------------------------------------------

    def log_prob(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """log p(x | c) per row, in the preprocessed space."""
        return log_prob(self.flow, x, context)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean negative log-likelihood of a raw batch (what the training loop minimises)."""
        x, c = self.inputs(batch)
        lp = self.log_prob(x, c)
        return -(lp.mean() if len(lp) else lp.sum())  # a batch without a row to learn from: zero loss, not NaN

    def from_latent(self, z: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Map base-distribution samples z (B, F) to x (B, F): one pass for a student, F passes for a MAF."""
        return from_latent(self.flow, z, context)

    @torch.no_grad()
    def sample(self, context: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One sample per context row, in the preprocessed space."""
        context = context.to(self.device, self.dtype)
        z = torch.randn(
            context.shape[0], self.spec.features, generator=generator, device=self.device, dtype=self.dtype
        )
        return self.from_latent(z, context)

    # ---- standalone model file -----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``best.pt``: everything needed to rebuild this model without the run's config (atomic)."""
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        save_versioned(path, MODEL_FORMAT, MODEL_VERSION, {**self.meta(), "state_dict": state})


def load_flow_model(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    dataset: str | None = None,
    flow: int | None = None,
) -> FlowModel:
    """Rebuild a FlowModel from ``best.pt``; UserError for a corrupt file or another dataset / flow."""
    if not Path(path).is_file():
        raise UserError(f"{path}: no such model file")
    obj = load_versioned(path, MODEL_FORMAT, MODEL_VERSION, "flow model file")
    if dataset is not None and obj["dataset"] != dataset:
        raise UserError(f"{path}: model is for {obj['dataset']}, not {dataset}")
    if flow is not None and obj["flow"] != flow:
        raise UserError(f"{path}: model is flow-{obj['flow']}, not flow-{flow}")
    model = FlowModel(obj["flow"], get_geometry(obj["dataset"]), FlowSpec(**obj["spec"]), obj["student"], obj["preset"],
                      obj.get("energies", "absolute"), obj.get("noise_mev", pp.NOISE_MEV),
                      nonempty_targets=obj.get("targets") == "nonempty")
    try:
        model.load_state_dict(obj["state_dict"])
    except RuntimeError as err:
        raise UserError(f"{path}: weights do not fit the stored architecture: {err}") from None
    return model.to(device=device, dtype=dtype).eval()
