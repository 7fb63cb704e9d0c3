"""The hang watchdog under ``mpiexec -n 2``: a rank stopped with SIGSTOP is reported within
train.hang_timeout with the stopped rank named; with train.hang_abort the job ends with exit code 4
(EXIT_HUNG) and the run-directory lock is released, without it the job goes on once the rank resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpigls import parallel
from mpigls.run import checkpoint, runlock

from conftest import REPO, mpiexec

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

SETS = {
    "data.name": "digits",
    "data.num_train": 128,
    "model.name": "mlp-tiny",
    "optimizer.popsize": 4,
    "optimizer.block_size": 2,
    "train.batch_size": 32,
    "train.epochs": 2,
    "train.threads": 1,
    "train.progress": False,
    "train.checkpoint_every": 1,
    "train.hang_timeout": 3,
}

# rank 1 writes its PID and stops itself (SIGSTOP) while computing generation 3
SCRIPT = """
import os, signal, sys
from mpigls import cli
from mpigls.run import train
orig = train._work
def work(cfg, model, x, y, eps, *args):
    from mpi4py import MPI
    if MPI.COMM_WORLD.Get_rank() == 1 and train._GEN[0] == 2:
        open({pidfile!r}, "w").write(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGSTOP)
    train._GEN[0] += 1
    return orig(cfg, model, x, y, eps, *args)
train._GEN = [0]
train._work = work
sys.exit(cli.main(["train", "--out", {out!r}, "--no-eval", *{sets!r}]))
"""


def _run(tmp_path: Path, **extra) -> tuple[subprocess.Popen, Path, Path]:
    exe = mpiexec()
    if exe is None:
        pytest.skip("mpiexec not found")
    out, pidfile = tmp_path / "run", tmp_path / "rank1.pid"
    sets = []
    for k, v in {**SETS, **extra}.items():
        sets += ["--set", f"{k}={v}"]
    script = SCRIPT.format(pidfile=str(pidfile), out=str(out), sets=sets)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [exe, "-n", "2", sys.executable, "-m", "mpi4py", "-c", script],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, out, pidfile


def _resume_stopped(pidfile: Path) -> None:
    if pidfile.exists():
        try:
            os.kill(int(pidfile.read_text()), signal.SIGCONT)
        except (ProcessLookupError, ValueError):
            pass


def test_a_stopped_rank_is_named_and_the_job_ends_with_exit_code_4(tmp_path):
    proc, out, pidfile = _run(tmp_path)
    try:
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        _resume_stopped(pidfile)  # never leave a stopped process behind
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = " ".join(stderr.split())
    assert pidfile.exists(), err[-3000:]  # rank 1 really stopped itself
    assert "hang watchdog: generation 3 has run" in err, err[-3000:]
    assert "rank(s) [1] (host(s)" in err and "while rank(s) [0] wait for them" in err
    assert f"exit code {parallel.EXIT_HUNG}" in err
    assert proc.returncode == parallel.EXIT_HUNG, (proc.returncode, err[-3000:])
    assert checkpoint.load(out / checkpoint.LATEST).generation == 2  # a requeue resumes from here
    assert not (out / runlock.LOCK_NAME).exists()  # rank 0 released the lock before ending the job


def test_without_abort_the_report_comes_and_the_run_goes_on_when_the_rank_resumes(tmp_path):
    proc, out, pidfile = _run(tmp_path, **{"train.hang_abort": False})
    try:
        deadline = time.monotonic() + 120
        while not pidfile.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(5)  # past the 3 s limit: the report is out
        _resume_stopped(pidfile)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        _resume_stopped(pidfile)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = " ".join(stderr.split())
    assert proc.returncode == 0, err[-3000:]
    assert "hang watchdog: generation 3 has run" in err and "rank(s) [1] (host(s)" in err
    assert "still waiting (train.hang_abort is false)" in err
    assert checkpoint.load(out / checkpoint.LATEST).generation == 8  # 2 epochs of 4 batches
