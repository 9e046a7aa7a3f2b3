"""Named architectures and training defaults for the three flows.

``ds2`` and ``ds3`` reproduce the reference iCaloFlow teachers (19,470,168 and 95,088,152 parameters for the
three together) and may only be used with their own dataset. ``small``, ``medium``, ``quickstart`` and ``tiny``
fit any dataset and exist for CPU runs, the quickstart and the tests.

``small``, ``medium`` and ``quickstart`` add 0.5 keV of dequantisation noise instead of the reference's 5 keV: at equal
training cost every shape feature comes closer to the data (BENCHMARKS.md, "Dequantisation noise width"). The
reference presets keep the reference's width, so that they stay comparable with its published results.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hpc_calo.errors import UserError
from hpc_calo.flows.build import FlowSpec
from hpc_calo.geometry import N_LAYERS, Geometry
from hpc_calo.preprocess import NOISE_MEV, flow1_features

FLOWS = (1, 2, 3)
SHARP_NOISE_MEV = 5.0e-4


@dataclass(frozen=True)
class FlowArch:
    hidden: int
    layers: int
    student_hidden: int | None = None  # flow-1 has no student
    blocks: int | None = None  # None: the preset's


@dataclass(frozen=True)
class Preset:
    name: str
    dataset: str | None  # None: any dataset
    arch: dict[int, FlowArch]
    blocks: int = 8
    bins: int = 8
    tail_bound: float = 14.0
    max_lr: dict[int, float] = field(default_factory=lambda: {1: 1e-4, 2: 1e-3, 3: 1e-3})
    batch_size: int = 1000
    epochs: dict[int, int] = field(default_factory=lambda: {1: 100, 2: 100, 3: 50})
    student_epochs: dict[int, int] | None = None  # distillation epochs of flows 2 and 3; None: as ``epochs``
    energies: str = "absolute"  # flow-1's encoding of the layer energies (hpc_calo.preprocess.ENERGY_ENCODINGS)
    # Optimiser-step budgets that replace the epochs of some flows ("flow3", "flow3_student", ...): for budgets
    # shorter than one epoch of flow-3, which sees ~44 pairs per shower.
    steps: dict[str, int] = field(default_factory=dict)
    noise_mev: float = NOISE_MEV  # dequantisation noise width of every flow (hpc_calo.preprocess)

    def default_epochs(self, flow: int, student: bool = False) -> int:
        return (self.student_epochs or self.epochs)[flow] if student else self.epochs[flow]

    def default_steps(self, flow: int, student: bool = False) -> int | None:
        return self.steps.get(f"flow{flow}" + ("_student" if student else ""))

    def context(self, flow: int, geometry: Geometry) -> int:
        v = geometry.voxels_per_layer
        # flow-3: previous layer's V voxels, E_n, E_{n-1}, E_inc and a one-hot layer index over 44 classes.
        return {1: 1, 2: 2, 3: v + 3 + (N_LAYERS - 1)}[flow]

    def features(self, flow: int, geometry: Geometry) -> int:
        return flow1_features(self.energies) if flow == 1 else geometry.voxels_per_layer

    def spec(self, flow: int, geometry: Geometry, student: bool = False) -> FlowSpec:
        if flow not in FLOWS:
            raise UserError(f"flow must be one of 1, 2, 3, not {flow}")
        if self.dataset is not None and self.dataset != geometry.name:
            raise UserError(f"preset {self.name!r} is for {self.dataset}, but the data are {geometry.name}")
        a = self.arch[flow]
        hidden = a.hidden
        if student:
            if a.student_hidden is None:
                raise UserError(f"flow-{flow} has no student (flow-1 stays a MAF)")
            hidden = a.student_hidden
        return FlowSpec(
            features=self.features(flow, geometry),
            context=self.context(flow, geometry),
            hidden=hidden,
            layers=a.layers,
            blocks=a.blocks or self.blocks,
            bins=self.bins,
            tail_bound=self.tail_bound,
            perm_seed=flow,
        )


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("ds2", "ds2", {1: FlowArch(256, 1), 2: FlowArch(256, 2, 256), 3: FlowArch(256, 2, 384)}),
        Preset("ds3", "ds3", {1: FlowArch(256, 1), 2: FlowArch(256, 2, 256), 3: FlowArch(256, 1, 256)}),
        Preset(
            "small",
            None,
            {1: FlowArch(64, 1), 2: FlowArch(128, 1, 128), 3: FlowArch(128, 1, 128)},
            blocks=4,
            epochs={1: 30, 2: 30, 3: 10},
            # Flow-3 at 3e-3 reaches in 6,000 steps a better teacher chain than 1e-3 in 12,000 (BENCHMARKS.md).
            max_lr={1: 1e-3, 2: 1e-3, 3: 3e-3},
            batch_size=500,
            energies="shares",
            noise_mev=SHARP_NOISE_MEV,
        ),
        # ``small`` with the reference's DS2 flow-3 (hidden 256, two layers, 8 blocks): ~4x the flow-3 cost per
        # step, and in 5,000 steps at 2e-3 (0.6 CPU-hours) a better teacher chain than ``small``'s flow-3 in
        # 18,000 (BENCHMARKS.md, "The teacher chain at high-level AUC 0.789"). Its flow-3 student is as wide as
        # the teacher; the students' budgets are those that brought the student chain within +0.05 of its
        # teacher (BENCHMARKS.md, "The `medium` chain's students").
        Preset(
            "medium",
            None,
            {1: FlowArch(64, 1), 2: FlowArch(128, 1, 128), 3: FlowArch(256, 2, 256, blocks=8)},
            blocks=4,
            epochs={1: 30, 2: 30, 3: 10},
            steps={"flow3": 5000, "flow2_student": 3000, "flow3_student": 9000},
            max_lr={1: 1e-3, 2: 1e-3, 3: 2e-3},
            batch_size=500,
            energies="shares",
            noise_mev=SHARP_NOISE_MEV,
        ),
        # The quickstart's: sized so the whole pipeline runs in about five minutes on two cores (``--jobs 2``:
        # flow-3 on one core while flows 1 and 2 train on the other; then the two students side by side). Flow-1
        # (cheap, and it alone sets every layer energy and so the energy response) trains longest; the shape
        # flows briefly.
        Preset(
            "quickstart",
            None,
            {1: FlowArch(64, 1), 2: FlowArch(64, 1, 64), 3: FlowArch(64, 1, 64)},
            blocks=4,
            epochs={1: 60, 2: 20, 3: 1},
            student_epochs={2: 10, 3: 1},
            steps={"flow3": 500, "flow3_student": 150},
            max_lr={1: 3e-3, 2: 3e-3, 3: 2e-3},
            batch_size=256,
            energies="shares",
            noise_mev=SHARP_NOISE_MEV,
        ),
        Preset(
            "tiny",
            None,
            {1: FlowArch(16, 1), 2: FlowArch(16, 1, 16), 3: FlowArch(16, 1, 16)},
            blocks=2,
            bins=4,
            epochs={1: 3, 2: 3, 3: 1},
            max_lr={1: 3e-3, 2: 3e-3, 3: 3e-3},
            batch_size=256,
        ),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}") from None
