"""mpigls.run.hostmem: the allocator settings are applied once, can be switched off, and are harmless."""

import os
import subprocess
import sys

import pytest
import torch

from mpigls.run import hostmem


def _fresh(monkeypatch, value):
    monkeypatch.setattr(hostmem, "_done", None)
    if value is None:
        monkeypatch.delenv(hostmem.ENV, raising=False)
    else:
        monkeypatch.setenv(hostmem.ENV, value)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_applied_once_on_glibc_and_off_by_env(monkeypatch):
    _fresh(monkeypatch, None)
    assert hostmem.keep_freed_memory() is True and hostmem.keep_freed_memory() is True  # idempotent
    for off in ("0", "false", "OFF"):
        _fresh(monkeypatch, off)
        assert hostmem.keep_freed_memory() is False
    # tensors still allocate, free and compute as before
    x = torch.randn(3 << 20)
    assert torch.equal((x * 2) / 2, x)


def test_a_process_with_the_settings_computes_the_same_bits():
    """Only where memory comes from changes: a computation allocating blocks above glibc's default
    mmap threshold gives the same bits with and without the settings (separate processes)."""
    code = (
        "import sys, torch, hashlib; from mpigls.run import hostmem; "
        "print(hostmem.keep_freed_memory(), file=sys.stderr); "
        "g = torch.Generator().manual_seed(0); a = torch.randn(512, 2048, generator=g); "
        "out = [(a @ a.T).relu().sum(0) for _ in range(3)]; "
        "print(hashlib.sha256(torch.stack(out).numpy().tobytes()).hexdigest())"
    )
    digests = set()
    for env in ("1", "0"):
        proc = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env={**os.environ, hostmem.ENV: env, "OMP_NUM_THREADS": "1"},
            check=True,
        )
        digests.add(proc.stdout.strip())
    assert len(digests) == 1
