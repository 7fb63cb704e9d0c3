"""Host memory allocator settings for training on CPUs: keep freed tensor memory for reuse.

PyTorch's CPU tensors come from the C library's ``malloc``. With glibc's defaults a large block
(above a dynamic threshold of at most 32 MiB) is a fresh ``mmap`` that ``free`` unmaps again, and
the heap top is trimmed back to the kernel: the next bound pass of the same shapes faults in and
zeroes the same pages again. A generation allocates and frees the same activation-sized tensors
over and over, so that is kernel time in every block (and, with several ranks on a node, kernel
memory work they contend for). ``keep_freed_memory`` raises the mmap and trim thresholds
(``mallopt``) so the blocks stay in the heap and are reused: the process keeps its peak footprint
instead of returning it between blocks. Numbers do not change (only where memory comes from).

Linux/glibc only; elsewhere, or with MPIGLS_KEEP_FREED_MEMORY=0, nothing is done. Measured in
``benchmarks/bench_hostmem.py`` (paired s/gen, kernel share); ``/usr/bin/time`` counts the page faults
(PGPE+IBP CNN5 on digits, P=64, B=64: ~20,700 minor faults per generation by default, none once warm
with the setting).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["keep_freed_memory", "ENV"]

ENV = "MPIGLS_KEEP_FREED_MEMORY"

# glibc <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

# blocks up to this size come from the heap (the largest value glibc accepts on 64-bit: HEAP_MAX / 2)
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = (1 << 31) - 1  # (a C int) do not give the heap top back during a run
TOP_PAD = 64 << 20  # grow the heap in 64 MiB steps

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the settings once per process; True if they are in effect (glibc, not disabled)."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (_M_TOP_PAD, TOP_PAD),
        )
    )
    _done = ok
    return ok
