"""MPI: launcher detection, ``MPIComm`` and ``init_comm`` — the only module that imports mpi4py.

mpi4py is imported (and MPI initialised) only inside ``MPIComm`` / ``init_comm`` and only when an
MPI launcher's environment says this process is one of several ranks (``launched_by_mpi``): a
plain ``mpigls train`` on a laptop, in a notebook or in a single-GPU job never touches the MPI
installation (mpi4py is the optional ``mpi`` extra).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Any, NoReturn

import numpy as np

from mpigls.parallel.comm import Comm, CommBase, SerialComm, node_layout
from mpigls.parallel.exitcodes import EXIT_FAILURE, flush_std

__all__ = ["MPIComm", "init_comm", "launched_by_mpi", "LAUNCHER_SIZE_VARS", "LAUNCHER_RANK_VARS"]

# Environment variables that launchers set when a process is one of several ranks.
LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_SIZE")
# Variables whose presence alone says an MPI launcher started this process (size may be unknown):
# MPICH/Intel MPI hydra (PMI_RANK, MPI_LOCALNRANKS), Open MPI, MVAPICH, PMIx (srun --mpi=pmix).
LAUNCHER_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMIX_RANK", "MPI_LOCALNRANKS")


_MAX_NDIM = 8  # array ranks the buffer all-gather of shapes carries


class _Channel:
    """Small point-to-point messages for the hang watchdog, sent and received by its thread (MPI runs
    in THREAD_MULTIPLE): non-blocking sends, polling receives."""

    def __init__(self, comm: Any, MPI: Any, tag: int = 7301) -> None:
        self._comm, self._MPI, self._tag = comm, MPI, tag
        self._pending: list[Any] = []

    def Get_rank(self) -> int:
        return int(self._comm.Get_rank())

    def Get_size(self) -> int:
        return int(self._comm.Get_size())

    def send(self, obj: Any, dests: Any) -> None:
        """Send ``obj`` to every rank in ``dests`` without waiting (completed sends are released)."""
        self._pending = [r for r in self._pending if not r.Test()]
        self._pending += [self._comm.isend(obj, dest=d, tag=self._tag) for d in dests]

    def poll(self) -> list[tuple[int, Any]]:
        """Every message that has arrived, as (source rank, object); never blocks."""
        got, status = [], self._MPI.Status()
        while self._comm.iprobe(source=self._MPI.ANY_SOURCE, tag=self._tag, status=status):
            src = status.Get_source()
            got.append((src, self._comm.recv(source=src, tag=self._tag)))
        return got

    def abort(self, code: int) -> None:
        """End every rank of the job now with ``code``."""
        flush_std()
        self._comm.Abort(code)


class MPIComm(CommBase):
    """A clone of COMM_WORLD (or of ``base``) with the node layout resolved once at construction:
    ranks on one node share memory (``Split_type(COMM_TYPE_SHARED)``), or ``fake_nodes`` nodes of
    consecutive ranks. Library traffic never mixes with user traffic on COMM_WORLD. While the hang
    watchdog runs, every collective is entered inside its ``waits`` context (``parallel.watchdog``).

    Collective: every rank must construct it together.
    """

    waits: Any = None  # the hang watchdog's collective counter while it runs

    def __init__(self, base: Any = None, fake_nodes: int | None = None) -> None:
        from mpi4py import MPI  # lazy: the package works without MPI

        self._MPI = MPI
        self._comm = (base if base is not None else MPI.COMM_WORLD).Clone()
        self.rank, self.world_size = self._comm.Get_rank(), self._comm.Get_size()
        if fake_nodes is None:
            self._local = self._comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        else:
            color, _ = node_layout(self.rank, self.world_size, fake_nodes)
            self._local = self._comm.Split(color=color, key=self.rank)
        self.local_rank, self.local_size = self._local.Get_rank(), self._local.Get_size()
        # Number nodes by their lowest world rank so the numbering is the same on every rank.
        leader = self._local.bcast(self.rank, root=0)
        leaders = sorted(set(self._comm.allgather(leader)))
        self.node, self.num_nodes = leaders.index(leader), len(leaders)
        self._exit_comm = self._comm.Dup()  # only for all_arrive's non-blocking barrier

    def _waiting(self) -> Any:
        """The hang watchdog's count of this rank's collectives (``waits``, set while it runs)."""
        return self.waits if self.waits is not None else contextlib.nullcontext()

    def allgather_obj(self, obj: Any) -> list:
        with self._waiting():
            return self._comm.allgather(obj)

    def bcast_obj(self, obj: Any, root: int = 0) -> Any:
        if not 0 <= root < self.world_size:
            raise ValueError(f"bcast_obj root must be a rank in [0, {self.world_size}), got {root}")
        with self._waiting():
            return self._comm.bcast(obj, root=root)

    def _allgather_array(self, a: np.ndarray) -> list[np.ndarray]:
        with self._waiting():
            return self._allgather_array_now(a)

    def _allgather_array_now(self, a: np.ndarray) -> list[np.ndarray]:
        a = np.ascontiguousarray(a)
        if a.ndim > _MAX_NDIM:
            raise ValueError(f"_allgather_array takes at most {_MAX_NDIM} dimensions, got shape {a.shape}")
        # (dtype number, ndim, shape) of every rank in one fixed-size buffer all-gather (no pickling)
        head = np.zeros(2 + _MAX_NDIM, dtype=np.int64)
        head[0], head[1], head[2 : 2 + a.ndim] = a.dtype.num, a.ndim, a.shape
        heads = np.empty((self.world_size, head.size), dtype=np.int64)
        self._comm.Allgather(head, heads)
        if len(set(heads[:, 0].tolist())) != 1:
            names = self._comm.allgather(a.dtype.str)  # every rank sees the mismatch: still collective
            raise RuntimeError(f"collective called with different dtypes on different ranks: {names}")
        meta = [(a.dtype.str, tuple(int(x) for x in h[2 : 2 + h[1]])) for h in heads]
        counts = [int(np.prod(s)) for _, s in meta]
        recv = np.empty(sum(counts), dtype=a.dtype)
        self._comm.Allgatherv(a.reshape(-1), [recv, counts])
        offsets = np.cumsum([0] + counts)
        return [recv[offsets[r] : offsets[r + 1]].reshape(meta[r][1]) for r in range(self.world_size)]

    def _allreduce_array(self, a: np.ndarray, op: str) -> np.ndarray:
        a = np.ascontiguousarray(a)
        out = np.empty_like(a)
        with self._waiting():
            self._comm.Allreduce(a, out, op=self._MPI.SUM if op == "sum" else self._MPI.MAX)
        return out

    def barrier(self) -> None:
        with self._waiting():
            self._comm.Barrier()

    def abort(self, code: int = EXIT_FAILURE) -> NoReturn:
        flush_std()
        self._comm.Abort(code)
        os._exit(code)  # not reached: MPI_Abort ends this process

    def exit_together(self, code: int, grace_s: float = 3.0) -> NoReturn:
        """End this process with ``code``. If every rank calls this within ``grace_s`` seconds
        (found with a non-blocking barrier on a private communicator), all exit normally with
        ``code`` so the launcher's exit status is exactly ``code``; otherwise ``Abort(code)`` ends
        the ranks that are still busy. Never returns."""
        if not self.all_arrive(grace_s):
            self.abort(code)
        flush_std()
        logging.shutdown()
        # os._exit skips mpi4py's exit hook, which would turn a non-zero exit into MPI_Abort.
        os._exit(code)

    def all_arrive(self, grace_s: float) -> bool:
        """Whether every rank reaches this call within ``grace_s`` seconds (a non-blocking barrier
        on a private communicator, so a rank busy elsewhere cannot hang us)."""
        req = self._exit_comm.Ibarrier()
        deadline = time.monotonic() + grace_s
        while not req.Test():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def watchdog_comm(self) -> _Channel | None:
        """A private channel for the hang watchdog's messages, on a new duplicate of the job's
        communicator (collective); None when MPI runs without THREAD_MULTIPLE (mpi4py's default is
        to ask for it), which a second thread calling MPI needs."""
        if self._MPI.Query_thread() < self._MPI.THREAD_MULTIPLE:
            return None
        return _Channel(self._comm.Dup(), self._MPI)

    def free(self) -> None:
        """Release the cloned communicators (collective). For code that builds several MPIComm in
        one job (the MPI tests); a job's own communicator lives until MPI finalises."""
        for c in (self._exit_comm, self._local, self._comm):
            if c != self._MPI.COMM_NULL:
                c.Free()


