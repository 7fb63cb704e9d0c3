"""The hang watchdog. Its decision (``verdict``: whom a waiting rank names) on hand-made progress
records; then under ``mpiexec``: a rank stopped with SIGSTOP in each phase of a generation (evaluate,
inside the exchange's first collective, tell, validate, checkpoint, inside the checkpoint's
broadcast, done), at 2 and at 3 ranks, is named while it is still stopped and the run goes on once it
resumes; with train.hang_abort the job ends with exit code 4 (EXIT_HUNG) and releases the run lock,
for a rank stopped from outside at a population with no work block for it, and for rank 0 stopped
while it writes a checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mpigls import parallel
from mpigls.parallel import watchdog as wd
from mpigls.parallel.watchdog import Seen, verdict
from mpigls.run import checkpoint, runlock
from procs import rank_pids

from conftest import REPO, mpiexec

NOW = 100.0


def _seen(position: int, *, heard: float = NOW, moved: float = 0.0) -> Seen:
    return Seen(position=position, generation=3, phase="exchange", heard=heard, moved=moved)


# ----------------------------------------------------------------------------- verdict


def test_a_rank_behind_the_collective_is_named():
    seen = [_seen(7), _seen(6), _seen(7)]  # rank 1 has not entered collective 4
    assert verdict(0, seen, NOW) == ("behind", [1], [0, 2])


def test_a_rank_that_moved_a_moment_ago_is_not_named_yet():
    seen = [_seen(7), _seen(6, moved=NOW - 0.2)]  # its message may lag its progress
    assert verdict(0, seen, NOW) is None


def test_a_silent_rank_inside_the_same_collective_is_named():
    seen = [_seen(7), _seen(7, heard=NOW - wd.SILENCE_S - 1), _seen(7)]  # stopped after it entered
    assert verdict(0, seen, NOW) == ("silent", [1], [0, 2])


def test_every_rank_inside_one_collective_and_alive_is_a_stuck_collective():
    assert verdict(0, [_seen(7), _seen(7)], NOW) == ("stuck", [], [0, 1])
    assert verdict(0, [_seen(7), _seen(7, moved=NOW - 1)], NOW) is None  # not for long yet


def test_a_rank_that_is_not_waiting_names_no_one():
    assert verdict(0, [_seen(6), _seen(3)], NOW) is None


def test_the_final_evaluation_names_only_silent_ranks():
    behind = [_seen(7), _seen(6)]  # rank 1 computes its share of the test set: not a hang
    assert verdict(0, behind, NOW, silence_s=10, only_silent=True) is None
    silent = [_seen(7), _seen(6, heard=NOW - 11)]
    assert verdict(0, silent, NOW, silence_s=10, only_silent=True) == ("silent", [1], [0])
    assert verdict(0, [_seen(7), _seen(7)], NOW, silence_s=10, only_silent=True) is None


def test_another_rank_names_only_rank_0():
    assert verdict(1, [_seen(6), _seen(7), None], NOW) == ("behind", [0], [1])
    assert verdict(1, [_seen(7, heard=NOW - 9), _seen(7), None], NOW) == ("silent", [0], [1])
    assert verdict(1, [_seen(7), _seen(7), None], NOW) is None  # rank 2 is rank 0's to name


class _Channel:
    """One rank, no messages: for counting positions."""

    def Get_rank(self) -> int:
        return 0

    def Get_size(self) -> int:
        return 1

    def send(self, obj, dests) -> None:
        pass

    def poll(self) -> list:
        return []


def test_positions_count_collectives_and_nested_ones_once():
    watch = wd.HangWatchdog(_Channel(), ["h"], 5.0, abort=False)
    try:
        with watch.waiting:
            assert watch._position == 1
            with watch.waiting:
                assert watch._position == 1
            assert watch._position == 1
        assert watch._position == 2
        with watch.waiting:
            assert watch._position == 3
        assert watch._position == 4
    finally:
        watch.close()


# ----------------------------------------------------------------------------- under mpiexec

SETS = {
    "data.name": "digits",
    "data.num_train": 128,
    "data.val_size": 32,
    "model.name": "mlp-tiny",
    "optimizer.popsize": 8,
    "optimizer.block_size": 2,  # 2 blocks: one each at 2 ranks, none for rank 2 at 3 ranks
    "train.batch_size": 32,
    "train.epochs": 7,
    "train.threads": 1,
    "train.progress": False,
    "train.checkpoint_every": 1,
    "train.hang_timeout": 2,
    "eval.every": 1,
    "eval.num_val": 16,
    "eval.methods": "[ibp]",
    "eval.pgd_steps": 0,
}

# Under mpiexec: the ranks stop themselves (SIGSTOP) as PLAN says, {generation: (rank, phase, inside)}:
# at the phase mark, or (inside) right after entering the phase's first collective. Each writes its PID
# to DIR/stop-<generation> first.
SCRIPT = """
import os, signal, sys
from mpi4py import MPI
from mpigls import cli
from mpigls.parallel import watchdog as wd
from mpigls.run import checkpoint
RANK, PLAN, DIR = MPI.COMM_WORLD.Get_rank(), {plan!r}, {dir!r}
now = {{"g": 0, "phase": "", "fired": set()}}
def stop_if(inside):
    g = now["g"]
    if PLAN.get(g) == (RANK, now["phase"], inside) and g not in now["fired"]:
        now["fired"].add(g)
        path = os.path.join(DIR, "stop-%d" % g)
        open(path + ".tmp", "w").write(str(os.getpid()))
        os.rename(path + ".tmp", path)
        os.kill(os.getpid(), signal.SIGSTOP)
