"""Faults and exit codes: ``run_guarded`` turns the program body's outcome into one exit code for
the whole job.

``run_guarded(fn, comm)`` runs the program body and is the only place that should end an MPI
job. A user error (ValueError, TypeError, FileNotFoundError by default) prints one paragraph
without traceback and exits ``EXIT_USER_ERROR``; any other exception prints that rank's
traceback, every line prefixed ``[rank r]``, and ends the job with ``EXIT_FAILURE`` through
``comm.abort`` (``MPI_Abort``), which ends every rank within seconds instead of leaving the others
blocked in the next collective. Non-zero endings that all ranks reach together (the same
validation error everywhere, an agreed stop) are detected with ``comm.all_arrive`` (a non-blocking
barrier) and end through ``comm.exit_together``: a plain ``os._exit(code)`` on every rank, so the
launcher's exit status is exactly that code (an ``MPI_Abort`` from several ranks at once makes
mpiexec report a racy mixture such as 9 = SIGKILL). A killed rank (SIGKILL, OOM) is detected by
the launcher, which ends the others. Only the ``Comm`` protocol is used, so ``ThreadComm`` ranks
(tests) take the same paths, ending with ``SystemExit(code)`` in their threads.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable

from mpigls.parallel.comm import Comm, SerialComm
from mpigls.parallel.exitcodes import EXIT_FAILURE, EXIT_OK, EXIT_USER_ERROR, USER_ERRORS

__all__ = ["run_guarded", "format_user_error"]


def format_user_error(exc: BaseException, label: str = "") -> str:
    """One paragraph: ``[label: ]error: <message>`` (an OSError keeps its filename)."""
    msg = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in msg:
        msg = f"{msg}: {exc.filename}"
    return (f"{label}: " if label else "") + "error: " + " ".join(msg.split())


def _report(exc: BaseException, comm: Comm, user_errors: tuple[type[BaseException], ...], label: str = "") -> None:
    prefix = f"[rank {comm.rank}] " if comm.world_size > 1 else ""
    if isinstance(exc, user_errors):
        text = prefix + format_user_error(exc, label)
    else:
        lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
        text = "".join(prefix + line for chunk in lines for line in chunk.splitlines(True))
    print(text.rstrip("\n"), file=sys.stderr, flush=True)


def run_guarded(
    fn: Callable[[], int | None],
    comm: Comm | None = None,
    *,
    user_errors: tuple[type[BaseException], ...] = USER_ERRORS,
    grace_s: float = 3.0,
    label: str = "",
) -> int:
    """Run the program body ``fn()`` and turn its outcome into an exit code.

    With one rank the code is returned: fn's return value (None -> 0), the code of a SystemExit
    it raised, ``EXIT_USER_ERROR`` for a user error (one paragraph printed), ``EXIT_FAILURE`` for
    any other exception (traceback printed), 130 for KeyboardInterrupt.

    With several ranks a non-zero outcome never returns:
    * runtime failure: the rank prints its traceback (each line ``[rank r] ``) and calls
      ``comm.abort(1)`` at once, which ends every rank within seconds;
    * user error or non-zero code (e.g. ``EXIT_PREEMPTED``): ``comm.exit_together`` — when all
      ranks end the same way within ``grace_s`` (validation fails alike everywhere; all agreed to
      stop), only rank 0 prints the paragraph and all exit with exactly that code; otherwise the
      failing rank prints ``[rank r] error: ...`` and aborts the job.
    Exit code 0 returns normally so MPI finalises as usual. ``label`` prefixes user-error
    paragraphs (e.g. "mpigls train").
    """
    comm = comm if comm is not None else SerialComm()
    failure: BaseException | None = None
    try:
        code = fn()
        code = EXIT_OK if code is None else int(code)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or EXIT_OK
        else:
            print(exc.code, file=sys.stderr, flush=True)
            code = EXIT_FAILURE
    except KeyboardInterrupt:
        code = 130
    except BaseException as exc:  # noqa: BLE001 - reported, then the job ends
        failure = exc
        code = EXIT_USER_ERROR if isinstance(exc, user_errors) else EXIT_FAILURE
    if comm.world_size == 1:
        if failure is not None:
            _report(failure, comm, user_errors, label)
        return code
    if failure is not None and code == EXIT_FAILURE:
        _report(failure, comm, user_errors, label)
        comm.abort(code)
    if code == EXIT_OK:
        return code
    if failure is not None:
        if comm.all_arrive(grace_s):  # the same user error everywhere: rank 0 says it once
            if comm.is_root:
                print(format_user_error(failure, label), file=sys.stderr, flush=True)
            comm.exit_together(code, grace_s)  # after rank 0 has printed; all are here, so no wait
        _report(failure, comm, user_errors, label)
        comm.abort(code)
    comm.exit_together(code, grace_s)
