"""The run folder: the one module that knows its layout. Every other module asks it for a path.

```
RUN_DIR/run.json                  the run record: dataset, preset, store, trained E_inc range, versions
RUN_DIR/flow{k}[_student]/        one folder per trained flow (k = 1, 2, 3; students for flows 2 and 3)
    best.pt                       the standalone model the generation chain loads
    checkpoint.pt                 the full training state, for an exact resume
    metrics.jsonl, config.json    the training log and the job's settings
    diagnostics.json              a student's quality against its teacher
    workers/rank{r}.json          under Ray Train: each rank's host, pid, shard and loader mode
RUN_DIR/ray/                      Ray Train's own run records
```

The training loop only ever sees one flow folder, so the files inside a flow folder are functions of that
folder; the rest are functions of the run folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hpc_calo.atomic import atomic_path
from hpc_calo.errors import UserError

RUN_FORMAT = "hpc-calo-run"
_RUN_FILE = "run.json"
_WEIGHTS = "best.pt"

PathLike = str | os.PathLike[str]


def flow_dir(run_dir: PathLike, flow: int, student: bool = False) -> Path:
    return Path(run_dir) / (f"flow{flow}" + ("_student" if student else ""))


def weights(run_dir: PathLike, flow: int, student: bool = False) -> Path:
    """``RUN_DIR/flow{k}[_student]/best.pt``."""
    return weights_in(flow_dir(run_dir, flow, student))


def weights_in(flow_folder: PathLike) -> Path:
    return Path(flow_folder) / _WEIGHTS


def checkpoint_in(flow_folder: PathLike) -> Path:
    return Path(flow_folder) / "checkpoint.pt"


def metrics_in(flow_folder: PathLike) -> Path:
    return Path(flow_folder) / "metrics.jsonl"


def config_in(flow_folder: PathLike) -> Path:
    return Path(flow_folder) / "config.json"


def diagnostics_in(flow_folder: PathLike) -> Path:
    """A student's quality against its teacher (``python -m hpc_calo.distill``)."""
    return Path(flow_folder) / "diagnostics.json"


def worker_record(flow_folder: PathLike, rank: int) -> Path:
    return Path(flow_folder) / "workers" / f"rank{rank}.json"


def ray_dir(run_dir: PathLike) -> Path:
    return Path(run_dir) / "ray"


def run_file(run_dir: PathLike) -> Path:
    return Path(run_dir) / _RUN_FILE


def weight_files(run_dir: PathLike) -> list[Path]:
    """Every trained model of the run (teachers and students), in a fixed order."""
    return sorted(Path(run_dir).glob(f"flow*/{_WEIGHTS}"))


def read_run(run_dir: PathLike) -> dict[str, Any]:
    """The run record; UserError for a folder that is not a run or a record that is not ours."""
    path = run_file(run_dir)
    if not path.is_file():
        raise UserError(f"{run_dir}: not a run folder (no {_RUN_FILE}; train the flows with python -m hpc_calo.train)")
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable run record: {err}") from None
    if not isinstance(obj, dict) or obj.get("format") != RUN_FORMAT:
        raise UserError(f"{path}: not an hpc-calo run record")
    return obj


def write_run(run_dir: PathLike, record: dict[str, Any]) -> None:
    write_json(run_file(run_dir), {"format": RUN_FORMAT, **record})


def require_run(run_dir: PathLike) -> None:
    """A cheap check before anything heavy starts (the chain names missing model files itself)."""
    if not Path(run_dir).is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    if not run_file(run_dir).is_file():
        raise UserError(f"{run_dir}: not a run directory (no {_RUN_FILE})")


def write_json(path: PathLike, obj: dict[str, Any]) -> None:
    """A JSON record of the run folder, written atomically (a reader never sees half of one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
