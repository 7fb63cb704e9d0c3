"""One writer per run directory: the lock file ``DIR/mpigls.lock`` that ``mpigls train`` holds while it runs.

Rank 0 creates the lock with ``O_CREAT | O_EXCL`` before anything in the directory is read or
changed, and removes it on every normal or error exit of ``train``. Exclusive creation is atomic on
local file systems and on the shared ones clusters use (NFS v3+, Lustre, GPFS), where ``flock`` is
often unavailable or node-local. The file is JSON: host, PID, start time, a random token and the
heartbeat (UNIX time), rewritten at every checkpoint and at most every ``HEARTBEAT_S`` seconds
between them.

A second writer is refused (``RunDirError``, exit 2) with a message naming the holder. A lock whose
holder is gone is *stale* and is taken over with a warning: the same host and the PID is not alive,
or no heartbeat for ``stale_after_s`` seconds (any host; ``train.lock_stale_s``). The takeover renames
the stale file to a unique name first, so of two starters racing for it only one wins.
Readers (``inspect``, ``certify``, ``plot``, ``report``) never look at the lock.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as _dt
import json
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpigls.run.rundir import RunDirError

__all__ = [
    "LOCK_NAME",
    "HEARTBEAT_S",
    "RunLock",
    "Holder",
    "acquire",
    "check_free",
    "in_use",
    "read_holder",
    "is_stale",
]

LOCK_NAME = "mpigls.lock"
HEARTBEAT_S = 60.0  # the most seconds between heartbeats while generations run
_HELD: set[str] = set()  # tokens of the locks this process holds (a lock of this PID not in it was left behind)


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as its file says (fields empty when the file cannot be read)."""

    host: str = ""
    pid: int = 0
    start: str = ""
    heartbeat: float = 0.0
    token: str = ""
    command: str = ""

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        age = f"{now - self.heartbeat:.0f} s ago" if self.heartbeat else "unknown"
        return f"PID {self.pid} on host {self.host or '?'}, started {self.start or '?'}, last heartbeat {age}"


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_holder(path: Path) -> Holder | None:
    """The holder recorded in a lock file; None when there is no file. A file being rewritten (empty or
    partial JSON) reads as a holder with only the file's modification time as heartbeat."""
    try:
        raw = path.read_bytes()
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        d: Any = json.loads(raw)
        if not isinstance(d, dict):
            raise ValueError
        return Holder(
            host=str(d.get("host", "")),
            pid=int(d.get("pid", 0)),
            start=str(d.get("start", "")),
            heartbeat=max(float(d.get("heartbeat", 0.0)), mtime),
            token=str(d.get("token", "")),
            command=str(d.get("command", "")),
        )
    except (ValueError, TypeError):
        return Holder(heartbeat=mtime)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # unknown: never judged dead from the PID alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def is_stale(holder: Holder, stale_after_s: float, now: float | None = None) -> str | None:
    """Why ``holder`` is gone (a phrase), or None while it may still be running."""
    now = time.time() if now is None else now
    if holder.host == socket.gethostname() and holder.pid == os.getpid() and holder.token not in _HELD:
        return "this process left it behind"
    if holder.host == socket.gethostname() and holder.pid and not _pid_alive(holder.pid):
        return f"its process {holder.pid} no longer exists on this host"
    if stale_after_s > 0 and holder.heartbeat and now - holder.heartbeat > stale_after_s:
        return f"no heartbeat for {now - holder.heartbeat:.0f} s (more than train.lock_stale_s = {stale_after_s:g})"
    return None


