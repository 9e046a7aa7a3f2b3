"""The one way a benchmark reports: JSON on stdout and, when asked, written atomically to a file."""

from __future__ import annotations

import json
import os
from typing import Any

from hpc_calo.atomic import atomic_path


def emit(result: dict[str, Any], out: str | os.PathLike[str] | None, indent: int = 2) -> None:
    text = json.dumps(result, indent=indent)
    print(text)
    if out:
        with atomic_path(out) as tmp:
            tmp.write_text(text + "\n")
