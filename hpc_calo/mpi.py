"""The MPI step every SPMD command shares: rank 0 validates and plans, then every rank gets the plan."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from hpc_calo.errors import UserError
from hpc_calo.outputs import storage_error

T = TypeVar("T")


def mpi_module() -> Any:
    """``mpi4py.MPI``, initialised with Ctrl-C at its default action (end the process) while MPI_Init runs.

    MPI_Init waits in C for every rank; Python's SIGINT handler only sets a flag there, so a rank interrupted
    inside it would wait forever for a peer that Ctrl-C has already ended, and mpiexec with it. Raises
    ImportError/RuntimeError when mpi4py or an MPI library is missing.
    """
    if threading.current_thread() is not threading.main_thread():
        from mpi4py import MPI

        return MPI
    old = signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        from mpi4py import MPI
    finally:
        signal.signal(signal.SIGINT, old)
    return MPI


def plan_on_rank0(comm: Any, plan: Callable[[], T]) -> tuple[T | None, str | None]:
    """Run ``plan()`` on rank 0 only and broadcast ``(result, None)``, or ``(None, message)`` of its UserError
    (or of a full disk or read-only directory met while planning, e.g. creating the output).

    Only rank 0 touches the inputs and the output's state, so the ranks cannot disagree about them; every rank
    learns of a bad request at the same point, so none is left waiting in a collective call.
    """
    payload: tuple[T | None, str | None] = (None, None)
    if comm.Get_rank() == 0:
        try:
            payload = (plan(), None)
        except UserError as err:
            payload = (None, str(err))
        except OSError as err:
            mapped = storage_error(err, err.filename or "output")
            if mapped is None:
                raise
            payload = (None, str(mapped))
    return comm.bcast(payload, root=0)
