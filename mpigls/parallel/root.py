"""Work that rank 0 alone does (reading or writing files) whose result, or error, every rank receives."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

__all__ = ["on_root"]

T = TypeVar("T")


def on_root(comm, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 and broadcast its result (or the exception it raised, re-raised on every rank,
    so that all ranks fail alike)."""
    result, error = None, None
    if comm.is_root:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised identically on every rank below
            error = exc
    result, error = comm.bcast_obj((result, error))
    if error is not None:
        raise error
    return result
