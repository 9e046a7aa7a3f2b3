"""The parts directory: one uncompressed CaloChallenge file per shard plus one small JSON record per part.

Layout of ``<out>.parts/``::

    request.json        the plan's fingerprint and the fields it hashes (written once, atomically)
    part-000000.h5      shard 0 (rows 0..S-1 of the output), written to a temporary name and renamed
    part-000000.json    its manifest record (count, seed, sha256, ...), written only after the rename
    ...

A shard counts as done exactly when its record exists, names this request's fingerprint and its part file
is there with the recorded size. Records are per part, so concurrent writers (Ray actors, MPI ranks on many
nodes of a shared filesystem) never touch the same file and need no lock; a writer killed at any moment
leaves at most a temporary file or a part without a record, and both mean "not done". Its temporaries are
swept once, by the gather, not by every write: a sweep scans the directory, which holds two files per shard.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from hpc_calo.atomic import atomic_path, remove
from hpc_calo.background import write_behind
from hpc_calo.errors import UserError
from hpc_calo.io import CaloWriter
from hpc_calo.sample.plan import Plan, Shard

REQUEST = "request.json"


def default_parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


class PartsDir:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def part_path(self, index: int) -> Path:
        return self.path / f"part-{index:06d}.h5"

    def record_path(self, index: int) -> Path:
        return self.path / f"part-{index:06d}.json"

    def claim(self, plan: Plan) -> None:
        """Create the directory for ``plan`` or check that an existing one belongs to the same request."""
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"{self.path}: exists and is not a directory (it would hold the shard parts)")
        request = self.path / REQUEST
        if request.exists():
            try:
                old = json.loads(request.read_text())
            except (OSError, ValueError) as err:
                raise UserError(f"{request}: unreadable ({err}); delete {self.path} to start afresh") from None
            if old.get("fingerprint") != plan.fingerprint:
                theirs = old.get("request", {})
                diff = [
                    f"{k} {theirs.get(k)!r} here vs {v!r} requested"
                    for k, v in plan.description.items()
                    if theirs.get(k) != v
                ]
                raise UserError(
                    f"{self.path}: holds parts of a different request ({'; '.join(diff) or 'other fingerprint'}); "
                    "delete it or choose another --parts-dir"
                )
            return
        try:
            self.path.mkdir(exist_ok=True)
        except OSError as err:
            raise UserError(f"{self.path}: cannot create the parts directory: {err.strerror}") from None
        with atomic_path(request) as tmp:
            tmp.write_text(json.dumps({"fingerprint": plan.fingerprint, "request": plan.description}, indent=1))

    def finished(self, plan: Plan) -> np.ndarray:
        """One bool per shard of ``plan``: its record names this request and its part has the recorded size.

        One directory scan and one record read per part found; nothing per shard of the plan but the bitmap.
        """
        done = np.zeros(len(plan.shards), dtype=bool)
        for index in self._recorded():
            if index < len(done) and self.valid(plan, index) is not None:
                done[index] = True
        return done

    def valid(self, plan: Plan, index: int) -> dict[str, Any] | None:
        """The record of shard ``index`` if it is a finished shard of ``plan``, else None."""
        rec = self.record(index)
        if rec is None or rec.get("fingerprint") != plan.fingerprint or rec.get("count") != plan.shards[index].count:
            return None
        try:
            size = self.part_path(index).stat().st_size
        except FileNotFoundError:
            return None
        return rec if size == rec.get("bytes") else None

    def record(self, index: int) -> dict[str, Any] | None:
        try:
            return json.loads(self.record_path(index).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _recorded(self) -> Iterator[int]:
        """Indices of the records in the directory, whoever wrote them, in directory order."""
        try:
            with os.scandir(self.path) as entries:
                for e in entries:
                    n = e.name
                    if n.startswith("part-") and n.endswith(".json") and n[5:-5].isdigit():
                        yield int(n[5:-5])
        except FileNotFoundError:
            return

    def recorded_count(self) -> int:
        """Cheap progress probe (one directory scan): how many parts have a record."""
        return sum(1 for _ in self._recorded())

    def write(
        self, plan: Plan, shard: Shard, energies: np.ndarray, batches: Iterable[np.ndarray], seconds: float = 0.0
    ) -> None:
        """Stream the shard's showers (consecutive row batches) into its part, then record it."""
        t0 = time.perf_counter()
        part = self.part_path(shard.index)
        digest = hashlib.sha256(np.ascontiguousarray(energies, dtype="<f8").data)
        # Uncompressed: parts are temporary and the gather re-chunks (and compresses) anyway.
        with CaloWriter(part, plan.geometry, n_total=shard.count, compression="none", kind=None,
                        sweep=False) as w:

            def write(showers: np.ndarray) -> None:
                showers = np.ascontiguousarray(showers, dtype="<f4")
                a = w.n_written
                w.write(energies[a : a + len(showers)], showers)
                digest.update(showers.data)

            # The writer thread writes and hashes batch k while the caller generates batch k + 1.
            write_behind(batches, write)
        record = {
            "shard": shard.index,
            "start": shard.start,
            "count": shard.count,
            "seed": plan.request.seed,
            "sha256": digest.hexdigest(),
            "bytes": part.stat().st_size,
            "fingerprint": plan.fingerprint,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "seconds": round(seconds + time.perf_counter() - t0, 3),
            "time": time.time(),
        }
        with atomic_path(self.record_path(shard.index), sweep=False) as tmp:
            tmp.write_text(json.dumps(record))

    def discard(self, index: int) -> None:
        self.record_path(index).unlink(missing_ok=True)
        self.part_path(index).unlink(missing_ok=True)

    def _own_temps(self, plan: Plan) -> Iterable[Path]:
        # Every worker has finished when this runs, so the temporaries of any host are stale.
        for entry in os.scandir(self.path):
            name, tmp, _ = entry.name[1:].partition(".tmp-")
            part = re.fullmatch(r"part-(\d{6,})\.(h5|json)", name)
            if entry.name.startswith(".") and tmp and (name == REQUEST or (part and int(part[1]) < len(plan.shards))):
                yield Path(entry.path)

    def clean_temps(self, plan: Plan) -> None:
        """Drop the temporaries that killed writers of this plan's parts left behind."""
        for p in self._own_temps(plan):
            remove(p)

    def remove(self, plan: Plan) -> None:
        """Remove what the sampler wrote here (never the user's files), then the directory if that empties it."""
        self.clean_temps(plan)
        for i in range(len(plan.shards)):
            self.discard(i)
        (self.path / REQUEST).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # other files are in it: not ours to delete
            self.path.rmdir()
