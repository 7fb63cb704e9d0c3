"""Stop a generation in progress: this rank's work blocks, iterated only while no stop signal is set.

A generation can take long (a huge population, a slow bound), so SIGTERM / SIGUSR1 / SIGINT must
not wait for its end. ``StoppableBlocks`` wraps the block indices a rank evaluates: iteration
ends early once ``StopSignal.requested`` is set (checked before each block), so the rank reaches
the generation's collectives sooner with partial results. Right after them every rank calls
``agree_stop(comm)`` (one small all-reduce): if any rank cut its blocks short, all ranks drop the
generation's partial work together and the run saves the state of the last *completed*
generation, so a resumed run is bitwise the uninterrupted one.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

__all__ = ["StoppableBlocks"]


class StoppableBlocks(Sequence):
    """A read-only sequence of block indices whose iteration stops when ``stop.requested``.

    ``cut_short`` is sticky: once an iteration ended early, it stays True (the run is stopping).
    ``stopped`` is the agreed outcome of the last ``agree_stop``, identical on every rank."""

    def __init__(self, blocks: Sequence[int], stop) -> None:
        self._blocks = list(blocks)
        self._stop = stop
        self.cut_short = False
        self.stopped = False

    def __len__(self) -> int:
        return len(self._blocks)

    def __getitem__(self, i):
        return self._blocks[i]

    def __iter__(self) -> Iterator[int]:
        for block in self._blocks:
            if self.cut_short or self._stop.requested:
                self.cut_short = True
                return
            yield block

    def agree_stop(self, comm) -> bool:
        """Collective: True on every rank if any rank cut its blocks short in this generation."""
        self.stopped = comm.agree_any(self.cut_short)
        return self.stopped
