"""Checked types for the numeric options of every command.

A numeric option that parses but means nothing (NaN, an infinity, a negative count, a radius
outside [0, 1]) is refused by argparse at parse time: exit 2 with one line naming the option and
the value. ``count(low)`` is an integer >= low; ``number(low, high)`` a finite float in
[low, high] (either end may be open: ``low_open=True``); ``numbers`` a comma-separated list of
them. Every ``type=`` of a numeric option is one of these (tests/test_hostile_inputs.py walks the
parser to keep it so). Nothing from mpigls is imported: the command layer and the study commands
(``mpigls.studies.cli``, ``diagnose``) share this module.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = ["count", "number", "numbers"]


def count(low: int = 1, what: str = "") -> Callable[[str], int]:
    """An integer >= ``low`` (``what`` says what 0 means, e.g. "0: none")."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            note = f" ({what})" if what else ""
            raise argparse.ArgumentTypeError(f"{text!r} is below {low}; give an integer >= {low}{note}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def number(
    low: float | None = None, high: float | None = None, *, low_open: bool = False, what: str = ""
) -> Callable[[str], float]:
    """A finite float in [low, high] ((low, high] with ``low_open``); None: unbounded on that side."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        below = low is not None and (value <= low if low_open else value < low)
        if below or (high is not None and value > high):
            lo = "(-inf" if low is None else f"{'(' if low_open else '['}{low:g}"
            hi = "inf)" if high is None else f"{high:g}]"
            note = f" ({what})" if what else ""
            raise argparse.ArgumentTypeError(f"{text!r} is outside {lo}, {hi}{note}")
        return value

    parse.__name__ = "finite number"
    return parse


def numbers(low: float | None = None, high: float | None = None, *, low_open: bool = False) -> Callable[[str], list]:
    """A comma-separated list of at least one ``number(low, high)`` (e.g. ``--sigmas 1e-3,1e-2``)."""
    one = number(low, high, low_open=low_open)

    def parse(text: str) -> list[float]:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"{text!r} holds no number; give e.g. 1e-3,1e-2")
        return [one(p) for p in parts]

    parse.__name__ = "comma-separated finite numbers"
    return parse
