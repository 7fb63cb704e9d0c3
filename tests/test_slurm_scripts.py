"""The SLURM job scripts (jobs/*.sbatch) under fake ``sbatch``, ``srun`` and ``scontrol``.

Fake executables first on PATH stand in for SLURM: ``sbatch`` runs the script the way SLURM does with
``--export`` (``ALL,...``: this environment plus the listed variables; a bare list: only those and the
SLURM variables), ``srun`` starts its command once per task with ``SLURM_PROCID`` (and can play the
step being killed: every task that is still running gets 128+9), ``scontrol`` records its arguments.
The ranks run a stub ``python`` that records its environment and exits with the code given for its
rank; no training runs. What is checked: exit 3 and 4 requeue the job, other codes do not; the job
ends with the code a rank exited with (not srun's 128+signal); the environment of the submitting
shell and of the site hook (``MPIGLS_ENV_SETUP``) reaches the ranks; every documented ``sbatch``
command passes ``--export=ALL,...``.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "jobs"
TRAINING = ["slurm.sbatch", "gpu-single.sbatch", "study.sbatch"]

FAKE_SBATCH = r"""
import os, subprocess, sys
args = sys.argv[1:]
export, array = "ALL", None
while args and args[0].startswith("--"):
    opt = args.pop(0)
    if opt.startswith("--export="):
        export = opt.split("=", 1)[1]
    elif opt.startswith("--array="):
        array = opt.split("=", 1)[1]
script = args.pop(0)
items = export.split(",")
env = dict(os.environ) if items[0] == "ALL" else {k: v for k, v in os.environ.items() if k.startswith("SLURM")}
for item in items:
    if "=" in item:
        k, v = item.split("=", 1)
        env[k] = v
env.update(SLURM_JOB_ID="4242", SLURM_EXPORT_ENV=export)
if array is not None:
    env["SLURM_ARRAY_TASK_ID"] = array.split("-")[0]
batch = subprocess.Popen(["/bin/bash", script, *args], env=env)
with open(os.path.join(os.environ["FAKE_LOG"], "batch-pid"), "w") as f:
    f.write(str(batch.pid))
sys.exit(batch.wait())
"""

FAKE_SRUN = r"""
import os, signal, subprocess, sys
log = os.environ["FAKE_LOG"]
with open(os.path.join(log, "srun-args"), "w") as f:
    f.write(" ".join(sys.argv[1:]))
args = sys.argv[1:]
while args and args[0].startswith("-"):
    args.pop(0)
if os.environ.get("SLURM_EXPORT_ENV", "ALL").split(",")[0] == "ALL":
    env = dict(os.environ)
else:
    env = {k: v for k, v in os.environ.items() if k.startswith("SLURM")}
ntasks = int(os.environ.get("FAKE_NTASKS", "2"))
procs = [subprocess.Popen(args, env={**env, "SLURM_PROCID": str(r)}) for r in range(ntasks)]
for sig in (signal.SIGUSR1, signal.SIGTERM):  # srun passes these on to every task
    signal.signal(sig, lambda num, frame: [p.send_signal(num) for p in procs])
codes = [p.wait() for p in procs]
if os.environ.get("FAKE_STEP_KILLED") == "1" and any(codes):
    sys.exit(137)  # the step was ended: srun reports the peers it killed (128 + SIGKILL)
sys.exit(max(codes))
"""

FAKE_SCONTROL = """#!/bin/sh
echo "$@" >> "$FAKE_LOG/scontrol"
"""

FAKE_PYTHON = """#!/bin/sh
# a rank: record argv and environment, exit with this rank's code from FAKE_CODES
rank=${SLURM_PROCID:-0}
{ echo "argv=$*"; env; } > "$FAKE_LOG/rank-$rank"
if [ -n "${FAKE_WAIT_FOR_STOP:-}" ]; then  # train until a stop signal, then exit 3 as mpigls does
  trap 'exit 3' USR1 TERM
  touch "$FAKE_LOG/started-$rank"
  while :; do sleep 0.05; done
