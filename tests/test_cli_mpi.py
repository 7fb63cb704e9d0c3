"""End to end through the CLI and mpiexec: world-size invariance, faults, signals, user errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mpigls.run import checkpoint
from procs import rank_pids

from conftest import REPO, mpiexec, run_mpigls, tiny_overrides

pytestmark = pytest.mark.slow  # every test runs the CLI in subprocesses, most under mpiexec

LONG_EPOCHS = 5000  # 40000 generations (minutes): only a signal ends these runs within the test's time


def _sets(**extra):
    return [a for kv in tiny_overrides(**extra) for a in ("--set", kv)]


def _inspect(path):
    return json.loads(run_mpigls(["inspect", str(path), "--json"]).stdout)


@pytest.mark.parametrize("optimizer", ["pgpe", "rgs", "grad"])
def test_same_theta_and_sigma_for_1_2_3_4_ranks(tmp_path, optimizer):
    extra = {"optimizer.name": optimizer}
    if optimizer == "pgpe":  # sigma adapts, so sigma's bits are compared too
        extra.update({"optimizer.fixed_sigma": False, "optimizer.sigma_lr": 0.1})
    if optimizer == "rgs":
        extra.update({"optimizer.num_samples": 6, "optimizer.block_size": 1})
    if optimizer == "grad":
        extra.update({"optimizer.block_size": 5})  # 32 examples: 7 blocks, not divisible by 2, 3, 4
    digests = {}
    for ranks in (1, 2, 3, 4):
        out = tmp_path / f"n{ranks}"
        layout = {"train.fake_nodes": 2} if ranks == 4 else {}  # 2 simulated nodes x 2 ranks
        run_mpigls(
            ["train", "--out", str(out), "--max-generations", "4", "--no-eval", *_sets(**extra, **layout)], ranks=ranks
        )
        ck = checkpoint.load(out / "latest.h5")
        assert ck.generation == 4
        digests[ranks] = (_inspect(out / "latest.h5")["theta_sha256"], None if ck.sigma is None else ck.sigma.tobytes())
    assert len(set(digests.values())) == 1, {k: v[0] for k, v in digests.items()}
    if optimizer == "pgpe":  # resume on another world size: 3 ranks for 2 generations, then 2 ranks
        out = tmp_path / "switch"
        run_mpigls(["train", "--out", str(out), "--max-generations", "2", "--no-eval", *_sets(**extra)], ranks=3)
        run_mpigls(["train", "--out", str(out), "--max-generations", "4", "--no-eval", *_sets(**extra)], ranks=2)
        assert _inspect(out / "latest.h5")["theta_sha256"] == digests[1][0]


def test_cli_train_prints_final_accuracy_and_user_errors(tmp_path):
    proc = run_mpigls(["train", "--out", str(tmp_path / "r"), *_sets()], ranks=2)
    assert "final test accuracy" in proc.stdout and "certified/ibp" in proc.stdout
    proc = run_mpigls(
        ["train", "--out", str(tmp_path / "bad"), *_sets(**{"optimizer.popsize": 255})],
        ranks=2,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "popsize must be even" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_mpigls(["certify", str(tmp_path / "r" / "latest.h5"), "--json"])
    res = json.loads(proc.stdout)
    assert 0 <= res["certified/ibp"] <= res["natural"] <= 1
    saved = json.loads((tmp_path / "r" / "eval.json").read_text())  # the final eval is kept on disk
    assert saved["theta_sha256"] == _inspect(tmp_path / "r" / "latest.h5")["theta_sha256"]
    assert saved["certified/ibp"] == res["certified/ibp"] and saved["natural"] == res["natural"]
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not an hdf5 file at all")
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes((tmp_path / "r" / "latest.h5").read_bytes()[:3000])
    for bad in (garbage, truncated, tmp_path / "missing.h5"):
        proc = run_mpigls(["inspect", str(bad)], check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and str(bad.name) in proc.stderr, proc.stderr


def _popen(args, ranks, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "mpi4py", "-m", "mpigls", *args]
    if ranks > 1:
        cmd = [mpiexec(), "-n", str(ranks), *cmd]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO, start_new_session=True
    )


def _wait_for(out, proc, generation, timeout=120):
    """Wait until OUT/latest.h5 holds at least ``generation`` while ``proc`` still runs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.communicate()}")
        try:
            if checkpoint.load(out / "latest.h5", verify=False).generation >= generation:
                return
        except (checkpoint.CheckpointError, OSError):
            pass  # not written yet
        time.sleep(0.05)
    raise AssertionError("timed out waiting for a checkpoint")


def _rank_pids(proc):
    """PIDs of the Python rank processes below ``proc`` (any depth: mpiexec -> proxy -> ranks)."""
    return rank_pids(proc.pid)


