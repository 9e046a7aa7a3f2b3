"""The pipeline configuration: every choice of a run, as typed dataclasses.

Precedence: defaults < the site file (``$HPC_CALO_CONFIG``, else ``~/.config/hpc-calo/config.toml``: what a site
always needs, such as the SLURM partition and account) < ``--config FILE`` (TOML or JSON) < command-line flags.
Some defaults follow from other settings: the preset is the dataset's reference preset, ``--out`` is
``runs/<dataset>-<preset>``, and without ``--synthetic`` the training and reference files are the official
CaloChallenge files in the data directory. The resolved configuration is written to ``OUT/config.json`` so a run
folder always says how it was made; re-running with the same ``--out`` resumes that run (every stage skips or
resumes the work already done).
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from data_prep.download import OFFICIAL, default_data_dir, download_command
from hpc_calo.atomic import atomic_path
from hpc_calo.errors import UserError
from hpc_calo.flags import noise_kev
from hpc_calo.precision import PRECISIONS
from hpc_calo.seeding import DEFAULT_SEED

STAGES = ("prep", "teacher", "student", "sample", "evaluate")
# What a per-flow training budget may name, and the units a budget may be given in.
BUDGET_FLOWS = ("flow1", "flow2", "flow3", "flow2_student", "flow3_student")
BUDGET_UNITS = ("epochs", "steps", "minutes")
SITE_ENV = "HPC_CALO_CONFIG"
# What a SLURM name option may hold: these values are written into generated sbatch scripts, where a newline
# or a shell character would inject directives or commands.
_SLURM_NAME = re.compile(r"[A-Za-z0-9_.+-]+(,[A-Za-z0-9_.+-]+)*")
_TIME = re.compile(r"\d{1,5}:\d{2}:\d{2}")
# The settings that decide a run's results; re-running in a run folder with other values is refused.
# Training budgets and epochs may grow (a re-run extends training); resources, devices and thread counts may
# change.
REQUEST_FIELDS = ("dataset", "data", "reference", "synthetic", "showers", "preset", "seed", "val_fraction", "dtype",
                  "sample_dtype", "sample_compile", "noise_kev")


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
    data_dir: str | None = None  # where --data and --reference default to the official file names
    showers: int | None = None  # production size (default: the reference's size)
    preset: str = "tiny"
    seed: int = DEFAULT_SEED
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
    eval_metrics: list[str] | None = None  # the evaluation's metrics (hpc_calo.evaluate --metrics); None: all
    eval_plots: bool = True  # the evaluation's PNG figures
    resources: Resources = field(default_factory=Resources)
    # Where every computing stage runs: cpu or cuda; None: cuda when resources.gpus_per_node > 0, else cpu.
    device: str | None = None
    dtype: str = "float32"  # model precision of training and sampling: float32 or float64
    sample_dtype: str | None = None  # production precision (adds bf16); None: dtype
    sample_compile: bool = False  # production with the students' spline under torch.compile (hpc_calo.sample)
    amp: str = "off"  # GPU training mixed precision: off, tf32 or bf16 (never on a CPU)
    noise_kev: float | None = None  # the teachers' dequantisation noise width; None: the preset's
    threads: int | None = None  # torch CPU threads per process; None: each command's default
    # Training processes at a time on one machine: the teachers (flows 1-3), then the two students, are
    # independent of each other, so with jobs > 1 they run side by side, each with (cores / jobs) threads.
    jobs: int = 1

    @property
    def compute_device(self) -> str:
        return self.device or ("cuda" if self.resources.gpus_per_node else "cpu")

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
        if bool(self.data) == bool(self.synthetic):
            raise UserError("give exactly one of --data FILES or --synthetic N")
        if self.jobs < 1:
            raise UserError(f"--jobs must be at least 1, not {self.jobs}")
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
        if self.device not in (None, "cpu", "cuda"):
            raise UserError(f"--device must be cpu or cuda, not {self.device!r}")
        if self.dtype not in ("float32", "float64"):
            raise UserError(f"--dtype must be float32 or float64, not {self.dtype!r}")
        if self.sample_dtype not in (None, *PRECISIONS):
            raise UserError(f"--sample-dtype must be one of {', '.join(PRECISIONS)}, not {self.sample_dtype!r}")
        if self.amp not in ("off", "tf32", "bf16"):
            raise UserError(f"--amp must be off, tf32 or bf16, not {self.amp!r}")
        if self.amp != "off" and (self.compute_device != "cuda" or self.dtype != "float32"):
            raise UserError(f"--amp {self.amp} needs --device cuda and --dtype float32")
        if self.noise_kev is not None:
            noise_kev(self.noise_kev)
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be positive, not {self.threads}")
        if self.eval_metrics is not None:
            # Here, not at the evaluation: a typo must not surface after hours of training. Imported only then:
            # the evaluation package pulls in torch and matplotlib.
            from hpc_calo.evaluate.config import METRICS

            bad = [m for m in self.eval_metrics if m not in METRICS]
            if bad or not self.eval_metrics:
                raise UserError(f"--eval-metrics: unknown {', '.join(bad) or 'empty list'}; choose from "
                                f"{', '.join(METRICS)}")
        self.resources.validate()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PipelineConfig:
        """The inverse of ``asdict`` (a saved config.json, a SLURM job's argument)."""
        return cls(**{**d, "resources": Resources(**d["resources"])})

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


def site_file() -> Path | None:
    """The site's defaults: ``$HPC_CALO_CONFIG``, else ``$XDG_CONFIG_HOME`` (``~/.config``)/hpc-calo/config.toml."""
    if os.environ.get(SITE_ENV):
        path = Path(os.environ[SITE_ENV]).expanduser()
        if not path.is_file():
            raise UserError(f"${SITE_ENV}={path}: no such file")
        return path
    path = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "hpc-calo" / "config.toml"
    return path if path.is_file() else None


def _official_files(top: dict[str, Any], src: dict[str, str]) -> None:
    """Without --synthetic, unset --data / --reference name the official files in the data directory."""
    if "data_dir" not in top:
        path, why = default_data_dir()
        top["data_dir"], src["data_dir"] = str(path), why
    official, root = OFFICIAL[top["dataset"]], Path(top["data_dir"]).resolve()
    missing: dict[str, list[str]] = {}
    for key, which, names in (("data", "train", official.train), ("reference", "reference", official.reference)):
        if key in top:
            continue
        top[key] = [str(root / n) for n in names] if key == "data" else str(root / names[0])
        src[key] = "default: the official file names in data_dir"
        absent = [n for n in names if not (root / n).is_file()]
        if absent:
            missing[which] = absent
    if missing:
        names = [n for files in missing.values() for n in files]
        which = next(iter(missing)) if len(missing) == 1 else "all"
        raise UserError(f"missing {', '.join(names)} in {root} (the data directory, from {src['data_dir']}); "
                        f"download with: {download_command(top['dataset'], root, which)}")


def resolve(layers: Sequence[tuple[str, dict[str, Any]]]) -> tuple[PipelineConfig, dict[str, str]]:
    """Merge named layers of settings, lowest precedence first (None means not given), then fill the defaults
    that depend on other settings. Returns the configuration and where each setting came from."""
    top: dict[str, Any] = {}
    res: dict[str, Any] = {}
    src: dict[str, str] = {}
    for name, values in layers:
        for key, value in values.items():
            if key == "resources":
                for rkey, rvalue in value.items():
                    if rvalue is not None:
                        res[rkey], src[f"resources.{rkey}"] = rvalue, name
            elif key == "budget":  # per flow: a flag's budget for one flow keeps the file's for the others
                for flow, amount in (value or {}).items():
                    top.setdefault("budget", {})[flow], src[f"budget.{flow}"] = amount, name
            elif value is not None:
                top[key], src[key] = value, name
    if "dataset" not in top:
        raise UserError("--dataset is required (on the command line or in --config)")
    if top["dataset"] not in OFFICIAL:
        raise UserError(f"--dataset must be ds2 or ds3, not {top['dataset']!r}")
    if "preset" not in top:
        top["preset"], src["preset"] = top["dataset"], "default: the dataset's reference preset"
    if "out" not in top:
        top["out"], src["out"] = f"runs/{top['dataset']}-{top['preset']}", "default: runs/<dataset>-<preset>"
    if not top.get("synthetic"):
        _official_files(top, src)
    cfg = PipelineConfig(**top, resources=Resources(**res))
    cfg.validate()
    return cfg, src


def explain(cfg: PipelineConfig, sources: dict[str, str]) -> str:
    """Every resolved setting, its value and where it came from (flag, config file, site file, default)."""
    rows = [(f.name, getattr(cfg, f.name)) for f in fields(cfg) if f.name not in ("resources", "budget")]
    rows += [(f"budget.{flow}", amount) for flow, amount in cfg.budget.items()] or [("budget", None)]
    rows += [(f"resources.{f.name}", getattr(cfg.resources, f.name)) for f in fields(cfg.resources)]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'setting':{width}}  value  [where it came from]"]
    for name, value in rows:
        shown = " ".join(map(str, value)) if isinstance(value, list) else ("-" if value is None else str(value))
        lines.append(f"{name:{width}}  {shown}  [{sources.get(name, 'default')}]")
    return "\n".join(lines)