begin, mark, enter = wd.HangWatchdog.begin, wd.HangWatchdog.mark, wd.HangWatchdog.enter_collective
def my_begin(self, g):
    begin(self, g); now["g"], now["phase"] = g, wd.EVALUATE; stop_if(False)
def my_mark(self, phase):
    mark(self, phase); now["phase"] = phase; stop_if(False)
def my_enter(self):
    enter(self); stop_if(True)
wd.HangWatchdog.begin, wd.HangWatchdog.mark, wd.HangWatchdog.enter_collective = my_begin, my_mark, my_enter
save = checkpoint.save
def my_save(*a, **k):  # "checkpoint/write": stop halfway through writing (rank 0)
    now["phase"] = "checkpoint/write"; stop_if(False); now["phase"] = wd.CHECKPOINT; return save(*a, **k)
checkpoint.save = my_save
from mpigls.run import finaleval
final = finaleval.evaluate
def my_final(*a, **k):  # "final": the final evaluation, PLAN key 0
    now["g"], now["phase"] = 0, "final"; stop_if(False); return final(*a, **k)
finaleval.evaluate = my_final
sys.exit(cli.main(["train", "--out", {out!r}, *{args!r}, *{sets!r}]))
"""


class _Job:
    """An mpiexec job of SCRIPT whose stderr lines are collected with their arrival times."""

    def __init__(self, tmp_path: Path, ranks: int, plan: dict, args: tuple = ("--no-eval",), **extra):
        exe = mpiexec()
        if exe is None:
            pytest.skip("mpiexec not found")
        self.dir, self.out = tmp_path, tmp_path / "run"
        sets = []
        for k, v in {**SETS, **extra}.items():
            sets += ["--set", f"{k}={v}"]
        script = SCRIPT.format(plan=plan, dir=str(tmp_path), out=str(self.out), args=list(args), sets=sets)
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            [exe, "-n", str(ranks), sys.executable, "-m", "mpi4py", "-c", script],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[tuple[float, str]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line))

    def text(self) -> str:
        return " ".join(" ".join(line for _, line in list(self.lines)).split())

    def wait_for(self, what, deadline_s: float) -> float:
        """The time ``what()`` first held; fails when the job ends or the deadline passes first."""
        end = time.monotonic() + deadline_s
        while not what():
            assert self.proc.poll() is None, f"the job ended ({self.proc.returncode}): {self.text()[-3000:]}"
            assert time.monotonic() < end, self.text()[-3000:]
            time.sleep(0.05)
        return time.monotonic()

    def resume_all(self) -> None:
        for f in self.dir.glob("stop-*"):
            try:
                os.kill(int(f.read_text()), signal.SIGCONT)
            except (ProcessLookupError, ValueError):
                pass

    def finish(self, timeout: float) -> int:
        """The job's exit code once it ends (within ``timeout`` seconds, else it is killed)."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            self.resume_all()  # never leave a stopped process behind
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        time.sleep(0.2)  # the reader thread's last lines
        return self.proc.returncode


PHASES = [  # (phase, inside its first collective)
    (wd.EVALUATE, False),
    (wd.EXCHANGE, True),
    (wd.TELL, False),
    (wd.VALIDATE, True),
    ("checkpoint/write", False),
    (wd.CHECKPOINT, True),
    (wd.DONE, False),
    (wd.EXCHANGE, False),
]


