"""Running on several ranks: communicators, exact sums, the work split, devices, signals, faults, and
PGPE's distributed generation.

Everything else in mpigls receives a ``Comm`` and never touches MPI. The modules, one job each:

=============  ==================================================================================
``comm``       the ``Comm`` protocol; ``SerialComm`` (one process), ``ThreadComm`` /
               ``run_threaded`` (N ranks as threads, for tests)
``mpi``        ``MPIComm``, launcher detection and ``init_comm``: the only module importing
               mpi4py, and only when a launcher started this process
``exact``      world-size-invariant exact sums in fixed point (``allreduce_sum_exact``)
``blocks``     which rank evaluates which block (``my_blocks``)
``device``     a rank's device and thread count (``bind_device``)
``signals``    SIGTERM / SIGUSR1 / SIGINT as a flag (``StopSignal``) and blocks cut short on it
``guard``      one exit code for the whole job (``run_guarded``)
``watchdog``   a generation far slower than the recent ones: name the ranks behind, end the job
``exitcodes``  the exit codes
``work``       the work items of a generation (member blocks x example chunks) and their split
``pgpe_unit``  PGPE as the loop runs it: each rank evaluates and sums only its own items
``root``       work done by rank 0 whose result, or error, every rank receives (``on_root``)
=============  ==================================================================================

``from mpigls import parallel`` then ``parallel.X`` for every name below. The names are imported on first
use, so that a command that only reads files (``mpigls config``) does not import torch.
"""

from __future__ import annotations

import importlib

# name -> the submodule that defines it (a submodule's own name maps to itself)
_WHERE = {
    "watchdog": "watchdog",
    "block_range": "blocks",
    "my_blocks": "blocks",
    "Comm": "comm",
    "SerialComm": "comm",
    "ThreadComm": "comm",
    "run_threaded": "comm",
    "bind_device": "device",
    "FRACTION_BITS": "exact",
    "HEADROOM_BITS": "exact",
    "fixed_point": "exact",
    "fixed_point_exponent": "exact",
    "from_fixed_point": "exact",
    "EXIT_FAILURE": "exitcodes",
    "EXIT_HUNG": "exitcodes",
    "EXIT_OK": "exitcodes",
    "EXIT_PREEMPTED": "exitcodes",
    "EXIT_USER_ERROR": "exitcodes",
    "USER_ERRORS": "exitcodes",
    "format_user_error": "guard",
    "run_guarded": "guard",
    "LAUNCHER_RANK_VARS": "mpi",
    "LAUNCHER_SIZE_VARS": "mpi",
    "MPIComm": "mpi",
    "init_comm": "mpi",
    "launched_by_mpi": "mpi",
    "on_root": "root",
    "StoppableBlocks": "signals",
    "StopSignal": "signals",
}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'mpigls.parallel' has no attribute {name!r}")
    module = importlib.import_module(f".{_WHERE[name]}", __name__)
    return module if _WHERE[name] == name else getattr(module, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