def test_kill9_then_resume_matches_uninterrupted(tmp_path):
    # long enough (a checkpoint every generation) that the kill lands mid-run, not after it
    args = ["--max-generations", "300", *_sets(**{"train.epochs": LONG_EPOCHS, "train.checkpoint_every": 1})]
    run_mpigls(["train", "--out", str(tmp_path / "straight"), "--no-eval", *args])
    out = tmp_path / "killed"
    proc = _popen(["train", "--out", str(out), "--no-eval", *args], 1, tmp_path)
    _wait_for(out, proc, 3)
    os.killpg(os.getpgid(proc.pid), signal.SIGKILL)
    proc.wait(timeout=30)
    assert 3 <= checkpoint.load(out / "latest.h5").generation < 300
    run_mpigls(["train", "--out", str(out), "--no-eval", *args])
    assert _inspect(out / "latest.h5")["theta_sha256"] == _inspect(tmp_path / "straight" / "latest.h5")["theta_sha256"]
    assert not list(out.glob(".tmp*")), "stale temp files must be cleaned at start"


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_stops_with_checkpoint_and_exit_3(tmp_path, sig):
    args = _sets(**{"train.epochs": LONG_EPOCHS, "train.checkpoint_every": 2})
    out = tmp_path / "pre"
    proc = _popen(["train", "--out", str(out), "--no-eval", *args], 2, tmp_path)
    _wait_for(out, proc, 2)  # the ranks are training (handlers installed)
    pids = _rank_pids(proc)
    assert len(pids) == 2, pids
    for pid in pids:
        os.kill(pid, sig)  # as srun forwards the batch script's signal to every task
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    stopped = checkpoint.load(out / "latest.h5").generation
    assert 2 <= stopped < LONG_EPOCHS * 8
    proc2 = run_mpigls(["train", "--out", str(out), "--no-eval", "--max-generations", str(stopped + 2), *args], ranks=2)
    assert f"resuming from generation {stopped}" in proc2.stdout


def test_ctrl_c_on_mpiexec_stops_with_checkpoint(tmp_path):
    """Ctrl-C in a terminal: mpiexec forwards SIGINT to every rank; they stop together, cleanly."""
    args = _sets(**{"train.epochs": LONG_EPOCHS, "train.checkpoint_every": 2})
    out = tmp_path / "ctrlc"
    proc = _popen(["train", "--out", str(out), "--no-eval", *args], 2, tmp_path)
    _wait_for(out, proc, 2)
    os.kill(proc.pid, signal.SIGINT)  # proc is mpiexec itself
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert "stop requested (SIGINT)" in stdout and "Traceback" not in err
    assert checkpoint.load(out / "latest.h5").generation >= 2


def test_rank_exception_aborts_job_quickly(tmp_path):
    script = (
        "import sys; from mpigls import cli\nfrom mpigls.optim import pgpe\n"
        "orig = pgpe.tell  # the PGPE unit calls pgpe.tell\n"
        "def boom(state, *a, **k):\n"
        "    from mpi4py import MPI\n"
        "    if state.generation == 2 and MPI.COMM_WORLD.Get_rank() == 1: raise RuntimeError('injected failure on rank 1')\n"
        "    return orig(state, *a, **k)\n"
        "pgpe.tell = boom\n"
        f"sys.exit(cli.main(['train', '--out', {str(tmp_path / 'x')!r}, '--no-eval', *{_sets(**{'train.epochs': 50})!r}]))\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    t0 = time.time()
    proc = subprocess.run(
        [mpiexec(), "-n", "2", sys.executable, "-m", "mpi4py", "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stderr
    assert time.time() - t0 < 90


def test_ranks_that_diverge_are_named_and_stop_the_run(tmp_path):
    """Silent divergence (as non-deterministic hardware could cause) is caught by the theta hash
    check every train.consistency_every (2 here) generations, before it reaches a checkpoint."""
    out = tmp_path / "x"
    script = (
        "import sys, dataclasses; from mpigls import cli\nfrom mpigls.optim import pgpe\n"
        "orig = pgpe.tell  # the PGPE unit calls pgpe.tell\n"
        "def drift(state, *a, **k):\n"
        "    from mpi4py import MPI\n"
        "    new, metrics = orig(state, *a, **k)\n"
        "    if new.generation == 3 and MPI.COMM_WORLD.Get_rank() == 2:\n"
        "        new = dataclasses.replace(new, center=new.center + 1e-7)\n"
        "    return new, metrics\n"
        "pgpe.tell = drift\n"
        f"sys.exit(cli.main(['train', '--out', {str(out)!r}, '--no-eval', *{_sets(**{'train.epochs': 50})!r}]))\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [mpiexec(), "-n", "3", sys.executable, "-m", "mpi4py", "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode != 0
    err = " ".join(proc.stderr.split())
    assert "consistency check 'theta' failed at generation 4: rank(s) [2] (host(s)" in err, err[-2000:]
    assert "than rank(s) [0, 1]" in err and "MKL_CBWR" in err and "resume from the last checkpoint" in err
    assert checkpoint.load(out / "latest.h5").generation == 2  # the last state all ranks agreed on


def test_landscape_plot_and_certify_commands(tmp_path):
    out = tmp_path / "r"
    run_mpigls(["train", "--out", str(out), "--max-generations", "2", "--no-eval", *_sets()])
    png = tmp_path / "fig6.png"
    proc = run_mpigls(
        [
            "landscape",
            str(out / "latest.h5"),
            "--out",
            str(png),
            "--sigmas",
            "0.01,0.1",
            "--methods",
            "ibp,deeppoly",
            "--num-samples",
            "2",
            "--num-points",
            "3",
            "--batch-size",
            "8",
        ]
    )
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", proc.stdout
    metrics_png = tmp_path / "m.png"
    run_mpigls(["plot", str(out / "latest.h5"), "--out", str(metrics_png)])
    assert metrics_png.read_bytes()[:4] == b"\x89PNG"
    proc = run_mpigls(["plot", str(out / "latest.h5"), "--keys", "nope"], check=False)
    assert proc.returncode == 2 and "available" in proc.stderr
