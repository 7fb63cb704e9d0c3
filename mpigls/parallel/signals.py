"""Stopping a run on a signal: ``StopSignal`` (the flag) and ``StoppableBlocks`` (a generation's
blocks, cut short once the flag is set).

``StopSignal`` turns SIGTERM / SIGUSR1 (SLURM ``--signal=B:USR1@300``) / SIGINT into a flag; the
training loop agrees on it with ``comm.agree_any(stop.requested)`` at a generation boundary,
writes a checkpoint and exits ``EXIT_PREEMPTED`` so a ``--requeue``d job resumes from it.

A generation can take long (a huge population, a slow bound), so a signal must not wait for its
end. ``StoppableBlocks`` wraps the block indices a rank evaluates: iteration ends early once
``StopSignal.requested`` is set (checked before each block), so the rank reaches the generation's
collectives sooner with partial results. Right after them every rank calls ``agree_stop(comm)``
(one small all-reduce): if any rank cut its blocks short, all ranks drop the generation's partial
work together and the run saves the state of the last *completed* generation, so a resumed run is
bitwise the uninterrupted one.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, overload

from mpigls.parallel.comm import Comm

__all__ = ["StopSignal", "StoppableBlocks"]


class StopSignal:
    """A flag set by SIGTERM / SIGUSR1 / SIGINT. Agree on it at a generation boundary:
    ``if comm.agree_any(stop.requested): save(); return EXIT_PREEMPTED``.

    SIGINT is Ctrl-C (mpiexec forwards it to every rank): the first one stops cleanly with a
    checkpoint like SIGTERM, a second one raises KeyboardInterrupt at once. The handler otherwise
    only assigns attributes (CPython runs handlers between bytecodes on the main thread). Use as a
    context manager to restore the previous handlers.
    """

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None), signal.SIGINT) if s)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without a checkpoint
        self.signum = signum

    def install(self) -> StopSignal:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("StopSignal.install must be called from the main thread")
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev)
        self._previous.clear()

    def __enter__(self) -> StopSignal:
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()


class _Flag(Protocol):
    @property
    def requested(self) -> bool: ...


class StoppableBlocks(Sequence[int]):
    """A read-only sequence of block indices whose iteration stops when ``stop.requested``.

    ``cut_short`` is sticky: once an iteration ended early, it stays True (the run is stopping).
    ``stopped`` is the agreed outcome of the last ``agree_stop``, identical on every rank."""

    def __init__(self, blocks: Sequence[int], stop: _Flag) -> None:
        self._blocks = list(blocks)
        self._stop = stop
        self.cut_short = False
        self.stopped = False

    def __len__(self) -> int:
        return len(self._blocks)

    @overload
    def __getitem__(self, i: int) -> int: ...
    @overload
    def __getitem__(self, i: slice) -> list[int]: ...
    def __getitem__(self, i: int | slice) -> int | list[int]:
        return self._blocks[i]

    def __iter__(self) -> Iterator[int]:
        for block in self._blocks:
            if self.cut_short or self._stop.requested:
                self.cut_short = True
                return
            yield block

    def agree_stop(self, comm: Comm) -> bool:
        """Collective: True on every rank if any rank cut its blocks short in this generation."""
        return self.settle(comm.agree_any(self.cut_short))

    def settle(self, any_cut_short: bool) -> bool:
        """Record the outcome agreed elsewhere (the OR of ``cut_short`` over the ranks, e.g. riding in
        the loss all-gather) as ``stopped``; returns it."""
        self.stopped = bool(any_cut_short)
        return self.stopped
