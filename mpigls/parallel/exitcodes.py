"""Exit codes every rank of an mpigls job agrees on, and flushing output before a process ends.

``EXIT_USER_ERROR`` (bad config or input: one paragraph, no traceback) and ``EXIT_PREEMPTED``
(stopped by a signal after writing a checkpoint: requeue to resume) and ``EXIT_HUNG`` (the hang
watchdog ended a job stuck in a collective: requeue to resume) let a batch script tell the endings
apart; ``USER_ERRORS`` are the exception types reported as user errors by default.
"""

from __future__ import annotations

import contextlib
import sys

__all__ = ["EXIT_OK", "EXIT_FAILURE", "EXIT_USER_ERROR", "EXIT_PREEMPTED", "EXIT_HUNG", "USER_ERRORS", "flush_std"]

EXIT_OK = 0
EXIT_FAILURE = 1  # a runtime failure (bug, NaN, hardware): traceback printed
EXIT_USER_ERROR = 2  # bad config / input: one-paragraph message, no traceback
EXIT_PREEMPTED = 3  # stopped by SIGTERM/SIGUSR1 after writing a checkpoint; requeue to resume
EXIT_HUNG = 4  # the hang watchdog (train.hang_timeout) ended a stuck job; requeue to resume

# the one list (the command line's too): a bad value, a wrong type, a missing file or a missing name
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, FileNotFoundError, KeyError)


def flush_std() -> None:
    """Flush stdout and stderr (before ``os._exit`` or ``MPI_Abort``, which skip Python's own flush)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
