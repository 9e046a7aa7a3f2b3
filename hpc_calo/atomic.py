"""Write-then-rename: the one way hpc-calo produces output files and directories.

A reader either finds the complete result at the target path or nothing: a crash leaves only a temporary
name beside it, which the next attempt overwrites.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_name(target: Path) -> Path:
    # Same directory so the final rename stays on one filesystem (atomic on POSIX).
    return target.with_name(f".{target.name}.tmp-{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; on success rename it to ``target``, on error delete it."""
    target = Path(target)
    tmp = temp_name(target)
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    os.replace(tmp, target)
