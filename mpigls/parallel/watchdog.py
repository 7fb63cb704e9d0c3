"""The hang watchdog: a rank that waits in a collective operation for another rank that makes no
progress is reported, naming that rank, and (optionally) the job is ended with ``EXIT_HUNG`` so the
batch system can requeue it from the last checkpoint.

A collective waits for its slowest rank: a stopped, swapped-out or deadlocked rank would otherwise
leave the others waiting (and, with MPICH's busy polling, spinning) forever. A stopped process sends
nothing, so nothing a rank announces about itself can reveal that it stopped; what the watchdog
watches is *progress*. ``MPIComm`` counts every collective operation a rank enters and leaves (its
*position*: all ranks pass through the same sequence of collectives), and the training loop names
the phase a rank is in (evaluate, exchange, tell, validate, checkpoint, done), for the report only.
A daemon thread on every rank (MPI runs in ``THREAD_MULTIPLE``, mpi4py's default) sends its rank's
position, generation and phase on a private communicator whenever they change and at least every
``BEAT_S`` seconds (the other ranks to rank 0, rank 0 to all), receives the others', and watches the
clock. Once the running generation exceeds ``max(hang_timeout, FACTOR x the median of the last
WINDOW generations)`` (counted at most at the limit, and not at all when this rank reported it: a
stopped rank must not raise the limit for the next one) and this rank is waiting inside a collective
(``verdict``):

* the ranks *behind* (not yet at the collective the waiting ranks are in, position unchanged for
  ``STILL_S``) are named: a rank stopped or stuck in computation, I/O or a phase without collectives;
* else the ranks *silent* for ``SILENCE_S`` (a stopped or frozen process sends no heartbeat, even
  when it stopped inside the very collective the others wait in) are named;
* else, when every rank has been inside the same collective for ``SILENCE_S`` and is still heard,
  the collective itself does not complete (an MPI or network fault), and rank 0 says so.

Rank 0 knows every rank's progress; another rank knows rank 0's and reports only when rank 0 is the
one named (a stopped rank 0 cannot report). It reports once per generation; with ``abort`` it then ends
the whole job (``MPI_Abort``) with ``EXIT_HUNG`` after running ``on_abort`` (rank 0 releases the
run-directory lock there). The final evaluation of a run is watched too (``final_evaluation``), for
silent ranks only. Only ``MPIComm`` jobs with several ranks are watched (``start`` returns a
no-op watchdog otherwise). A rank that computes longer than the limit without any collective while
the others wait is reported too (a slow node): the limit scales with the recent generations for that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from mpigls.parallel.exitcodes import EXIT_HUNG

__all__ = [
    "HangWatchdog",
    "Seen",
    "start",
    "final_evaluation",
    "verdict",
    "FACTOR",
    "WINDOW",
    "BEAT_S",
    "SILENCE_S",
    "STILL_S",
]
__all__ += ["EVALUATE", "EXCHANGE", "TELL", "VALIDATE", "CHECKPOINT", "DONE"]

FACTOR = 10.0  # a generation this many times the recent median is "far longer"
WINDOW = 20  # generations in the recent median
BEAT_S = 0.5  # a live rank's watchdog thread sends its state at least this often
SILENCE_S = 3.0  # a rank not heard from for this long is stopped or frozen
STILL_S = 1.0  # a rank behind is named only when its position has not moved for this long (messages lag)
# the phases of a generation, as the training loop marks them (named in reports)
EVALUATE, EXCHANGE, TELL, VALIDATE, CHECKPOINT, DONE = "evaluate", "exchange", "tell", "validate", "checkpoint", "done"


@dataclasses.dataclass(frozen=True)
class Seen:
    """What a rank last heard of another: its position (2n-1: inside collective n; 2n: past it), its
    generation and phase, when it was heard and when its position last changed (monotonic seconds)."""

    position: int = 0
    generation: int = 0
    phase: str = ""
    heard: float = 0.0
    moved: float = 0.0

    @property
    def inside(self) -> bool:
        return self.position % 2 == 1


def verdict(
    rank: int, seen: Sequence[Seen | None], now: float, silence_s: float = SILENCE_S, only_silent: bool = False
) -> tuple[str, list[int], list[int]] | None:
    """Whom a rank that waits past the limit names: ``(kind, named, waiting)`` with kind ``behind``,
    ``silent`` or ``stuck`` (every rank inside one collective and alive: named is empty), or None (no one
    to name from here; ``only_silent``: none but silent ranks). ``seen[r]`` is None for a rank this rank
    hears nothing of (rank 0 hears all; the others hear rank 0); ``seen[rank]`` is this rank itself, which
    must be inside a collective."""
    known = [r for r, s in enumerate(seen) if s is not None]
    me = seen[rank]
    if me is None or not me.inside:
        return None
    front = max(seen[r].position for r in known if seen[r].inside)  # type: ignore[union-attr]
    waiting = [r for r in known if seen[r].position >= front]  # type: ignore[union-attr]
    others = [r for r in known if r != rank]
    if rank != 0:
        others = [0] if 0 in others else []
    behind = [r for r in others if seen[r].position < front and now - seen[r].moved > STILL_S]  # type: ignore[union-attr]
    if behind and not only_silent:
        return "behind", behind, waiting
    silent = [r for r in others if now - seen[r].heard > silence_s]  # type: ignore[union-attr]
    if silent:
        return "silent", silent, [r for r in known if r not in silent]
    everyone = rank == 0 and len(known) == len(seen) and not only_silent
    if everyone and all(seen[r].position == front and now - seen[r].moved > SILENCE_S for r in known):  # type: ignore[union-attr]
        return "stuck", [], known  # all inside one collective for longer than a silence, all still heard
    return None


class _Waiting:
    """The context ``MPIComm`` enters around every collective: counts it and marks this rank inside."""

    def __init__(self, watch: HangWatchdog):
        self._watch = watch

    def __enter__(self) -> None:
        self._watch.enter_collective()

    def __exit__(self, *exc: object) -> None:
        self._watch.leave_collective()


class HangWatchdog:
    """See the module docstring. Main thread: ``begin(g)`` at the start of generation g (1-based: the
    generation being computed), ``mark(phase)``, ``close()`` at the end; the communicator enters
    ``waiting`` around its collectives. The thread does the rest."""

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
        final: bool = False,
    ):
        self._comm, self._hosts = channel, hosts  # a parallel.mpi channel: send / poll / abort
        self.rank, self.size = channel.Get_rank(), channel.Get_size()
        self.timeout_s, self.abort, self._on_abort, self._poll_s = timeout_s, abort, on_abort, poll_s
        # the final evaluation: uneven work by nature, so only a silent (stopped) rank is named, after
        # hang_timeout of silence
        self.final, self.silence_s = final, max(SILENCE_S, timeout_s) if final else SILENCE_S
        self._say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._lock = threading.Lock()
        now = time.monotonic()
        listen = range(self.size) if self.rank == 0 else (0, self.rank)
        self._seen: list[Seen | None] = [Seen(heard=now, moved=now) if r in listen else None for r in range(self.size)]
        self._position, self._depth, self._phase = 0, 0, ""
        self._host: Any = None  # the communicator attached (its collectives are counted)
        self._generation, self._t0 = 0, now
        self._recent: deque[float] = deque(maxlen=WINDOW)
        self._reported = -1
        self._sent: tuple[Any, float] = (None, 0.0)
        self._stop = threading.Event()
        self.waiting = _Waiting(self)
        self.reports: list[str] = []
        self._thread = threading.Thread(target=self._run, name="mpigls-hang-watchdog", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- main thread

    def begin(self, generation: int) -> None:
        with self._lock:
            self._generation, self._t0, self._phase = generation, time.monotonic(), EVALUATE

    def mark(self, phase: str) -> None:
        """This rank entered ``phase`` of the running generation (``DONE``: it completed it)."""
        with self._lock:
            self._phase = phase
            if phase == DONE and self._reported != self._generation:  # a reported hang is not a generation's time
                self._recent.append(min(time.monotonic() - self._t0, self._limit_locked()))

    def enter_collective(self) -> None:
        with self._lock:
            self._depth += 1
            if self._depth == 1:
                self._position += 1

    def leave_collective(self) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                self._position += 1

    def attach(self, comm: Any) -> None:
        """Have ``comm`` (an ``MPIComm``) enter ``waiting`` around its collectives, until ``close``."""
        self._host = comm
        comm.waits = self.waiting

    def limit_s(self) -> float:
        with self._lock:
            return self._limit_locked()

    def _limit_locked(self) -> float:
        recent = self._recent
        return max(self.timeout_s, FACTOR * statistics.median(recent)) if recent else self.timeout_s

    def close(self) -> None:
        if self._host is not None and getattr(self._host, "waits", None) is self.waiting:
            self._host.waits = None
        self._stop.set()
        self._thread.join(timeout=5)
        self._drain(time.monotonic())

    # ----------------------------------------------------------------- watchdog thread

    def _drain(self, now: float) -> None:
        for src, (position, generation, phase) in self._comm.poll():
            with self._lock:
                old = self._seen[src]
                if old is None:
                    continue
                moved = old.moved if old.position == position else now
                self._seen[src] = Seen(position, generation, phase, now, moved)

    def _beat(self, now: float) -> None:
        with self._lock:
            state = (self._position, self._generation, self._phase)
            old = self._seen[self.rank]
            assert old is not None
            self._seen[self.rank] = Seen(*state, now, old.moved if old.position == state[0] else now)
        if state != self._sent[0] or now - self._sent[1] >= BEAT_S:
            self._sent = (state, now)
            self._comm.send(state, [0] if self.rank != 0 else range(1, self.size))

    def _awake(self, now: float, last: float) -> None:
        """After a gap in this thread's own loop (this process was stopped or frozen itself), what it
        heard of the others is old through no fault of theirs: it listens afresh."""
        if now - last > SILENCE_S / 2:
            with self._lock:
                self._seen = [None if s is None else dataclasses.replace(s, heard=now, moved=now) for s in self._seen]

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self._poll_s):
            try:
                now = time.monotonic()
                self._awake(now, last)
                last = now
                self._drain(now)
                self._beat(now)
                self._check(now)
            except Exception as exc:  # noqa: BLE001 - the watchdog never takes the job down by itself
                self._say(f"[rank {self.rank}] hang watchdog stopped: {exc}")
                return

    def _check(self, now: float) -> None:
        limit = self.limit_s()
        with self._lock:
            g, elapsed, seen = self._generation, now - self._t0, list(self._seen)
            recent = list(self._recent)
        if g == 0 or g == self._reported or elapsed <= limit:
            return
        found = verdict(self.rank, seen, now, self.silence_s, only_silent=self.final)
        if found is None:
            return
        self._reported = g
        self._report(g, elapsed, limit, recent, found, seen, now)

    def _report(self, g: int, elapsed: float, limit: float, recent: list[float], found, seen, now: float) -> None:
        kind, named, waiting = found
        hosts = sorted({self._hosts[r] for r in named})
        last = "; ".join(
            f"rank {r} last heard {now - seen[r].heard:.1f} s ago, in phase {seen[r].phase or 'start'} of generation "
            f"{seen[r].generation}"
            for r in named
        )
        if kind == "behind":
            what = f"rank(s) {named} (host(s) {', '.join(hosts)}) have not reached the collective operation ({last})"
        elif kind == "silent":
            what = (
                f"rank(s) {named} (host(s) {', '.join(hosts)}) have sent nothing for more than {self.silence_s:g} s, "
                f"inside the collective operation ({last})"
            )
        else:
            what = (
                "every rank is inside the same collective operation and alive, yet it does not complete (an MPI "
                "or network fault)"
            )
        median = f"{statistics.median(recent):.3g} s" if recent else "none yet"
        action = (
            f"ending the job with exit code {EXIT_HUNG} so that the batch system can requeue it; it resumes "
            "from the last checkpoint"
            if self.abort
            else "still waiting (train.hang_abort is false)"
        )
        who = f"[rank {self.rank}] " if self.rank != 0 else ""
        msg = (
            f"{who}hang watchdog: {'the final evaluation' if self.final else f'generation {g}'} has run {elapsed:.1f} s, "
            f"past the limit of {limit:.1f} s "
            f"(train.hang_timeout {self.timeout_s:g} s, or {FACTOR:g}x the recent median of {median}); {what}, "
            f"while rank(s) {waiting} wait for them. A stopped, swapped-out or hung process, or a slow node; {action}"
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

    def mark(self, phase: str) -> None:
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
    final: bool = False,
) -> HangWatchdog | _Off:
    """A running watchdog for an MPI job (collective: every rank calls it), or a no-op one when it is
    off (``timeout_s`` 0), there is one rank, or the communicator is not MPI. ``close()`` stops it and
    detaches it from ``comm``'s collectives. ``final``: for the final evaluation (see ``final_evaluation``)."""
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
    watch = HangWatchdog(channel, hosts, timeout_s, abort=abort, say=say, on_abort=on_abort, final=final)
    watch.attach(comm)
    return watch


@contextlib.contextmanager
def final_evaluation(
    comm: Any, timeout_s: float, *, abort: bool, on_abort: Callable[[], None] | None = None
) -> Iterator[None]:
    """Watch a run's final evaluation (collective): its ranks' work is uneven by nature (complete
    verifiers), so no time tells a slow rank from a stopped one; a rank silent for ``max(SILENCE_S,
    timeout_s)`` (its watchdog thread sends nothing: a stopped or frozen process) is named, and with
    ``abort`` the job ends with ``EXIT_HUNG``."""
    watch = start(comm, timeout_s, abort=abort, on_abort=on_abort, final=True)
    try:
        watch.begin(1)
        yield
        watch.mark(DONE)
    finally:
        watch.close()
