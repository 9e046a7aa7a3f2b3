"""Write-behind: the caller produces items (GPU or CPU generation) while a thread consumes them (HDF5 writes,
gzip, hashing), so generation never waits on the disk. Generation stays in the calling thread, where its
torch settings (threads, CUDA graphs) live."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")
_DONE = object()


def write_behind(items: Iterable[T], consume: Callable[[T], None], depth: int = 2) -> None:
    """``consume(item)`` for every item, in order, in one background thread; at most ``depth`` items wait.

    A consumer error stops the producer at its next item and is raised here; a producer error stops the
    consumer after the items already queued and propagates unchanged.
    """
    q: queue.Queue[object] = queue.Queue(maxsize=depth)
    failed: list[BaseException] = []

    def work() -> None:
        while (item := q.get()) is not _DONE:
            if failed:
                continue  # drain, so the producer never blocks on a full queue
            try:
                consume(item)  # type: ignore[arg-type]
            except BaseException as err:
                failed.append(err)

    t = threading.Thread(target=work, daemon=True, name="write-behind")
    t.start()
    try:
        for item in items:
            if failed:
                break
            q.put(item)
    finally:
        q.put(_DONE)
        t.join()
    if failed:
        raise failed[0]
