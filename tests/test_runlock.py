"""One writer per run directory: a second ``mpigls train`` on a running directory is refused naming the
holder and changes nothing; a stale lock (dead holder, or no heartbeat) is taken over with a warning;
the lock is released on every exit path; readers need no lock."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpigls import cli, config
from mpigls.run import checkpoint, monitor, runlock, train

from conftest import REPO

pytestmark = pytest.mark.timeout(180)

TINY = {
    "data.name": "digits",
    "data.num_train": 128,
    "data.num_test": 32,
    "model.name": "mlp-tiny",
    "optimizer.popsize": 4,
    "optimizer.block_size": 2,
    "train.batch_size": 32,
    "train.epochs": 1,
    "train.threads": 1,
    "train.progress": False,
    "train.checkpoint_every": 1,
    "eval.methods": "[ibp]",
}


def _sets(**extra) -> list[str]:
    out = []
    for k, v in {**TINY, **extra}.items():
        out += ["--set", f"{k}={v}"]
    return out


def _cfg(**extra):
    return config.load_config(None, [f"{k}={v}" for k, v in {**TINY, **extra}.items()])


def _generations(d: Path) -> list[int]:
    records, _ = monitor.read_metrics_log(d / monitor.METRICS_FILE)
    return [int(r["generation"]) for r in records]


def _raw_generations(d: Path) -> list[int]:
    """Every generation line as written (a duplicate shows up twice here)."""
    lines = (d / monitor.METRICS_FILE).read_text().splitlines()
    return [json.loads(ln)["generation"] for ln in lines if '"generation"' in ln and '"schema"' not in ln]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(d: Path, **fields) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    path = d / runlock.LOCK_NAME
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "start": "2026-01-01T00:00:00+00:00"}
    holder.update({"heartbeat": time.time(), "token": "feedfeedfeedfeed", **fields})
    path.write_text(json.dumps(holder))
    os.utime(path, (holder["heartbeat"], holder["heartbeat"]))  # the file's age is a heartbeat too
    return path


@pytest.mark.slow
def test_second_writer_is_refused_and_nothing_of_the_first_run_is_lost(tmp_path, capsys):
    """The scenario of a requeued job whose predecessor still runs: the second start (another lr) is refused
    with the holder named, deletes no temp file, does not touch metrics.jsonl; the first run ends intact."""
    d = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    first = subprocess.Popen(
        [sys.executable, "-m", "mpigls", "train", "--out", str(d), "--no-eval", *_sets(**{"train.epochs": 5000})],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (d / monitor.METRICS_FILE).exists() or len(_generations(d)) < 3:
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read() if first.stdout else ""
            time.sleep(0.2)
        in_flight = d / f"{checkpoint.TEMP_PREFIX}ckpt_99999999-abc.h5"  # as if the first run were mid-write
        in_flight.write_bytes(b"partial")
        log_before = (d / monitor.METRICS_FILE).read_bytes()
        code = cli.main(["train", "--out", str(d), "--no-eval", *_sets(**{"optimizer.lr": 0.005})])
        err = " ".join(capsys.readouterr().err.split())
        assert code == 2
        assert "is in use by another mpigls train" in err and f"PID {first.pid} on host {socket.gethostname()}" in err
        assert "Traceback" not in err
        assert in_flight.read_bytes() == b"partial"
        assert (d / monitor.METRICS_FILE).read_bytes().startswith(log_before)  # appended to, never rewritten
        in_flight.unlink()
        first.send_signal(signal.SIGTERM)  # the first run stops with a checkpoint, as a preempted job does
        out, _ = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 3, out
    last = checkpoint.load(d / checkpoint.LATEST)
    gens = _raw_generations(d)
    assert gens == list(range(1, last.generation + 1))  # every generation once, none lost, none twice
    assert last.config["optimizer"]["lr"] != 0.005  # the refused run's lr never reached a checkpoint
    assert not (d / runlock.LOCK_NAME).exists()  # released at the end


def test_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path):
    d = tmp_path / "run"
    _write_lock(d, pid=_dead_pid(), token="0123456789abcdef")
    logs: list[str] = []
    res = train.train(_cfg(), d, max_generations=2, log=logs.append)
    assert res.generation == 2
    warning = [m for m in logs if "took over the stale run-directory lock" in m]
    assert len(warning) == 1 and "no longer exists on this host" in warning[0], logs
    assert not (d / runlock.LOCK_NAME).exists()


def test_lock_without_heartbeat_is_taken_over_only_after_lock_stale_s(tmp_path, capsys):
    d = tmp_path / "run"
    _write_lock(d, host="node-that-died", pid=1, heartbeat=time.time() - 600)
    code = cli.main(["train", "--out", str(d), "--no-eval", "--max-generations", "1", *_sets()])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "PID 1 on host node-that-died" in err and "last heartbeat 6" in err  # ~600 s ago
    assert cli.main(["train", "--out", str(d), "--dry-run", *_sets()]) == 2  # --dry-run says so too
    assert "is in use by another mpigls train" in capsys.readouterr().err
    assert not (d / checkpoint.LATEST).exists()
    logs: list[str] = []
    res = train.train(_cfg(**{"train.lock_stale_s": 300}), d, max_generations=1, log=logs.append)
    assert res.generation == 1
    assert any("no heartbeat for 6" in m and "train.lock_stale_s = 300" in m for m in logs), logs


def test_lock_is_released_on_error_and_readers_need_none(tmp_path, capsys, monkeypatch):
    d = tmp_path / "run"
    assert cli.main(["train", "--out", str(d), "--no-eval", "--max-generations", "1", *_sets()]) == 0
    assert not (d / runlock.LOCK_NAME).exists()

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure inside the training loop")

    with monkeypatch.context() as m:
        m.setattr(train, "_metrics", broken)
        with pytest.raises(RuntimeError, match="injected"):
            train.train(_cfg(), d, max_generations=3, log=lambda msg: None)
    assert not (d / runlock.LOCK_NAME).exists()
    with pytest.raises(ValueError, match="optimizer"):  # an error while resuming (another optimizer)
        train.train(_cfg(**{"optimizer.name": "rgs", "optimizer.num_samples": 2}), d, log=lambda msg: None)
    assert not (d / runlock.LOCK_NAME).exists()
    held = runlock.acquire(d)  # a live run holds the directory: readers still work
    try:
        capsys.readouterr()
        assert cli.main(["inspect", str(d / checkpoint.LATEST)]) == 0
        assert "generation" in capsys.readouterr().out
    finally:
        held.release()
    assert not (d / runlock.LOCK_NAME).exists()


def test_a_lock_deleted_by_hand_is_recreated_at_the_next_heartbeat(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    lock = runlock.acquire(d)
    (d / runlock.LOCK_NAME).unlink()
    lock.heartbeat()
    assert runlock.read_holder(d / runlock.LOCK_NAME).token == lock.holder.token
    lock.release()
    assert not (d / runlock.LOCK_NAME).exists()


def test_a_taken_over_lock_stops_the_old_run_at_its_next_save(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    lock = runlock.acquire(d)
    (d / runlock.LOCK_NAME).unlink()
    other = runlock.acquire(d)  # another starter judged it stale
    try:
        lock.heartbeat(force=False)  # between saves: never raises
        with pytest.raises(ValueError, match="no longer this run's"):
            lock.heartbeat()
        lock.release()
        assert (d / runlock.LOCK_NAME).exists()  # the new holder's lock is left alone
    finally:
        other.release()


# ----------------------------------------------------------------------------- lock files that name no holder


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


@pytest.mark.parametrize(
    "content, found",
    [
        (b"", "0 bytes, empty"),  # what a full disk left while the lock was created
        (b"\x00\x17garbage{", "not a lock record"),
        (b'{"host": "", "pid": 0, "heartbeat": 0}', "PID 0, host missing"),
        (b"[1, 2]", "not a lock record"),
    ],
)
def test_a_lock_file_naming_no_holder_is_taken_over_once_it_is_a_few_seconds_old(tmp_path, content, found):
    d = tmp_path / "run"
    d.mkdir()
    path = d / runlock.LOCK_NAME
    path.write_bytes(content)
    with pytest.raises(ValueError, match="names no holder") as refused:  # a starter may be writing it now
        runlock.acquire(d)
    assert found in str(refused.value) and "PID 0 on host ?" not in str(refused.value)
    _age(path, runlock.INVALID_GRACE_S + 5)  # a requeued job, minutes later
    said: list[str] = []
    lock = runlock.acquire(d, say=said.append)  # lock_stale_s (1 h by default) does not apply
    assert len(said) == 1 and "took over the stale run-directory lock" in said[0] and found in said[0], said
    assert runlock.read_holder(path).token == lock.holder.token
    lock.release()
    assert not path.exists()


def test_a_full_disk_while_the_lock_is_created_refuses_the_start_and_leaves_no_file(tmp_path, monkeypatch):
    d = tmp_path / "run"
    d.mkdir()

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(os, "write", full)
        with pytest.raises(ValueError, match="could not create the run-directory lock") as refused:
            runlock.acquire(d)
    assert os.strerror(errno.ENOSPC) in str(refused.value)
    assert list(d.iterdir()) == []  # neither the lock nor its temporary file
    lock = runlock.acquire(d)  # space again: the next start goes ahead at once
    lock.release()


def test_a_full_disk_on_a_file_system_without_hard_links_leaves_no_partial_lock(tmp_path, monkeypatch):
    d = tmp_path / "run"
    d.mkdir()
    monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(OSError(errno.EPERM, "no hard links")))
    lock = runlock.acquire(d)  # created in place
    assert runlock.read_holder(d / runlock.LOCK_NAME).token == lock.holder.token
    lock.release()
    writes = iter([None])

    def full_after_one_byte(fd, data):
        if next(writes, "full") == "full":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os_write(fd, bytes(data[:1]))

    os_write = os.write
    monkeypatch.setattr(os, "write", full_after_one_byte)
    with pytest.raises(ValueError, match="could not create the run-directory lock"):
        runlock.acquire(d)
    assert list(d.iterdir()) == []


def test_a_lock_that_cannot_be_removed_does_not_fail_a_finished_run(tmp_path, capsys, monkeypatch):
    d = tmp_path / "run"
    unlink = Path.unlink

    def refuse_lock(self, *args, **kwargs):
        if self.name == runlock.LOCK_NAME:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", refuse_lock)
    code = cli.main(["train", "--out", str(d), "--no-eval", "--max-generations", "1", *_sets()])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 0, err
    assert "could not remove the run-directory lock" in err and "Traceback" not in err
    assert checkpoint.load(d / checkpoint.LATEST).generation == 1
    monkeypatch.setattr(Path, "unlink", unlink)
    monkeypatch.setattr(runlock, "INVALID_GRACE_S", 0.0)
    said: list[str] = []
    runlock.acquire(d, say=said.append).release()  # the next start takes it over: its process is gone
    assert any("released by its run" in s for s in said), said  # on any host, a few seconds later
