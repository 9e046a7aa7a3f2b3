"""Errors a user can fix, and the one wrapper every command line uses to report them.

A ``UserError`` means bad input or a bad request: the CLI prints its message on one line and exits 2,
never with a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any


class UserError(Exception):
    """Bad input, a bad request or a bad environment: the message says what and where."""


class Stopped(BaseException):
    """A long command stopped by SIGTERM/SIGINT after saving its state; the CLI exits with 128 + signum.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` on the way swallows it.
    """

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Run a CLI ``main``: a UserError is one line on stderr and exit code 2; a signal exits 128 + signum."""
    from hpc_calo.outputs import storage_error

    try:
        code = main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        # Disk full, read-only or permission denied somewhere no command anticipated: still one line.
        mapped = storage_error(err, err.filename or "output")
        if mapped is None:
            raise
        print(f"error: {mapped}", file=sys.stderr)
        sys.exit(2)
    except Stopped as err:
        print(str(err), file=sys.stderr)
        sys.exit(128 + err.signum)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    sys.exit(code or 0)


def abort_world(comm: Any, err: BaseException) -> None:
    """End every MPI rank after ``err`` on this one (MPI_Abort): a peer blocked in a collective would wait forever.

    Exit code: 2 for a UserError, 130 for Ctrl-C, 1 for a bug (with its traceback).
    """
    if isinstance(err, UserError):
        print(f"error: rank {comm.Get_rank()}: {err}", file=sys.stderr)
        code = 2
    elif isinstance(err, KeyboardInterrupt):
        print(f"interrupted (rank {comm.Get_rank()})", file=sys.stderr)
        code = 128 + signal.SIGINT
    else:
        traceback.print_exception(err)
        code = 1
    sys.stderr.flush()
    comm.Abort(code)
