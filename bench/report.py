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


def machine() -> dict[str, Any]:
    """What a benchmark ran on: CPU model, cores this process may use, memory, date."""
    import platform
    import time

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "memory_gb": round(mem_gb, 1),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
