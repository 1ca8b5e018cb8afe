"""``type=`` callables of the jobs' numeric options: a value out of range ends the job at parsing, with
argparse's usage line and one line naming the option (exit 2), instead of reaching Ray, where
``--num-workers 0`` or ``--num-samples 0`` waited for ever.

Light to import (standard library only): every job's ``--help`` builds its parser with them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


def _number(kind: type, low: float, what: str, strict: bool = False) -> Callable[[str], int | float]:
    """A parser of ``kind`` values ``>= low`` (``> low`` when ``strict``); NaN is refused."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}. Got {text!r}") from None
        if not (value > low if strict else value >= low):  # NaN compares False
            raise argparse.ArgumentTypeError(f"must be {what}. Got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in its own messages
    return parse


#: An integer >= 1 (workers, trials, folds' members, batch sizes, image sides).
positive_int = _number(int, 1, "an integer >= 1")
#: An integer >= 0 (retries).
non_negative_int = _number(int, 0, "an integer >= 0")
#: An integer >= 2 (folds of the fold job).
two_or_more = _number(int, 2, "an integer >= 2")
#: A number >= 0 (GPUs per task).
non_negative_float = _number(float, 0.0, "a number >= 0")
#: A number > 0 (CPUs per worker, seconds).
positive_float = _number(float, 0.0, "a number > 0", strict=True)


def fold_count(text: str) -> int:
    """Folds of a cross-validated ensemble: 0 (off, where the job allows it) or an integer >= 2."""
    value = non_negative_int(text)
    if value == 1:
        raise argparse.ArgumentTypeError("must be 0 (no folds) or an integer >= 2. Got '1'")
    return value
