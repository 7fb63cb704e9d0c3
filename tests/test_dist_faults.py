"""Whole-job fault behaviour: each test launches its own ``mpiexec -n 2`` and checks that the job
ends (no hang: enforced by the subprocess timeout), with which exit code and which message."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
NO_HANG_S = 60  # generous for a loaded 2-core machine; a hang would be "forever"

pytestmark = [
    pytest.mark.skipif(
        MPIEXEC is None or importlib.util.find_spec("mpi4py") is None, reason="needs mpi4py and mpiexec"
    ),
    pytest.mark.slow,
]  # every test launches mpiexec

SCRIPT = r"""
import os, signal, sys, time
from mpigls import parallel

mode = sys.argv[1]
comm = parallel.init_comm()
last = comm.world_size - 1


def body():
    if mode == "raise":
        if comm.rank == 1:
            raise RuntimeError("boom on rank one")
        comm.barrier()
    elif mode == "sigkill":
        if comm.rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        comm.barrier()
    elif mode == "user_all":
        raise ValueError("optimizer.popsize must be even, got 255; use 254 or 256")
    elif mode == "user_one":
        if comm.rank == 1:
            raise FileNotFoundError("data.root /nowhere does not exist; set data.root")
        comm.barrier()
    elif mode == "preempt":
        with parallel.StopSignal() as stop:
            for generation in range(10_000):
                if generation == 5 and comm.rank == last:
                    os.kill(os.getpid(), signal.SIGUSR1)
                if comm.agree_any(stop.requested):
                    print(f"rank {comm.rank} stops at generation {generation}", flush=True)
                    return parallel.EXIT_PREEMPTED
    elif mode == "wait_signal":
        with parallel.StopSignal() as stop:
            print("ready", flush=True)
            while not comm.agree_any(stop.requested):
                time.sleep(0.01)
            print(f"rank {comm.rank} got signal {stop.signum}", flush=True)
            return parallel.EXIT_PREEMPTED
    return 0


if mode == "unguarded":
    if comm.rank == 1:
        raise RuntimeError("unguarded boom")
    comm.barrier()
else:
    raise SystemExit(parallel.run_guarded(body, comm))
"""


def _env() -> dict[str, str]:
    drop = ("PMI_", "PMIX_", "HYDRA_", "MPIR_", "OMPI_", "I_MPI_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def launch(tmp_path: Path, mode: str, n: int = 2) -> subprocess.CompletedProcess:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    return subprocess.run(
        [MPIEXEC, "-n", str(n), sys.executable, "-m", "mpi4py", str(script), mode],
        capture_output=True,
        text=True,
        timeout=NO_HANG_S,
        env=_env(),
        cwd=tmp_path,
    )


def test_exception_on_one_rank_aborts_job_with_its_traceback(tmp_path):
    res = launch(tmp_path, "raise")
    assert res.returncode != 0
    assert "[rank 1] Traceback (most recent call last):" in res.stderr
    assert "[rank 1] RuntimeError: boom on rank one" in res.stderr


def test_unguarded_exception_still_aborts_under_python_m_mpi4py(tmp_path):
    res = launch(tmp_path, "unguarded")
    assert res.returncode != 0
    assert "RuntimeError: unguarded boom" in res.stderr


def test_killed_rank_ends_job(tmp_path):
    res = launch(tmp_path, "sigkill")
    assert res.returncode != 0


def test_user_error_on_all_ranks_prints_one_paragraph_exit_2(tmp_path):
    res = launch(tmp_path, "user_all")
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines == ["error: optimizer.popsize must be even, got 255; use 254 or 256"]


def test_user_error_on_one_rank_ends_job(tmp_path):
    res = launch(tmp_path, "user_one")
    assert res.returncode != 0
    assert "[rank 1] error: data.root /nowhere does not exist; set data.root" in res.stderr
    assert "Traceback" not in res.stderr


def test_signal_on_one_rank_stops_all_at_same_generation_exit_3(tmp_path):
    res = launch(tmp_path, "preempt", n=3)
    assert res.returncode == 3, res.stderr
    # the launcher merges the ranks' stdout without keeping lines whole: match, don't split
    stops = sorted(re.findall(r"rank \d stops at generation \d+", res.stdout))
    assert stops == [f"rank {r} stops at generation 5" for r in range(3)]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_to_mpiexec_reaches_ranks_exit_3(tmp_path, signum):
    """What SLURM does with --signal=B:USR1 / scancel: the launcher forwards it to every rank."""
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen(
        [MPIEXEC, "-n", "2", sys.executable, "-m", "mpi4py", str(script), "wait_signal"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=tmp_path,
    )
    try:
        seen = ""
        while seen.count("ready") < 2:  # lines of different ranks may arrive merged
            chunk = proc.stdout.readline()
            assert chunk, f"job ended before both ranks were ready: {proc.stderr.read()}"
            seen += chunk
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=NO_HANG_S)
    finally:
        proc.kill()
    assert proc.returncode == 3, err
    got = sorted(re.findall(r"rank \d got signal \d+", out))
    assert got == [f"rank {r} got signal {int(signum)}" for r in range(2)]
