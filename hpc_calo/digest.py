"""Fingerprints of requests and checksums of files: how a resumed command recognises its own earlier work."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_READ = 8 * 2**20  # streamed in 8 MiB reads: files may be larger than memory


def fingerprint(fields: dict[str, Any]) -> str:
    """sha256 of the fields as canonical JSON: equal for equal fields, whatever their order."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _feed(h: Any, path: str | os.PathLike[str]) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(_READ):
            h.update(chunk)


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    _feed(h, path)
    return h.hexdigest()


def files_digest(paths: Iterable[Path]) -> str:
    """One sha256 over several files: each file's folder and name, then its bytes, in the order given."""
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{p.parent.name}/{p.name}".encode())
        _feed(h, p)
    return h.hexdigest()
