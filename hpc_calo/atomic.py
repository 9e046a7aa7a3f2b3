"""Write-then-rename: the one way hpc-calo produces output files and directories.

A reader either finds the complete result at the target path or nothing. The temporary name is
``.NAME.tmp-HOST-PID`` beside the target; a crash (even kill -9) leaves only that, and the next attempt on
the same target removes the temporaries of its own target whose process on this host is gone. Nothing is
removed by pattern elsewhere, and an existing directory is replaced only when its ``kind`` says it may be
(see hpc_calo.outputs).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hpc_calo.outputs import Kind, claim

_HOST = socket.gethostname().replace("/", "_")


def temp_name(target: Path, tag: str = "tmp") -> Path:
    # Same directory so the final rename stays on one filesystem (atomic on POSIX).
    return target.with_name(f".{target.name}.{tag}-{_HOST}-{os.getpid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temps(target: Path) -> list[Path]:
    """Temporaries of ``target`` left by dead processes of this host (another host's may still be in use)."""
    found = []
    for tag in ("tmp", "old"):
        prefix = f".{target.name}.{tag}-{_HOST}-"
        for p in target.parent.glob(glob.escape(prefix) + "*"):
            pid = p.name[len(prefix):]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                found.append(p)
    return found


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(target: str | os.PathLike[str], kind: Kind | None = None, sweep: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success rename it to ``target``, on error delete it.

    With ``kind`` the target is claimed first (hpc_calo.outputs.claim: an existing target must be of that
    kind). Without it an existing file is replaced (a command's own files inside a folder it owns) but an
    existing directory never is. ``sweep=False`` skips removing the target's stale temporaries: finding them
    scans the whole directory, so a writer of many files in one directory (the sampler's parts) sweeps once
    for all of them instead of once per file.
    """
    target = Path(os.path.abspath(target))
    if kind is not None:
        claim(target, kind)
    for stale in stale_temps(target) if sweep else ():
        remove(stale)
    tmp = temp_name(target)
    remove(tmp)
    try:
        yield tmp
    except BaseException:
        remove(tmp)
        raise
    if target.is_dir() and not target.is_symlink():
        if kind is None or not kind.owns(target):
            remove(tmp)
            claim(target, kind)  # raises: the directory appeared meanwhile and is not ours
        old = temp_name(target, "old")
        os.replace(target, old)
        os.replace(tmp, target)
        remove(old)
    else:
        os.replace(tmp, target)
