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
=============  ==================================================================================

``from mpigls import parallel`` then ``parallel.X`` for every name below.
"""

from __future__ import annotations

from mpigls.parallel import watchdog
from mpigls.parallel.blocks import block_range, my_blocks
from mpigls.parallel.comm import Comm, SerialComm, ThreadComm, run_threaded
from mpigls.parallel.device import bind_device
from mpigls.parallel.exact import FRACTION_BITS, HEADROOM_BITS, fixed_point, fixed_point_exponent, from_fixed_point
from mpigls.parallel.exitcodes import EXIT_FAILURE, EXIT_HUNG, EXIT_OK, EXIT_PREEMPTED, EXIT_USER_ERROR, USER_ERRORS
from mpigls.parallel.guard import format_user_error, run_guarded
from mpigls.parallel.mpi import LAUNCHER_RANK_VARS, LAUNCHER_SIZE_VARS, MPIComm, init_comm, launched_by_mpi
from mpigls.parallel.signals import StoppableBlocks, StopSignal

__all__ = [
    "EXIT_OK",
    "EXIT_FAILURE",
    "EXIT_USER_ERROR",
    "EXIT_PREEMPTED",
    "EXIT_HUNG",
    "watchdog",
    "USER_ERRORS",
    "FRACTION_BITS",
    "HEADROOM_BITS",
    "fixed_point_exponent",
    "fixed_point",
    "from_fixed_point",
    "Comm",
    "SerialComm",
    "ThreadComm",
    "run_threaded",
    "MPIComm",
    "init_comm",
    "launched_by_mpi",
    "LAUNCHER_SIZE_VARS",
    "LAUNCHER_RANK_VARS",
    "block_range",
    "my_blocks",
    "bind_device",
    "StopSignal",
    "StoppableBlocks",
    "run_guarded",
    "format_user_error",
]
