"""Shared tiny fixtures: a small digits-style config, CLI runner helpers, MPI launch helpers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# CI explores a fixed set of examples (derandomized) so that a landing never depends on the draw;
# local runs keep exploring new ones each time.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Under mpiexec every rank is its own pytest process: give each its own temp root so that
    they do not race to clean up each other's old temp directories."""
    rank = os.environ.get("PMI_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK")
    if rank is not None and config.option.basetemp is None:
        import tempfile

        config.option.basetemp = str(Path(tempfile.gettempdir()) / f"mpigls-pytest-{os.getuid()}-rank{rank}")


def tiny_overrides(**extra: object) -> list[str]:
    """--set overrides for a seconds-long PGPE run on a digits subset."""
    base = {
        "data.name": "digits",
        "data.num_train": 256,
        "data.num_test": 64,
        "model.name": "cnn3",
        "bound.method": "ibp",
        "bound.eps": 0.05,
        "optimizer.name": "pgpe",
        "optimizer.popsize": 10,
        "optimizer.block_size": 2,
        "optimizer.lr": 0.01,
        "optimizer.sigma_init": 0.01,
        "train.epochs": 1,
        "train.batch_size": 32,
        "train.checkpoint_every": 2,
        "train.threads": 1,
        "train.progress": False,
        "train.consistency_every": 2,
        "eval.methods": "[ibp]",
        "eval.pgd_steps": 2,
    }
    base.update({k: v for k, v in extra.items()})
    # the PGPE defaults above that another optimizer does not have are left out (extra's never are)
    from mpigls.config import optimizer_keys

    own = set(optimizer_keys(str(base["optimizer.name"])))
    return [
        f"{k}={v}" for k, v in base.items() if k in extra or not k.startswith("optimizer.") or k.split(".", 1)[1] in own
    ]


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """``mpigls ARGS`` in this process: (exit code, stdout, stderr)."""
    from mpigls import cli

    code = cli.main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def one_paragraph(err: str, *needles: str) -> str:
    """The single error paragraph in stderr; asserts no traceback and that it contains ``needles``."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert len(lines[0]) < 3000, len(lines[0])
    return lines[0]


def mpiexec() -> str | None:
    exe = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    return exe


def run_mpigls(
    args: list[str], ranks: int = 1, timeout: float = 300, env_extra: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """Run ``mpigls ARGS`` in a subprocess, under ``mpiexec -n ranks`` when ranks > 1."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env_extra or {}))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "mpi4py", "-m", "mpigls", *args]
    if ranks > 1:
        exe = mpiexec()
        if exe is None:
            pytest.skip("mpiexec not found")
        cmd = [exe, "-n", str(ranks), *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


@pytest.fixture
def tf32_on():
    """torch's GPU default for cuDNN (TF32 allowed), here for matmul too; restored afterwards."""
    import torch

    from mpigls.numerics import precision

    before = precision.current_settings()
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    yield
    precision._apply(before)