def _plan(ranks: int) -> dict:
    """Generation 2, 5, 8, ...: one stop each (two normal generations between them keep the recent median
    normal), on the ranks in turn (rank 0 writes the checkpoints)."""
    plan = {}
    for i, (phase, inside) in enumerate(PHASES):
        rank = 0 if phase == "checkpoint/write" else (i + 1) % ranks
        plan[2 + 3 * i] = (rank, phase, inside)
    return plan


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("ranks", [2, 3])
def test_a_rank_stopped_in_any_phase_is_named_and_the_run_goes_on_when_it_resumes(tmp_path, ranks):
    plan = _plan(ranks)
    job = _Job(tmp_path, ranks, plan, **{"train.hang_abort": False})
    delays = {}
    try:
        for g, (rank, phase, inside) in plan.items():
            stopped = job.wait_for((tmp_path / f"stop-{g}").exists, 180)
            # a rank stopped once it completed generation g is waited for in generation g + 1
            heading = f"hang watchdog: generation {g + 1 if phase == wd.DONE else g} has run"
            reported = job.wait_for(lambda h=heading: h in job.text(), 60)  # the rank is still stopped
            delays[(phase, inside)] = round(reported - stopped, 1)
            report = job.text()[job.text().index(heading) :][:900]
            assert f"rank(s) [{rank}] (host(s)" in report, (phase, inside, report)
            assert "still waiting (train.hang_abort is false)" in report
            os.kill(int((tmp_path / f"stop-{g}").read_text()), signal.SIGCONT)
    except BaseException:
        job.finish(timeout=0)
        raise
    code = job.finish(timeout=240)
    print(f"{ranks} ranks: seconds from the stop to the report, by phase: {delays}")
    assert code == 0, job.text()[-3000:]
    assert checkpoint.load(job.out / checkpoint.LATEST).generation == 28  # 7 epochs of 4 batches


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_rank_without_work_stopped_from_outside_ends_the_job_with_exit_code_4(tmp_path):
    """P 8 at 2 ranks: one work block, all rank 0's; rank 1 spends its generations waiting in the
    exchange, where ``kill -STOP`` finds it."""
    job = _Job(tmp_path, 2, {}, **{"optimizer.block_size": 8, "train.epochs": 100, "eval.every": 0})
    try:
        job.wait_for((job.out / checkpoint.LATEST).exists, 180)
        time.sleep(1)
        victim = rank_pids(job.proc.pid)[1]
        (tmp_path / "stop-x").write_text(str(victim))
        os.kill(victim, signal.SIGSTOP)
    finally:
        code = job.finish(timeout=120)
    err = job.text()
    assert "hang watchdog: generation" in err and "rank(s) [1] (host(s)" in err, err[-3000:]
    assert f"exit code {parallel.EXIT_HUNG}" in err
    assert code == parallel.EXIT_HUNG, (code, err[-3000:])
    assert not (job.out / runlock.LOCK_NAME).exists()  # rank 0 released the lock before ending the job


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_rank_0_stopped_while_writing_a_checkpoint_ends_the_job_with_exit_code_4(tmp_path):
    job = _Job(tmp_path, 2, {3: (0, "checkpoint/write", False)}, **{"eval.every": 0, "train.epochs": 1})
    try:
        job.wait_for((tmp_path / "stop-3").exists, 180)
    finally:
        code = job.finish(timeout=120)
    err = job.text()
    assert "[rank 1] hang watchdog: generation 3 has run" in err, err[-3000:]
    assert "rank(s) [0] (host(s)" in err and "while rank(s) [1] wait for them" in err
    assert code == parallel.EXIT_HUNG, (code, err[-3000:])
    assert checkpoint.load(job.out / checkpoint.LATEST).generation == 2  # a requeue resumes from here


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_rank_stopped_in_the_final_evaluation_ends_the_job_with_exit_code_4(tmp_path):
    sets = {"eval.every": 0, "train.epochs": 1, "data.num_test": 32}
    job = _Job(tmp_path, 2, {0: (1, "final", False)}, args=(), **sets)
    try:
        job.wait_for((tmp_path / "stop-0").exists, 180)
    finally:
        code = job.finish(timeout=120)
    err = job.text()
    assert "hang watchdog: the final evaluation has run" in err and "rank(s) [1] (host(s)" in err, err[-3000:]
    assert code == parallel.EXIT_HUNG, (code, err[-3000:])
    assert not (job.out / runlock.LOCK_NAME).exists()