fi
set -- $FAKE_CODES
shift "$rank" 2>/dev/null || true
exit "${1:-0}"
"""


def _write(path: Path, text: str, python: bool = False) -> None:
    path.write_text((f"#!{sys.executable}\n" if python else "") + text.lstrip("\n"))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def slurm(tmp_path):
    """(bin, log): fake sbatch/srun/scontrol in bin; the stub python in tmp_path/venv/bin."""
    bin_, log, venv = tmp_path / "bin", tmp_path / "log", tmp_path / "venv" / "bin"
    for d in (bin_, log, venv):
        d.mkdir(parents=True)
    _write(bin_ / "sbatch", FAKE_SBATCH, python=True)
    _write(bin_ / "srun", FAKE_SRUN, python=True)
    _write(bin_ / "scontrol", FAKE_SCONTROL)
    _write(venv / "python", FAKE_PYTHON)
    return bin_, log


def _env(bin_: Path, log: Path, *, with_venv: bool = True, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    path = [str(bin_)] + ([str(bin_.parent / "venv" / "bin")] if with_venv else []) + ["/usr/bin", "/bin"]
    env.update(PATH=os.pathsep.join(path), FAKE_LOG=str(log), **extra)
    return env


def _submit(script: str, env: dict[str, str], tmp_path: Path, **variables: str) -> subprocess.CompletedProcess:
    export = ",".join(["ALL", *(f"{k}={v}" for k, v in variables.items())])
    args = ["sbatch", f"--export={export}", "--array=0-0", str(JOBS / script)]
    return subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)


def _vars(script: str, tmp_path: Path) -> dict[str, str]:
    if script == "study.sbatch":
        return {"STUDY": "study.yaml", "STAGE": "0"}
    return {"CONFIG": "config.yaml", "OUT": str(tmp_path / "out")}


def _requeued(log: Path) -> bool:
    path = log / "scontrol"
    return path.exists() and "requeue 4242" in path.read_text()


@pytest.mark.parametrize("script", TRAINING)
@pytest.mark.parametrize("code", [0, 1, 2, 3, 4])
def test_exit_3_and_4_requeue_the_job(slurm, tmp_path, script, code):
    bin_, log = slurm
    env = _env(bin_, log, FAKE_CODES=f"{code} {code}")
    done = _submit(script, env, tmp_path, **_vars(script, tmp_path))
    assert done.returncode == code, done.stderr
    assert _requeued(log) == (code in (3, 4)), (code, done.stdout)


@pytest.mark.parametrize("codes", ["3 0", "0 4", "2 0", "0 1"])
def test_a_rank_code_survives_srun(slurm, tmp_path, codes):
    """The job ends with the code one rank exited with, also when srun reports 128+signal for the
    peers that the end of the job killed; 3 and 4 requeue."""
    bin_, log = slurm
    env = _env(bin_, log, FAKE_CODES=codes, FAKE_STEP_KILLED="1")
    done = _submit("slurm.sbatch", env, tmp_path, **_vars("slurm.sbatch", tmp_path))
    code = max(int(c) for c in codes.split())
    assert done.returncode == code, done.stderr
    assert _requeued(log) == (code in (3, 4))
    args = (log / "srun-args").read_text()
    assert "--kill-on-bad-exit=0" in args  # srun does not kill a rank's peers: the package ends them
    assert not (tmp_path / "out" / ".exit-codes-4242").exists()  # the per-rank codes are cleaned up


@pytest.mark.parametrize("script", TRAINING)
def test_environment_reaches_the_ranks(slurm, tmp_path, script):
    """The submitting shell's variables (PATH, a user variable) and what the site hook sets (a
    virtual environment put first on PATH) reach every rank; the rank runs mpigls."""
    bin_, log = slurm
    setup = tmp_path / "env.sh"
    setup.write_text(
        f'export VIRTUAL_ENV={tmp_path}/venv\nexport PATH="$VIRTUAL_ENV/bin:$PATH"\nexport SITE_HOOK=ran\n'
    )
    env = _env(bin_, log, with_venv=False, FAKE_CODES="0 0", MY_SETTING="kept", MPIGLS_ENV_SETUP=str(setup))
    done = _submit(script, env, tmp_path, **_vars(script, tmp_path))
    assert done.returncode == 0, done.stderr
    ranks = sorted(log.glob("rank-*"))
    assert len(ranks) == (2 if script == "slurm.sbatch" else 1)
    for rank in ranks:
        text = rank.read_text()
        assert "MY_SETTING=kept" in text and "SITE_HOOK=ran" in text and f"VIRTUAL_ENV={tmp_path}/venv" in text
        assert re.search(r"^PATH=.*" + re.escape(str(bin_)), text, re.M)
        assert "-m mpigls" in text.splitlines()[0]


def test_a_failing_site_hook_ends_the_job_without_launching(slurm, tmp_path):
    bin_, log = slurm
    env = _env(bin_, log, FAKE_CODES="0 0", MPIGLS_ENV_SETUP=str(tmp_path / "missing.sh"))
    done = _submit("slurm.sbatch", env, tmp_path, **_vars("slurm.sbatch", tmp_path))
    assert done.returncode == 2 and "MPIGLS_ENV_SETUP" in done.stderr
    assert not list(log.glob("rank-*")) and not _requeued(log)


def _documented_sbatch(text: str) -> list[str]:
    return [m.group(0) for m in re.finditer(r"sbatch\b[^\n`|]*--export=[^\s`]+[^\n`]*", text)]


def _documenting_files() -> list:
    files = sorted([*JOBS.iterdir(), *(REPO / "docs").rglob("*.md"), REPO / "README.md"])
    files = [f for f in files if _documented_sbatch(f.read_text(errors="replace"))]
    return files


@pytest.mark.parametrize("path", _documenting_files(), ids=lambda p: p.name)
def test_every_documented_sbatch_passes_the_environment(path):
    """``--export=VARS`` without ALL drops PATH and the virtual environment: every documented
    ``sbatch --export=`` (job scripts, docs, README) starts with ALL."""
    bad = [cmd for cmd in _documented_sbatch(path.read_text()) if not re.search(r"--export=ALL\b", cmd)]
    assert not bad, bad


@pytest.mark.parametrize("script", ["slurm.sbatch", "gpu-single.sbatch"])
def test_the_documented_command_runs(slurm, tmp_path, script):
    """The command in the script's header, run as written (with $SCRATCH set), reaches the ranks
    with CONFIG and OUT and this shell's PATH."""
    bin_, log = slurm
    header = (JOBS / script).read_text().split("#SBATCH", 1)[0]
    (cmd,) = [c for c in _documented_sbatch(header) if c.rstrip().endswith(script)]
    scratch = tmp_path / "scratch"
    env = _env(bin_, log, FAKE_CODES="0 0", SCRATCH=str(scratch))
    argv = [a.replace("$SCRATCH", str(scratch)) for a in shlex.split(cmd)]
    argv = [str(JOBS / script) if a == f"jobs/{script}" else a for a in argv]
    done = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    text = (log / "rank-0").read_text()
    assert f"--out {scratch}/" in text.splitlines()[0] and "configs/" in text.splitlines()[0]


@pytest.mark.parametrize("script", TRAINING)
def test_the_time_limit_signal_reaches_the_ranks_and_requeues(slurm, tmp_path, script):
    """SIGUSR1 to the batch shell (``--signal=B:USR1@300``) reaches every rank through srun and the
    rank's shell; the ranks stop with exit 3 and the job requeues itself."""
    bin_, log = slurm
    env = _env(bin_, log, FAKE_WAIT_FOR_STOP="1")
    export = ",".join(["ALL", *(f"{k}={v}" for k, v in _vars(script, tmp_path).items())])
    cmd = ["sbatch", f"--export={export}", "--array=0-0", str(JOBS / script)]
    job = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ranks = 2 if script == "slurm.sbatch" else 1
    deadline = time.monotonic() + 30
    while len(list(log.glob("started-*"))) < ranks or not (log / "batch-pid").exists():
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()
        time.sleep(0.05)
    os.kill(int((log / "batch-pid").read_text()), signal.SIGUSR1)
    out, err = job.communicate(timeout=30)
    assert job.returncode == 3, (out, err)
    assert _requeued(log)
