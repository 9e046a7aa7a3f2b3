"""Which paths a command may write: the one ownership rule for outputs, checked before any work.

A command replaces an existing output only if it is *of its own kind* (a CaloChallenge HDF5 file it can open,
a report directory carrying the report marker, a pair store); it never replaces one of its own inputs or a
directory holding one; and it refuses up front an output directory it cannot write to or a result that cannot
fit in the free space. Storage failures during the work (disk full, read-only) become one line as well.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from hpc_calo.errors import UserError

# The marker every report directory carries (in report.json): only such a directory is replaced.
REPORT_FORMAT = "hpc-calo-report"


@dataclass(frozen=True)
class Kind:
    name: str  # for messages: "exists and is not a <name>"
    owns: Callable[[Path], bool]  # may this command replace what is at the path?


def _is_calo_file(path: Path) -> bool:
    from hpc_calo.io.hdf5 import CaloFile

    if not path.is_file():
        return False
    try:
        CaloFile(path).close()
    except UserError:
        return False
    return True


def _is_report(path: Path) -> bool:
    try:
        return json.loads((path / "report.json").read_text()).get("format") == REPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _is_store(path: Path) -> bool:
    from hpc_calo.data.store import read_attrs

    return read_attrs(path) is not None


CALO_FILE = Kind("CaloChallenge HDF5 file", _is_calo_file)
REPORT_DIR = Kind("hpc-calo report directory", _is_report)
PAIR_STORE = Kind("hpc-calo pair store", _is_store)


def refuse_inputs(target: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str] | None]) -> None:
    """An output that is one of the command's inputs, or a directory holding one, would destroy it."""
    out = Path(target).resolve()
    for inp in inputs:
        if inp is None:
            continue
        real = Path(inp).resolve()
        if real == out:
            raise UserError(f"{target}: is also an input of this command ({inp}); choose another --out")
        if out in real.parents:
            raise UserError(f"{target}: holds the input {inp}, which replacing it would delete; choose another --out")


def writable_parent(target: str | os.PathLike[str]) -> None:
    parent = Path(os.path.abspath(target)).parent
    if not parent.is_dir():
        raise UserError(f"{target}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(parent).f_flag & os.ST_RDONLY)
        why = "is on a read-only file system" if read_only else "is not writable"
        raise UserError(f"{target}: directory {parent} {why}")


def claim(target: str | os.PathLike[str], kind: Kind | None,
          inputs: Iterable[str | os.PathLike[str] | None] = ()) -> Path:
    """Check an output before any work; returns its absolute path. ``kind`` None: it must not exist."""
    out = Path(os.path.abspath(target))
    refuse_inputs(out, inputs)
    if (out.exists() or out.is_symlink()) and (kind is None or not kind.owns(out)):
        name = kind.name if kind else "file this command wrote"
        raise UserError(f"{out}: exists and is not a{'n' if name[0] in 'aeiouh' else ''} {name}; "
                        "remove it or choose another --out")
    writable_parent(out)
    return out


def mb(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:,.0f}" if n_bytes >= 1e6 else f"{n_bytes / 1e6:.2g}"


def require_space(*needs: tuple[Path, int]) -> None:
    """Refuse up front when the estimated bytes per directory exceed its free space (same device: summed)."""
    per_device: dict[int, tuple[Path, int]] = {}
    for d, n in needs:
        dev = os.stat(d).st_dev
        first, total = per_device.get(dev, (d, 0))
        per_device[dev] = (first, total + n)
    for d, n in per_device.values():
        free = shutil.disk_usage(d).free
        if n > free:
            raise UserError(f"no space left on {d} (needed ~{mb(n)} MB, {mb(free)} MB free)")


_SPACE = (errno.ENOSPC, errno.EDQUOT)


def storage_error(err: BaseException, where: str | os.PathLike[str], needed: int | None = None) -> UserError | None:
    """The one-line UserError for a disk-full / read-only / permission failure, None for anything else.

    h5py reports HDF5 write failures as OSError or RuntimeError without an errno, with the C errno in the text.
    """
    code = getattr(err, "errno", None)
    text = str(err)
    if code in _SPACE or "No space left" in text or "errno = 28" in text or "Disk quota" in text:
        return UserError(f"no space left on {where}" + (f" (needed ~{mb(needed)} MB)" if needed else ""))
    if code == errno.EROFS or "Read-only file system" in text:
        return UserError(f"{where}: read-only file system")
    if code == errno.EACCES:
        return UserError(f"{where}: permission denied")
    return None
