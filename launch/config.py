"""The pipeline configuration: every choice of a run, as typed dataclasses.

Precedence: defaults < ``--config FILE`` (TOML or JSON) < command-line flags. The resolved configuration is
written to ``OUT/config.json`` so a run folder always says how it was made; re-running with the same ``--out``
resumes that run (every stage skips or resumes the work already done).
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from hpc_calo.atomic import atomic_path
from hpc_calo.errors import UserError

STAGES = ("prep", "teacher", "student", "sample", "evaluate")
# What a per-flow training budget may name, and the units a budget may be given in.
BUDGET_FLOWS = ("flow1", "flow2", "flow3", "flow2_student", "flow3_student")
BUDGET_UNITS = ("epochs", "steps", "minutes")
# What a SLURM name option may hold: these values are written into generated sbatch scripts, where a newline
# or a shell character would inject directives or commands.
_SLURM_NAME = re.compile(r"[A-Za-z0-9_.+-]+(,[A-Za-z0-9_.+-]+)*")
_TIME = re.compile(r"\d{1,5}:\d{2}:\d{2}")
# The settings that decide a run's results; re-running in a run folder with other values is refused.
# Training budgets and epochs may grow (a re-run extends training), resources may change.
REQUEST_FIELDS = ("dataset", "data", "reference", "synthetic", "showers", "preset", "seed", "val_fraction")


@dataclass
class Resources:
    """What one SLURM job asks for; ignored by ``--cluster local``."""

    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 2
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "01:00:00"  # HH:MM:SS per job; training jobs requeue and resume when it runs out
    mem_gb: int | None = None
    # Seconds before the time limit at which SLURM signals the job so it can checkpoint and requeue.
    signal_delay_s: int = 90
    # Requeues a training job may use before giving up; a multi-day training under a 24 h limit needs several.
    max_requeues: int = 20

    def validate(self) -> None:
        for name in ("partition", "account", "qos"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and _SLURM_NAME.fullmatch(value)):
                raise UserError(f"--{name} {value!r}: only letters, digits, '_', '.', '-', '+' (and commas "
                                "between names) may reach a SLURM script")
        for name, low in (("nodes", 1), ("gpus_per_node", 0), ("cpus_per_task", 1), ("signal_delay_s", 0),
                          ("max_requeues", 0), ("mem_gb", 1)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise UserError(f"--{name.replace('_', '-')} must be an integer >= {low}, not {value!r}")
        self.minutes()

    def minutes(self) -> int:
        if not isinstance(self.time, str) or not _TIME.fullmatch(self.time):
            raise UserError(f"--time must be HH:MM:SS, not {self.time!r}")
        h, m, s = (int(x) for x in self.time.split(":"))
        minutes = max(1, h * 60 + m + (1 if s else 0))
        if minutes * 60 <= self.signal_delay_s + 60:
            # SLURM may send --signal up to 60 s early: an attempt could be signalled as it starts, every time.
            raise UserError(f"--time {self.time} is too short: SLURM signals a job --signal-delay-s "
                            f"({self.signal_delay_s} s) before its limit and up to 60 s earlier; give more than "
                            f"{self.signal_delay_s + 60} s")
        return minutes


@dataclass
class PipelineConfig:
    dataset: str
    out: str
    data: list[str] = field(default_factory=list)  # CaloChallenge training files (real or synthetic)
    reference: str | None = None  # held-out file: evaluation reference and production energies
    synthetic: int | None = None  # make a synthetic training set of this many showers instead of --data
    showers: int | None = None  # production size (default: the reference's size)
    preset: str = "tiny"
    seed: int = 1
    val_fraction: float = 0.1
    prep_ranks: int = 2
    workers: int = 1  # Ray Train workers for the flow-3 teacher and student
    sample_backend: str = "local"  # local | mpi | ray
    sample_workers: int = 2
    epochs: int | None = None  # override every flow's preset epochs (quick runs)
    # Per-flow budgets, e.g. {"flow1": {"epochs": 300}, "flow3": {"minutes": 120}}: one unit per flow; they win
    # over ``epochs``. Changing a budget and re-running extends (or ends) that flow's training.
    budget: dict[str, dict[str, float]] = field(default_factory=dict)
    eval_epochs: int = 50  # classifier epochs of the evaluation (official: 50)
    resources: Resources = field(default_factory=Resources)

    @property
    def root(self) -> Path:
        return Path(self.out).resolve()

    def path(self, name: str) -> Path:
        """Every artefact of a run lives at a fixed place under OUT."""
        return self.root / {
            "config": "config.json",
            "data": "data",
            "store": "store.zarr",
            "run": "run",
            "production": "production.h5",
            "report": "report",
            "logs": "logs",
        }[name]

    def budget_for(self, flow: int, student: bool = False) -> dict[str, float]:
        """The training budget of one flow: {unit: amount}, or {} for the preset's epochs."""
        b = self.budget.get(f"flow{flow}" + ("_student" if student else ""))
        if b:
            return dict(b)
        return {"epochs": self.epochs} if self.epochs is not None else {}

    def training_files(self) -> list[Path]:
        if self.synthetic:
            return [self.path("data") / "train.h5"]
        return [Path(p).resolve() for p in self.data]

    def reference_file(self) -> Path:
        if self.reference:
            return Path(self.reference).resolve()
        return self.path("data") / "reference.h5"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PipelineConfig:
        return cls(**{**d, "resources": Resources(**d["resources"])})

    def request(self) -> dict[str, Any]:
        """The settings that decide the results, with paths resolved (a re-run from elsewhere is the same)."""
        d = {k: getattr(self, k) for k in REQUEST_FIELDS}
        d["data"] = [str(p) for p in self.training_files()]
        d["reference"] = str(self.reference_file())
        return d

    def validate(self) -> None:
        if any(c.isspace() or not c.isprintable() for c in str(self.out)):
            # The run folder's paths are written into SLURM scripts and job arguments.
            raise UserError(f"--out {self.out!r}: a run folder path may not hold spaces or control characters")
        if self.dataset not in ("ds2", "ds3"):
            raise UserError(f"--dataset must be ds2 or ds3, not {self.dataset!r}")
        if bool(self.data) == bool(self.synthetic):
            raise UserError("give exactly one of --data FILES or --synthetic N")
        if self.synthetic is not None and self.synthetic < 100:
            raise UserError("--synthetic needs at least 100 showers")
        if self.data and not self.reference:
            raise UserError("--data needs --reference REF.h5 (the held-out file used for evaluation)")
        for p in [*self.data, *([self.reference] if self.reference else [])]:
            if not Path(p).is_file():
                raise UserError(f"{p}: no such file")
        if self.showers is not None and self.showers <= 0:
            raise UserError("--showers must be positive")
        for name, b in self.budget.items():
            if name not in BUDGET_FLOWS:
                raise UserError(f"budget: unknown flow {name!r}; choose from {', '.join(BUDGET_FLOWS)}")
            if not isinstance(b, dict) or len(b) != 1 or next(iter(b)) not in BUDGET_UNITS:
                raise UserError(f"budget {name}: give exactly one of {', '.join(BUDGET_UNITS)}, not {b!r}")
            (unit, amount), = b.items()
            if not isinstance(amount, int | float) or not amount > 0 or (unit != "minutes" and amount != int(amount)):
                kind = "number" if unit == "minutes" else "integer"
                raise UserError(f"budget {name}: {unit} must be a positive {kind}, not {amount!r}")
        if self.sample_backend not in ("local", "mpi", "ray"):
            raise UserError(f"--sample-backend must be local, mpi or ray, not {self.sample_backend!r}")
        self.resources.validate()

    def save(self) -> None:
        """Write config.json, refusing a folder that is not a run folder or holds a run of another request.

        Resources, worker counts and training budgets may change between attempts (where and how long, not what).
        """
        path = self.path("config")
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"{self.root}: exists and is not a run folder; remove it or choose another --out")
        if path.exists():
            try:
                old = PipelineConfig.from_dict(json.loads(path.read_text())).request()
            except (OSError, ValueError, TypeError, KeyError) as err:
                raise UserError(f"{path}: unreadable run configuration ({err}); choose another --out") from None
            new = self.request()
            diff = [f"{k} {old.get(k)!r} there vs {v!r} now" for k, v in new.items() if old.get(k) != v]
            if diff:
                raise UserError(f"{self.root}: holds a run of a different request ({'; '.join(diff)}); re-run with "
                                "the same settings to resume it, or choose another --out")
        elif self.root.is_dir() and any(self.root.iterdir()):
            raise UserError(f"{self.root}: exists and is not an hpc-calo run folder (no config.json); remove it or "
                            "choose another --out")
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")


def _merge(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise UserError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))}")
    return values


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or JSON configuration file into plain dicts (``[resources]`` is a table)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such configuration file")
    try:
        data = tomllib.loads(p.read_text()) if p.suffix == ".toml" else json.loads(p.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{p}: cannot parse: {err}") from None
    _merge(PipelineConfig, {k: v for k, v in data.items() if k != "resources"}, str(p))
    _merge(Resources, data.get("resources", {}), f"{p} [resources]")
    return data


def resolve(file_values: dict[str, Any], flag_values: dict[str, Any]) -> PipelineConfig:
    """Defaults, then the file, then the flags that were given (None means not given)."""
    res = {**file_values.get("resources", {}), **{k: v for k, v in flag_values.pop("resources", {}).items()
                                                  if v is not None}}
    top = {k: v for k, v in file_values.items() if k != "resources"}
    budget = {**top.pop("budget", {}), **(flag_values.pop("budget", None) or {})}
    top.update({k: v for k, v in flag_values.items() if v is not None})
    if budget:
        top["budget"] = budget
    if "dataset" not in top or "out" not in top:
        raise UserError("--dataset and --out are required (on the command line or in --config)")
    cfg = PipelineConfig(**top, resources=Resources(**res))
    cfg.validate()
    return cfg
