"""Read ahead in a background thread: the one way hpc-calo overlaps reading with the work on what was read."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def prefetch(items: Iterable[T], depth: int = 1, name: str = "prefetch") -> Iterator[T]:
    """Yield ``items``, produced in a background thread up to ``depth`` ahead of the consumer.

    An error in the producer is raised in the consumer; a consumer that stops early stops the producer (after
    the item it is producing), so no thread outlives the loop. Reading and numpy/torch work release the GIL,
    so the two really overlap.
    """
    q: queue.Queue[object] = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as err:  # surface the producer's error in the consumer
            put(err)
            return
        put(done)

    t = threading.Thread(target=work, daemon=True, name=name)
    t.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        t.join()