def _launched_with_several_ranks() -> bool:
    for var in LAUNCHER_SIZE_VARS:
        with contextlib.suppress(ValueError):
            if int(os.environ.get(var, "1")) > 1:
                return True
    with contextlib.suppress(ValueError):  # srun without PMI: one task of several
        if (
            "SLURM_PROCID" in os.environ
            and int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1"))) > 1
        ):
            return True
    return False


def _launcher_size_known_one() -> bool:
    """Whether a launcher variable says the world has exactly one rank."""
    sizes = [os.environ[v] for v in LAUNCHER_SIZE_VARS if v in os.environ]
    return bool(sizes) and all(v.strip() == "1" for v in sizes)


def launched_by_mpi() -> bool:
    """Whether an MPI launcher (mpiexec, mpirun, srun) started this process, judged from the
    environment alone, or mpi4py is already imported (``python -m mpi4py``). Only then does
    ``init_comm`` import mpi4py: a plain ``mpigls train`` never initialises MPI."""
    if sys.modules.get("mpi4py") is not None:
        return True
    return _launched_with_several_ranks() or any(v in os.environ for v in (*LAUNCHER_SIZE_VARS, *LAUNCHER_RANK_VARS))


def init_comm(fake_nodes: int | None = None) -> Comm:
    """The job's communicator: ``MPIComm`` when MPI has more than one rank, else ``SerialComm``.

    mpi4py is imported (and MPI initialised) only when ``launched_by_mpi()``.
    ``fake_nodes=k`` simulates k nodes (see ``MPIComm``). Collective when MPI is in use.
    Raises RuntimeError when a launcher started this process but mpi4py cannot be imported, unless
    the launcher says the world has one rank (otherwise N copies would silently train and write
    the same checkpoints).
    """
    if fake_nodes is not None:
        node_layout(0, 1, fake_nodes)  # validate before any collective
    if not launched_by_mpi():
        return SerialComm()
    try:
        from mpi4py import MPI
    except ImportError as exc:
        if not _launcher_size_known_one():
            raise RuntimeError(
                "this process was started by an MPI launcher (mpiexec, mpirun or srun), but "
                f"mpi4py cannot be imported ({exc}); install mpi4py built against the "
                "launcher's MPI (pip install 'mpigls[mpi]', or 'mpigls[mpi,mpich]' for the "
                "pip MPI), or run one process without the launcher"
            ) from exc
        return SerialComm()
    if MPI.COMM_WORLD.Get_size() == 1:
        return SerialComm()
    return MPIComm(fake_nodes=fake_nodes)
