"""The hang watchdog: a generation that takes far longer than the recent ones is reported, naming the
ranks that have not arrived, and (optionally) the job is ended with ``EXIT_HUNG`` so the batch system
can requeue it from the last checkpoint.

A collective waits for its slowest rank: a stopped, swapped-out or deadlocked rank would otherwise
leave the others waiting (and, with MPICH's busy polling, spinning) forever. Every rank marks its
progress through a generation at two points (``mark``: its work is done and it enters the exchange;
the generation is complete) and sends the marks, non-blocking, on a private communicator: the other
ranks to rank 0, rank 0 to all. A daemon thread on every rank (MPI runs in ``THREAD_MULTIPLE``,
mpi4py's default) receives them and watches the clock. Once the running generation exceeds
``max(hang_timeout, FACTOR x the median of the last WINDOW generations)``:

* rank 0 names the ranks whose last mark is behind the furthest one (with their hosts);
* another rank reports only when rank 0 is the one behind (a stopped rank 0 cannot report).

It reports once per generation; with ``abort`` it then ends the whole job (``MPI_Abort``) with
``EXIT_HUNG`` after running ``on_abort`` (rank 0 releases the run-directory lock there).
Only ``MPIComm`` jobs with several ranks are watched (``start`` returns a no-op watchdog otherwise).
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from mpigls.parallel.exitcodes import EXIT_HUNG

__all__ = ["HangWatchdog", "start", "FACTOR", "WINDOW", "EXCHANGE", "DONE"]

FACTOR = 10.0  # a generation this many times the recent median is "far longer"
WINDOW = 20  # generations in the recent median
EXCHANGE, DONE = 0, 1  # the marks of a generation: entered its exchange; completed it
_PHASE = {EXCHANGE: "reached the exchange of", DONE: "completed"}


class HangWatchdog:
    """See the module docstring. Main thread: ``begin(g)`` at the start of generation g (1-based: the
    generation being computed), ``mark(phase)``, ``close()`` at the end. The thread does the rest."""

    def __init__(
        self,
        channel: Any,
        hosts: list[str],
        timeout_s: float,
        *,
        abort: bool,
        say: Callable[[str], None] | None = None,
        on_abort: Callable[[], None] | None = None,
        poll_s: float = 0.1,
    ):
        self._comm, self._hosts = channel, hosts  # a parallel.mpi channel: send / poll / abort
        self.rank, self.size = channel.Get_rank(), channel.Get_size()
        self.timeout_s, self.abort, self._on_abort, self._poll_s = timeout_s, abort, on_abort, poll_s
        self._say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._lock = threading.Lock()
        self._marks = [(0, DONE)] * self.size  # last (generation, phase) seen of every rank
        self._generation, self._t0 = 0, time.monotonic()
        self._recent: deque[float] = deque(maxlen=WINDOW)
        self._reported = -1
        self._stop = threading.Event()
        self.reports: list[str] = []
        self._thread = threading.Thread(target=self._run, name="mpigls-hang-watchdog", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- main thread

    def begin(self, generation: int) -> None:
        with self._lock:
            self._generation, self._t0 = generation, time.monotonic()

    def mark(self, phase: int) -> None:
        """This rank reached ``phase`` of the running generation (non-blocking sends)."""
        with self._lock:
            g = self._generation
            self._marks[self.rank] = (g, phase)
            if phase == DONE:
                self._recent.append(time.monotonic() - self._t0)
        self._comm.send((g, phase), [0] if self.rank != 0 else range(1, self.size))

    def limit_s(self) -> float:
        with self._lock:
            recent = list(self._recent)
        return max(self.timeout_s, FACTOR * statistics.median(recent)) if recent else self.timeout_s

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._drain()

    # ----------------------------------------------------------------- watchdog thread

    def _drain(self) -> None:
        for src, mark in self._comm.poll():
            with self._lock:
                self._marks[src] = max(self._marks[src], tuple(mark))

    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            try:
                self._drain()
                self._check()
            except Exception as exc:  # noqa: BLE001 - the watchdog never takes the job down by itself
                self._say(f"[rank {self.rank}] hang watchdog stopped: {exc}")
                return

    def _check(self) -> None:
        limit = self.limit_s()
        with self._lock:
            g, elapsed, marks = self._generation, time.monotonic() - self._t0, list(self._marks)
            recent = list(self._recent)
        if g == 0 or g == self._reported or elapsed <= limit or marks[self.rank] >= (g, DONE):
            return
        front = max(marks[self.rank], (g - 1, DONE)) if self.rank != 0 else max(marks)
        if self.rank == 0:
            behind = [r for r in range(self.size) if marks[r] < front]
        else:  # rank 0 reports the others; this rank speaks only when rank 0 itself is behind
            behind = [0] if marks[0] < front else []
        if not behind:
            return
        self._reported = g
        hosts = sorted({self._hosts[r] for r in behind})
        waiting = [r for r in range(self.size) if r not in behind]
        median = f"{statistics.median(recent):.3g} s" if recent else "none yet"
        action = (
            f"ending the job with exit code {EXIT_HUNG} so that the batch system can requeue it; it resumes "
            "from the last checkpoint"
            if self.abort
            else "still waiting (train.hang_abort is false)"
        )
        who = f"[rank {self.rank}] " if self.rank != 0 else ""
        msg = (
            f"{who}hang watchdog: generation {g} has run {elapsed:.1f} s, past the limit of {limit:.1f} s "
            f"(train.hang_timeout {self.timeout_s:g} s, or {FACTOR:g}x the recent median of {median}); rank(s) "
            f"{behind} (host(s) {', '.join(hosts)}) have not {_PHASE[front[1]]} generation {front[0]}, while "
            f"rank(s) {waiting} wait for them. A stopped, swapped-out or hung process, or a slow node; {action}"
        )
        self.reports.append(msg)
        self._say(msg)
        if self.abort:
            if self._on_abort is not None:
                self._on_abort()
            self._comm.abort(EXIT_HUNG)


class _Off:
    """The watchdog when it is off: every call does nothing."""

    reports: list[str] = []

    def begin(self, generation: int) -> None:
        pass

    def mark(self, phase: int) -> None:
        pass

    def close(self) -> None:
        pass


def start(
    comm: Any,
    timeout_s: float,
    *,
    abort: bool,
    say: Callable[[str], None] | None = None,
    on_abort: Callable[[], None] | None = None,
) -> HangWatchdog | _Off:
    """A running watchdog for an MPI job (collective: every rank calls it), or a no-op one when it is
    off (``timeout_s`` 0), there is one rank, or the communicator is not MPI."""
    raw = getattr(comm, "watchdog_comm", None)
    if not timeout_s or comm.world_size == 1 or raw is None:
        return _Off()
    import socket

    hosts = comm.allgather_obj(socket.gethostname())
    channel = raw()
    if channel is None:
        if comm.is_root:
            (say or print)(
                "warning: train.hang_timeout is set but MPI was initialised without THREAD_MULTIPLE, which the "
                "hang watchdog needs; it is off (set mpi4py.rc.thread_level = 'multiple', the default)"
            )
        return _Off()
    return HangWatchdog(channel, hosts, timeout_s, abort=abort, say=say, on_abort=on_abort)
