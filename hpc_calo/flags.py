"""Numeric command-line flags, checked as they are parsed: a bad value is one line that names the flag.

Every ``int``/``float`` flag of every command uses :func:`number` (a test walks the parsers to keep it so), so
no value is silently replaced by a default or reaches the code unchecked.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from hpc_calo.errors import UserError


def number(kind: type, flag: str, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False, hi_open: bool = False) -> Callable[[str], int | float]:
    """An argparse ``type`` for ``flag``: a finite ``kind`` in the range [lo, hi] (open ends when asked).

    It raises UserError (not ValueError, which argparse would turn into a usage dump), so ``run_cli`` prints
    one line. ``parse.bad`` is a value it rejects, for the test that walks every parser.
    """
    noun = "an integer" if kind is int else "a number"
    ends = []
    if lo is not None:
        ends.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        ends.append(f"{'<' if hi_open else '<='} {hi:g}")
    what = noun + (" " + " and ".join(ends) if ends else "")

    def parse(text: object) -> int | float:
        # Also a value from a configuration file or a request: a number is taken as it is, a bool never.
        try:
            if isinstance(text, bool) or not isinstance(text, str | int | float):
                raise ValueError
            value = kind(text)
        except ValueError:
            raise UserError(f"{flag} must be {what}, not {text!r}") from None
        if (not math.isfinite(value) or (lo is not None and (value < lo or (lo_open and value == lo)))
                or (hi is not None and (value > hi or (hi_open and value == hi)))):
            raise UserError(f"{flag} must be {what}, not {text!r}")
        return value

    parse.bad = "nan" if kind is float else str(int(lo) - 1 if lo is not None else int(hi) + 1)  # type: ignore[attr-defined]
    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def positive_int(flag: str) -> Callable[[str], int | float]:
    return number(int, flag, 1)


def non_negative_int(flag: str) -> Callable[[str], int | float]:
    return number(int, flag, 0)


def positive_float(flag: str) -> Callable[[str], int | float]:
    return number(float, flag, 0, lo_open=True)


# The dequantisation noise width in keV: one rule for the flag, a launcher's configuration file and a request.
noise_kev = number(float, "--noise-kev", 0, 1000, lo_open=True)
