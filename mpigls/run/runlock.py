"""One writer per run directory: the lock file ``DIR/mpigls.lock`` that ``mpigls train`` holds while it runs.

Rank 0 creates the lock before anything in the directory is read or changed, and removes it on
every normal or error exit of ``train``. Creation never leaves a partial file: the record is written
and synced to a private temporary file, which is then hard-linked to ``mpigls.lock`` (atomic, and fails
when the name exists, on local file systems and on the shared ones clusters use: NFS v3+, Lustre, GPFS,
where ``flock`` is often unavailable or node-local); a disk full at that point refuses the start
(``RunDirError``) and leaves nothing behind. Only where hard links are not supported is the file
created with ``O_CREAT | O_EXCL`` and written in place. The file is JSON: host, PID, start time, a
random token and the heartbeat (UNIX time), rewritten at every checkpoint and at most every
``HEARTBEAT_S`` seconds between them.

A second writer is refused (``RunDirError``, exit 2) with a message naming the holder. A lock whose
holder is gone is *stale* and is taken over with a warning: the same host and the PID is not alive,
or no heartbeat for ``stale_after_s`` seconds (any host; ``train.lock_stale_s``). A lock file that
names no holder (empty, not a JSON record, no PID or no host: what a crash or a full disk while it was
written in place leaves) is no holder's: it is stale once it is ``INVALID_GRACE_S`` seconds old (a
starter writing it in place takes far less). The takeover renames the stale file to a unique name
first, so of two starters racing for it only one wins. Removing the lock at the end never fails a
finished run: a lock that cannot be removed is reported, rewritten as released where it can still
be written, and left for the next start, which takes it over (released, or its process is gone).
Readers (``inspect``, ``certify``, ``plot``, ``report``) never look at the lock.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime as _dt
import json
import os
import secrets
import socket
import sys
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
    "INVALID_GRACE_S",
]

LOCK_NAME = "mpigls.lock"
HEARTBEAT_S = 60.0  # the most seconds between heartbeats while generations run
INVALID_GRACE_S = 10.0  # a lock file naming no holder is stale once this old (no live writer takes so long)
_HELD: set[str] = set()  # tokens of the locks this process holds (a lock of this PID not in it was left behind)


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as its file says; ``invalid`` says what is wrong with a file that names no
    holder (then ``heartbeat`` is the file's modification time)."""

    host: str = ""
    pid: int = 0
    start: str = ""
    heartbeat: float = 0.0
    token: str = ""
    command: str = ""
    invalid: str = ""

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        age = f"{now - self.heartbeat:.0f} s ago" if self.heartbeat else "unknown"
        if self.invalid:
            return f"a lock file that names no holder ({self.invalid}), last written {age}"
        return f"PID {self.pid} on host {self.host or '?'}, started {self.start or '?'}, last heartbeat {age}"


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_holder(path: Path) -> Holder | None:
    """The holder recorded in a lock file; None when there is no file. A file that names no holder
    (empty, not a JSON object, no PID > 0 or no host) reads as a holder with ``invalid`` saying so and
    the file's modification time as heartbeat."""
    try:
        raw = path.read_bytes()
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    if not raw.strip():
        return Holder(heartbeat=mtime, invalid=f"{len(raw)} bytes, empty")
    try:
        d: Any = json.loads(raw)
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        holder = Holder(
            host=str(d.get("host", "")),
            pid=int(d.get("pid", 0)),
            start=str(d.get("start", "")),
            heartbeat=max(float(d.get("heartbeat", 0.0)), mtime),
            token=str(d.get("token", "")),
            command=str(d.get("command", "")),
        )
    except (ValueError, TypeError, OverflowError):
        return Holder(heartbeat=mtime, invalid=f"{len(raw)} bytes that are not a lock record")
    if d.get("released"):
        return dataclasses.replace(holder, invalid=f"released by its run at {d['released']}, which could not remove it")
    if holder.pid <= 0 or not holder.host:
        return dataclasses.replace(holder, invalid=f"PID {holder.pid}, host {holder.host or 'missing'}")
    return holder


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
    if holder.invalid:
        age = now - holder.heartbeat
        return (
            f"{age:.0f} s old, it names no holder: a start that failed while writing it"
            if age > INVALID_GRACE_S
            else None
        )
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
            with contextlib.suppress(RunDirError):  # not recreated (disk full): treated as lost below
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
        """Remove the lock file if it is still this run's. Never raises: a lock that cannot be removed
        (read-only or vanished directory, I/O error) is reported on stderr and left for the next start,
        which takes it over as its process is gone; the run's result stands."""
        _HELD.discard(self.holder.token)
        if not self.held:
            return
        self.held = False
        try:
            current = read_holder(self.path)
            if current is not None and current.token in ("", self.holder.token):
                self.path.unlink(missing_ok=True)
        except OSError as exc:
            with contextlib.suppress(OSError):  # marked released: any host's next start takes it over
                self.path.write_text(json.dumps({"released": _now_iso(), "token": self.holder.token}) + "\n")
            print(
                f"warning: could not remove the run-directory lock {self.path} ({exc.strerror or exc}); the run "
                "itself is complete. The next mpigls train on this directory takes the lock over (its process is "
                "gone), or delete the file",
                file=sys.stderr,
                flush=True,
            )


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def _create(path: Path, holder: Holder) -> RunLock | None:
    """Create the lock file exclusively and completely (see the module docstring); None when it exists.
    Raises RunDirError when the record cannot be written (disk full), leaving no file behind."""
    lock = RunLock(path, holder)
    content = lock._content(time.time())
    tmp = path.with_name(f"{LOCK_NAME}.new-{holder.token}")
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            _write_all(fd, content)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return None
        except OSError:  # a file system without hard links: exclusive creation, written in place
            if not _create_in_place(path, content):
                return None
    except OSError as exc:
        raise RunDirError(
            f"could not create the run-directory lock {path}: {exc.strerror or exc}. Nothing was started and "
            "nothing was left behind; free disk space (or fix the directory's permissions) and start again"
        ) from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    _HELD.add(holder.token)
    atexit.register(lock.release)  # a process that ends without unwinding train (sys.exit in a callback)
    return lock


def _create_in_place(path: Path, content: bytes) -> bool:
    """``O_EXCL`` creation and a write in place; False when the file exists. A failed write removes it."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        _write_all(fd, content)
    except OSError:
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    finally:
        os.close(fd)
    return True


def _clean_leftovers(path: Path) -> None:
    """Remove what a starter killed halfway left (``mpigls.lock.new-*``, ``mpigls.lock.stale-*``), once
    ``INVALID_GRACE_S`` old (a younger one may be another starter's, at work now)."""
    for left in path.parent.glob(f"{LOCK_NAME}.*-*"):
        with contextlib.suppress(OSError):
            if left.name.split("-", 1)[0] in (f"{LOCK_NAME}.new", f"{LOCK_NAME}.stale") and (
                time.time() - left.lstat().st_mtime > INVALID_GRACE_S
            ):
                left.unlink()


def in_use(directory: str | os.PathLike, holder: Holder) -> RunDirError:
    """The refusal of a second writer, naming the holder."""
    path = Path(directory) / LOCK_NAME
    if holder.invalid:
        return RunDirError(
            f"--out {str(Path(directory))!r} has a run-directory lock that names no holder ({holder.describe()}; "
            f"lock file {path}): another mpigls train may be creating it right now. If none is, it was left by a "
            f"start that failed while writing it and is taken over once it is {INVALID_GRACE_S:g} s old: start "
            "again in a few seconds"
        )
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
            _clean_leftovers(path)
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