class RunLock:
    """A held lock: ``heartbeat()`` while running, ``release()`` at the end (idempotent)."""

    def __init__(self, path: Path, holder: Holder):
        self.path, self.holder = path, holder
        self._last_beat = time.monotonic()
        self.held = True
        self._lost: list[Holder | None] = []  # [who took the lock over], once seen

    def _content(self, heartbeat: float) -> bytes:
        h = self.holder
        d = {"host": h.host, "pid": h.pid, "start": h.start, "heartbeat": heartbeat, "token": h.token}
        return (json.dumps({**d, "command": h.command}) + "\n").encode()

    def heartbeat(self, force: bool = True) -> None:
        """Rewrite the heartbeat (``force=False``: only when ``HEARTBEAT_S`` has passed, and never raises).
        A lock that another process took over (it judged this run stale) is not overwritten; the next
        forced heartbeat (at a save, where every rank learns of it) raises RunDirError."""
        if not self._lost:
            if not self.held or (not force and time.monotonic() - self._last_beat < HEARTBEAT_S):
                return
            self._last_beat = time.monotonic()
            current = read_holder(self.path)
            if current is None and _create(self.path, self.holder) is not None:
                current = self.holder  # deleted by hand: this run still holds the directory, so it is recreated
            if current is None or (current.token and current.token != self.holder.token):
                self.held, self._lost = False, [current]
        if self._lost:
            if not force:
                return
            who = "nobody" if self._lost[0] is None else self._lost[0].describe()
            raise RunDirError(
                f"the run-directory lock {self.path} is no longer this run's (now held by {who}): another "
                "mpigls train judged this run stale and took the directory over. This run stops here so that "
                "two writers never share the directory; raise train.lock_stale_s if generations take that long"
            )
        with contextlib.suppress(OSError):  # a full disk must not end training: the mtime still moves
            with open(self.path, "r+b") as f:
                f.write(self._content(time.time()))
                f.truncate()
            os.utime(self.path)

    def release(self) -> None:
        """Remove the lock file if it is still this run's."""
        _HELD.discard(self.holder.token)
        if not self.held:
            return
        self.held = False
        current = read_holder(self.path)
        if current is not None and current.token in ("", self.holder.token):
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def _create(path: Path, holder: Holder) -> RunLock | None:
    """Create the lock file exclusively; None when it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None
    lock = RunLock(path, holder)
    with os.fdopen(fd, "wb") as f:
        f.write(lock._content(time.time()))
        f.flush()
        os.fsync(f.fileno())
    _HELD.add(holder.token)
    atexit.register(lock.release)  # a process that ends without unwinding train (sys.exit in a callback)
    return lock


def in_use(directory: str | os.PathLike, holder: Holder) -> RunDirError:
    """The refusal of a second writer, naming the holder."""
    path = Path(directory) / LOCK_NAME
    return RunDirError(
        f"--out {str(Path(directory))!r} is in use by another mpigls train ({holder.describe()}; lock file "
        f"{path}). Two runs writing one directory would overwrite each other's checkpoints and log. Wait for "
        "it to end or stop it, or pass another --out. If that job is really gone (its node died), the lock "
        "is taken over automatically once it is stale (no heartbeat for train.lock_stale_s seconds), or "
        "delete the lock file"
    )


def check_free(directory: str | os.PathLike, stale_after_s: float = 3600.0) -> None:
    """Raise what ``acquire`` would raise for a directory held by a live run; change nothing (dry run)."""
    holder = read_holder(Path(directory) / LOCK_NAME)
    if holder is not None and is_stale(holder, stale_after_s) is None:
        raise in_use(directory, holder)


def acquire(directory: str | os.PathLike, *, stale_after_s: float = 3600.0, command: str = "", say=print) -> RunLock:
    """Take the lock of an existing run directory, taking over a stale one with a warning; raises
    RunDirError naming the holder when another live run holds it."""
    path = Path(directory) / LOCK_NAME
    me = Holder(
        host=socket.gethostname(), pid=os.getpid(), start=_now_iso(), token=secrets.token_hex(8), command=command
    )
    for _ in range(5):
        lock = _create(path, me)
        if lock is not None:
            return lock
        holder = read_holder(path)
        if holder is None:
            continue  # released in between: try again
        why = is_stale(holder, stale_after_s)
        if why is None:
            raise in_use(directory, holder)
        aside = path.with_name(f"{LOCK_NAME}.stale-{me.token}")
        try:
            os.rename(path, aside)  # only one of several starters gets it
        except FileNotFoundError:
            continue
        moved = read_holder(aside)
        if moved is not None and holder.token and moved.token != holder.token:  # another starter's fresh lock
            with contextlib.suppress(OSError):
                os.link(aside, path)  # put it back (fails only if yet another starter got there first)
            aside.unlink(missing_ok=True)
            continue
        aside.unlink(missing_ok=True)
        say(f"warning: took over the stale run-directory lock {path} ({holder.describe()}: {why})")
    raise RunDirError(f"could not take the run-directory lock {path}: other processes keep taking it; try again")
