"""Hostile processes: several processes on one run directory, and a run killed in the middle of its
phases. Each case is either refused clearly (exit 2, the holder named, nothing of the other run
touched) or correct; never two writers in one directory, never a corrupted run.

* starters racing for a fresh directory or for a stale lock: exactly one wins;
* ``train``, ``train --restart`` and ``train --dry-run`` on a directory another run holds: refused,
  and not a byte of the holder's files changes (nothing moved aside);
* readers (``inspect``, ``checkpoint.load``) while a writer saves: they see complete checkpoints;
* a run killed (SIGKILL) halfway through writing a checkpoint, or halfway through creating its lock:
  the next start takes the lock over, removes the debris and resumes from the last complete
  checkpoint.
The hang watchdog's cases (a rank stopped in each phase) are in test_watchdog.py, the lock file's own
(empty, garbage, disk full, cannot be removed) in test_runlock.py.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mpigls import cli
from mpigls.run import checkpoint, runlock

from conftest import REPO

pytestmark = pytest.mark.timeout(240)

TINY = {
    "data.name": "digits",
    "data.num_train": 128,
    "model.name": "mlp-tiny",
    "optimizer.popsize": 4,
    "optimizer.block_size": 2,
    "train.batch_size": 32,
    "train.epochs": 1,
    "train.threads": 1,
    "train.progress": False,
    "train.checkpoint_every": 1,
}


def _sets(**extra) -> list[str]:
    out = []
    for k, v in {**TINY, **extra}.items():
        out += ["--set", f"{k}={v}"]
    return out


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- starters racing


def _try_acquire(d: str, start, results) -> None:
    start.wait()
    try:
        lock = runlock.acquire(d, say=lambda msg: None)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        results.put(("refused", os.getpid(), str(exc)))
        start.wait()  # hold nothing; wait for the others' attempts
        return
    results.put(("won", os.getpid(), ""))
    start.wait()  # hold the lock until every starter has tried
    lock.release()


def _race(d: Path, n: int = 6) -> list[tuple[str, int, str]]:
    ctx = multiprocessing.get_context("fork")
    start, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_try_acquire, args=(str(d), start, results)) for _ in range(n)]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return got


def test_starters_racing_for_a_fresh_directory_one_wins(tmp_path):
    got = _race(tmp_path)
    winners = [pid for what, pid, _ in got if what == "won"]
    assert len(winners) == 1, got
    for what, _, msg in got:
        if what == "refused":
            assert "in use by another mpigls train" in msg and f"PID {winners[0]} " in msg, msg
    assert not (tmp_path / runlock.LOCK_NAME).exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file of any starter is left


def test_starters_racing_to_take_over_a_stale_lock_one_wins(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / runlock.LOCK_NAME).write_text(
        f'{{"host": "{socket.gethostname()}", "pid": {dead.pid}, "heartbeat": {time.time()}, "token": "ab"}}'
    )
    got = _race(tmp_path)
    assert sum(what == "won" for what, _, _ in got) == 1, got
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- a directory another run holds


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("held") / "run"
    assert cli.main(["train", "--out", str(d), "--no-eval", "--max-generations", "2", *_sets()]) == 0
    return d


@pytest.mark.parametrize("extra", [[], ["--restart"], ["--dry-run"]], ids=["resume", "restart", "dry-run"])
def test_a_start_on_a_held_directory_is_refused_and_changes_nothing(run_dir, capsys, extra):
    held = runlock.acquire(run_dir)  # another live run (this process, another token)
    try:
        before = _snapshot(run_dir)
        capsys.readouterr()
        code = cli.main(["train", "--out", str(run_dir), "--no-eval", *extra, *_sets()])
        err = " ".join(capsys.readouterr().err.split())
        assert code == 2, err
        assert "is in use by another mpigls train" in err and f"PID {os.getpid()} on host" in err
        assert "Traceback" not in err
        assert _snapshot(run_dir) == before  # nothing moved aside, appended or rewritten
    finally:
        held.release()


def test_readers_see_complete_checkpoints_while_a_writer_saves(run_dir, tmp_path):
    import dataclasses

    d = tmp_path / "busy"
    base = checkpoint.load(run_dir / checkpoint.LATEST)
    checkpoint.save(d, base)
    errors: list[BaseException] = []
    done = threading.Event()

    def write() -> None:
        try:
            for g in range(base.generation + 1, base.generation + 30):
                checkpoint.save(d, dataclasses.replace(base, generation=g), keep_last=2)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            done.set()

    writer = threading.Thread(target=write)
    writer.start()
    seen = []
    while not done.is_set():
        ckpt = checkpoint.load(d / checkpoint.LATEST)  # verified: a partial file would be refused here
        seen.append(ckpt.generation)
    writer.join()
    assert not errors, errors
    assert seen == sorted(seen) and len(seen) > 1  # every read complete, never going back


# ----------------------------------------------------------------------------- a run killed halfway

KILLED = """
import os, signal, sys
from mpigls import cli
from mpigls.run import checkpoint, runlock
where = {where!r}
if where == "checkpoint":  # the temporary file of generation 2 is complete, not yet renamed into place
    write = checkpoint._write_file
    def dying(path, ckpt):
        write(path, ckpt)
        if ckpt.generation == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint._write_file = dying
else:  # the lock's temporary file is written, not yet linked to mpigls.lock
    link = os.link
    def dying(src, dst, *a, **k):
        if str(dst).endswith(runlock.LOCK_NAME):
            os.kill(os.getpid(), signal.SIGKILL)
        return link(src, dst, *a, **k)
    os.link = dying
sys.exit(cli.main(["train", "--out", {out!r}, "--no-eval", *{sets!r}]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("where", ["checkpoint", "lock"])
def test_a_run_killed_halfway_resumes_from_its_last_complete_checkpoint(tmp_path, capsys, where, monkeypatch):
    d = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    script = KILLED.format(where=where, out=str(d), sets=_sets())
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    if where == "checkpoint":
        assert checkpoint.load(d / checkpoint.LATEST).generation == 1
        assert list(d.glob(f"{checkpoint.TEMP_PREFIX}*")) and (d / runlock.LOCK_NAME).exists()  # the debris
    else:
        assert list(d.glob(f"{runlock.LOCK_NAME}.new-*")) and not (d / runlock.LOCK_NAME).exists()
        monkeypatch.setattr(runlock, "INVALID_GRACE_S", 0.0)  # as if the requeue came a minute later
    capsys.readouterr()
    assert cli.main(["train", "--out", str(d), "--no-eval", *_sets()]) == 0
    out = capsys.readouterr().out
    if where == "checkpoint":
        assert "took over the stale run-directory lock" in out and "no longer exists on this host" in out
        assert "resuming from generation 1" in out
    assert checkpoint.load(d / checkpoint.LATEST).generation == 4  # the whole run: 128 / 32 generations
    assert not list(d.glob(f"{checkpoint.TEMP_PREFIX}*")) and not list(d.glob(f"{runlock.LOCK_NAME}*"))
