"""Progress of long work on rank 0: what, done/total, rate and ETA.

``Progress(what, total, unit=...)`` is told ``update(n)`` as items finish. On a terminal (stderr is a
TTY) it draws a tqdm bar; otherwise (a log file, a pipe, a batch job) it writes one line to stderr
at most every ``every_s`` seconds and a last line when the work is complete::

    certify --verify: 12/100 examples (12%), 0.41 examples/s, ETA 3m35s
    certify --verify: 100/100 examples (100%) in 4m02s, 0.41 examples/s

Only the rank that passes ``enabled=True`` prints (``for_comm``: rank 0); with several ranks rank 0
counts its own share of the work, which the other ranks do at the same pace. Nothing here touches
the numbers of the work it reports on: no random draws, no collectives, no tensors, only a clock.

``MPIGLS_PROGRESS`` in the environment: ``off`` (or ``0``) silences every progress line and bar;
a positive number sets the seconds between log lines (default 30).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from typing import IO, Any

__all__ = ["ENV", "DEFAULT_EVERY_S", "Progress", "for_comm", "format_duration"]

ENV = "MPIGLS_PROGRESS"
DEFAULT_EVERY_S = 30.0


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``; ``?`` for a duration that is not finite."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _settings(environ) -> tuple[bool, float]:
    """(enabled, seconds between log lines) from ``MPIGLS_PROGRESS``."""
    raw = environ.get(ENV, "").strip().lower()
    if raw in ("", "on", "1", "true", "yes"):
        return True, DEFAULT_EVERY_S
    if raw in ("off", "0", "false", "no"):
        return False, DEFAULT_EVERY_S
    try:
        every = float(raw)
    except ValueError:
        every = math.nan
    if not (math.isfinite(every) and every > 0):
        raise ValueError(
            f"{ENV}={environ.get(ENV)!r} is not understood: set it to off (no progress output) or to the "
            "seconds between progress lines in a log, e.g. 60"
        )
    return True, every


class Progress:
    """Done/total of one piece of long work, reported as a tqdm bar (TTY) or periodic log lines.

    ``clock`` and ``say`` exist for tests (a fake clock, a list to collect the lines); ``bar``
    forces (True) or forbids (False) the tqdm bar instead of asking whether ``stream`` is a TTY.
    Use it as a context manager, or call ``close`` (the last line is written only when done ==
    total: work cut short leaves its last periodic line as the record).
    """

    def __init__(
        self,
        what: str,
        total: int,
        *,
        unit: str = "items",
        enabled: bool = True,
        every_s: float | None = None,
        stream: IO[str] | None = None,
        bar: bool | None = None,
        say: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        environ=None,
    ):
        env_on, env_every = _settings(os.environ if environ is None else environ)
        self.what, self.total, self.unit = what, max(int(total), 0), unit
        self.enabled = bool(enabled) and env_on
        self.every_s = env_every if every_s is None else float(every_s)
        self.done = 0
        self._stream = sys.stderr if stream is None else stream
        self._say = say or self._print
        self._clock = clock
        self._start = self._last_line = clock()
        self._closed = False
        self._bar: Any = None
        if self.enabled and (bar if bar is not None else _isatty(self._stream)):
            try:
                from tqdm import tqdm
            except ImportError:  # a log line instead of a bar
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=self.total, desc=what, unit=f" {unit}", file=self._stream, dynamic_ncols=True)

    def _print(self, line: str) -> None:
        print(line, file=self._stream, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def rate(self) -> float:
        """Items per second so far (0 before the first)."""
        elapsed = self._clock() - self._start
        return self.done / elapsed if elapsed > 0 and self.done else 0.0

    def eta(self) -> float:
        """Seconds left at the rate so far (inf before the first item)."""
        rate = self.rate()
        return (self.total - self.done) / rate if rate > 0 else math.inf

    def line(self) -> str:
        """The log line for the current state."""
        pct = 100.0 * self.done / self.total if self.total else 100.0
        head = f"{self.what}: {self.done}/{self.total} {self.unit} ({pct:.0f}%)"
        rate = f"{self.rate():.3g} {self.unit}/s"
        if self.done >= self.total:
            return f"{head} in {format_duration(self._clock() - self._start)}, {rate}"
        return f"{head}, {rate}, ETA {format_duration(self.eta())}"

    def update(self, n: int = 1) -> None:
        """``n`` more items are finished."""
        if not self.enabled or self._closed:
            return
        self.done = min(self.done + int(n), self.total)
        if self._bar is not None:
            self._bar.update(int(n))
            return
        now = self._clock()
        if self.done >= self.total:
            self.close()
        elif now - self._last_line >= self.every_s:
            self._last_line = now
            self._say(self.line())

    def close(self) -> None:
        """End the report: the bar is closed, or the last line written if the work is complete."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.done >= self.total:
            self._say(self.line())


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def for_comm(comm, what: str, total: int, *, unit: str = "items", quiet: bool = False, **kw) -> Progress:
    """A ``Progress`` that reports on rank 0 only (``comm`` None: one process) and not when ``quiet``;
    ``total`` is this rank's share of the work."""
    is_root = comm is None or bool(getattr(comm, "is_root", True))
    return Progress(what, total, unit=unit, enabled=is_root and not quiet, **kw)
