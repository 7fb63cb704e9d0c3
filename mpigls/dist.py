"""The communicator: the only module that imports mpi4py.

Everything else receives a ``Comm`` (rank, world_size, node layout and a handful of collectives)
and never touches MPI. Three implementations share one set of high-level operations:

* ``SerialComm``  one process; every collective is the identity. Used without MPI / with 1 rank.
* ``MPIComm``     wraps a *clone* of COMM_WORLD (so library traffic never mixes with user traffic).
* ``ThreadComm``  N ranks as N threads of one process (``run_threaded``), so tests can check
                  world-size invariance of any code in-process, without ``mpiexec``.

Node layout: ranks on one node share memory (``Split_type(COMM_TYPE_SHARED)``); ``fake_nodes=k``
instead splits the ranks into k simulated nodes of ``ceil(size / k)`` consecutive ranks, so
node-level code (GPU binding, thread counts) is exercised on one machine.

World-size-invariant exact sums (``allreduce_sum_exact``)
---------------------------------------------------------
Floating-point addition is not associative, so an ``MPI_SUM`` of float partial sums depends on the
number of ranks and on the reduction tree. We sum in fixed point instead, where addition *is*
associative:

1. Every contributing row (ideally one per sample / population member, see below) is an element
   of ``t`` of shape (n_local, D) (a 1-D ``t`` is one row). All ranks agree on
   ``m = max |t|`` over every row of every rank (an exact operation) and on ``e = ceil(log2 m)``.
2. Each element is scaled by ``2**(FRACTION_BITS - e)`` (exact: a power of two, in float64) and
   rounded half-to-even to an int64, so ``|q| <= 2**FRACTION_BITS``.
3. Rows are summed as int64 locally, then ``MPI_SUM`` over ranks: integer addition is exact and
   associative, so the total is the same for every split of the rows and every reduction order.
   With ``FRACTION_BITS = 40`` and ``HEADROOM_BITS = 22`` up to 2**22 rows fit in 62 bits.
4. The int64 total is converted back: ``float64(q) * 2**(e - FRACTION_BITS)``, then to float32.

Precision: each element of each row is quantised with absolute error at most
``2**(e - FRACTION_BITS - 1) <= m * 2**-40``; the sum of n rows is exact for the quantised values,
so its error is at most ``n * m * 2**-41`` before the final (deterministic) rounding to float32.

Invariance holds for *the rows passed in*: if a caller first sums samples in float32 and passes the
per-rank partial sum, that partial sum already depends on which samples the rank owns. Callers
that need bitwise invariance either pass the per-sample rows (n_local, D) or quantise each sample
themselves with ``fixed_point(row, exponent)`` (exponent from ``fixed_point_exponent`` of a global
max), sum the int64 rows locally and call ``comm.allreduce_sum_int``.

Non-finite inputs: all ranks learn how many non-finite values each rank had (in the same
collective as the max) and all raise ``FloatingPointError`` naming those ranks, so a NaN never
becomes a silently divergent or hung run.

Faults and exit codes
---------------------
``run_guarded(fn, comm)`` runs the program body and is the only place that should end an MPI
job. A user error (ValueError, TypeError, FileNotFoundError by default) prints one paragraph
without traceback and exits ``EXIT_USER_ERROR``; any other exception prints that rank's
traceback, every line prefixed ``[rank r]``, and exits ``EXIT_FAILURE`` via ``MPI_Abort``, which
ends every rank within seconds instead of leaving the others blocked in the next collective.
Non-zero endings that all ranks reach together (the same validation error everywhere, an agreed
stop) are detected with a non-blocking barrier and end with a plain ``os._exit(code)`` on every
rank, so the launcher's exit status is exactly that code (an ``MPI_Abort`` from several ranks at
once makes mpiexec report a racy mixture such as 9 = SIGKILL). A killed rank (SIGKILL, OOM) is
detected by the launcher, which ends the others.

``StopSignal`` turns SIGTERM / SIGUSR1 (SLURM ``--signal=B:USR1@300``) into a flag; the training
loop agrees on it with ``comm.agree_any(stop.requested)`` at a generation boundary, writes a
checkpoint and exits ``EXIT_PREEMPTED`` so a ``--requeue``d job resumes from it.

Shapes: D parameters (vector length), n rows (samples / members) held by this rank.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

__all__ = [
    "EXIT_OK", "EXIT_FAILURE", "EXIT_USER_ERROR", "EXIT_PREEMPTED", "USER_ERRORS",
    "FRACTION_BITS", "HEADROOM_BITS",
    "Comm", "SerialComm", "MPIComm", "ThreadComm", "init_comm", "run_threaded", "mpi_available", "launched_by_mpi",
    "fixed_point_exponent", "fixed_point", "from_fixed_point",
    "bind_device", "my_blocks", "block_owner", "block_range",
    "StopSignal", "run_guarded", "abort_on_error", "format_user_error",
]

log = logging.getLogger("mpigls.dist")

EXIT_OK = 0
EXIT_FAILURE = 1      # a runtime failure (bug, NaN, hardware): traceback printed
EXIT_USER_ERROR = 2   # bad config / input: one-paragraph message, no traceback
EXIT_PREEMPTED = 3    # stopped by SIGTERM/SIGUSR1 after writing a checkpoint; requeue to resume

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, FileNotFoundError)

FRACTION_BITS = 40    # bits below the largest magnitude kept by the fixed-point sum
HEADROOM_BITS = 22    # room for 2**22 summed rows in a signed 64-bit integer
_MAX_ROWS = 1 << HEADROOM_BITS

# Environment variables that launchers set when a process is one of several ranks.
_LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_SIZE")
# Variables whose presence alone says an MPI launcher started this process (size may be unknown):
# MPICH/Intel MPI hydra (PMI_RANK, MPI_LOCALNRANKS), Open MPI, MVAPICH, PMIx (srun --mpi=pmix).
_LAUNCHER_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMIX_RANK", "MPI_LOCALNRANKS")


# ----------------------------------------------------------------------------- fixed point

def fixed_point_exponent(max_abs: float) -> int:
    """The shared exponent e with ``max_abs <= 2**e`` (0 for max_abs == 0)."""
    if not math.isfinite(max_abs) or max_abs < 0:
        raise ValueError(f"max_abs must be finite and >= 0, got {max_abs}")
    if max_abs == 0:
        return 0
    mantissa, exponent = math.frexp(max_abs)  # max_abs = mantissa * 2**exponent, 0.5 <= m < 1
    return exponent


def fixed_point(t: torch.Tensor, exponent: int) -> torch.Tensor:
    """Quantise t to int64 multiples of ``2**(exponent - FRACTION_BITS)`` (round half to even).

    ``|t| <= 2**exponent`` is required (checked): then ``|result| <= 2**FRACTION_BITS``.
    """
    t64 = t.detach().to(device="cpu", dtype=torch.float64)
    scaled = torch.ldexp(t64, torch.tensor(float(FRACTION_BITS - exponent), dtype=torch.float64))
    if t64.numel() and not bool(torch.isfinite(scaled).all()):
        raise FloatingPointError("fixed_point: input has NaN/inf values or is too large for exponent "
                                 f"{exponent}")
    q = torch.round(scaled)
    if q.numel() and float(q.abs().max()) > 2.0 ** FRACTION_BITS:
        raise ValueError(f"fixed_point: |t| exceeds 2**{exponent}; compute the exponent from the "
                         "global max |t| with fixed_point_exponent")
    return q.to(torch.int64)


def from_fixed_point(q: torch.Tensor, exponent: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of ``fixed_point`` (deterministic: int64 -> float64 -> dtype, round to nearest)."""
    q64 = q.to(device="cpu", dtype=torch.float64)
    return torch.ldexp(q64, torch.tensor(float(exponent - FRACTION_BITS), dtype=torch.float64)).to(dtype)


# ----------------------------------------------------------------------------- communicators

@runtime_checkable
class Comm(Protocol):
    """What the rest of mpigls may use. Every rank must make every collective call, in the same order."""

    rank: int
    world_size: int
    local_rank: int
    local_size: int
    node: int
    num_nodes: int

    @property
    def is_root(self) -> bool: ...
    def allgather_concat(self, t: torch.Tensor) -> torch.Tensor: ...
    def allgather_obj(self, obj: Any) -> list: ...
    def bcast_obj(self, obj: Any, root: int = 0) -> Any: ...
    def agree_any(self, flag: bool) -> bool: ...
    def agree_all(self, flag: bool) -> bool: ...
    def barrier(self) -> None: ...
    def allreduce_max(self, x: float) -> float: ...
    def allreduce_sum_int(self, q: torch.Tensor) -> torch.Tensor: ...
    def allreduce_sum_exact(self, t: torch.Tensor) -> torch.Tensor: ...
    def check_consistent(self, tag: str, data: bytes) -> None: ...
    def abort(self, code: int = EXIT_FAILURE) -> None: ...


class _CommBase:
    """High-level operations built on four primitives that subclasses provide:
    ``allgather_obj``, ``_allgather_array``, ``_allreduce_array(np array, op in {"sum","max"})``
    and ``bcast_obj``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_size: int = 1
    node: int = 0
    num_nodes: int = 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size}, node={self.node}/"
                f"{self.num_nodes}, local_rank={self.local_rank}/{self.local_size})")

    # -- primitives (overridden) ---------------------------------------------------------
    def allgather_obj(self, obj: Any) -> list:
        raise NotImplementedError

    def bcast_obj(self, obj: Any, root: int = 0) -> Any:
        raise NotImplementedError

    def _allgather_array(self, a: np.ndarray) -> list[np.ndarray]:
        return [np.asarray(x) for x in self.allgather_obj(a)]

    def _allreduce_array(self, a: np.ndarray, op: str) -> np.ndarray:
        parts = self._allgather_array(a)
        out = parts[0].copy()
        for p in parts[1:]:
            out = out + p if op == "sum" else np.maximum(out, p)
        return out

    def barrier(self) -> None:
        self.allgather_obj(None)

    def abort(self, code: int = EXIT_FAILURE) -> None:
        _flush_std()
        os._exit(code)

    # -- derived ---------------------------------------------------------------------------
    def allgather_concat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate 1-D tensors of every rank in rank order (lengths may differ; dtypes must not)."""
        if t.dim() != 1:
            raise ValueError(f"allgather_concat takes a 1-D tensor, got shape {tuple(t.shape)}; flatten it first")
        a = t.detach().to("cpu").contiguous().numpy()
        parts = self._allgather_array(a)
        dtypes = {p.dtype.str for p in parts}
        if len(dtypes) != 1:
            raise RuntimeError(f"allgather_concat: ranks passed different dtypes {sorted(dtypes)}")
        return torch.from_numpy(np.concatenate(parts)).to(t.device)

    def agree_any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank (logical OR all-reduce)."""
        return bool(self._allreduce_array(np.array([1 if flag else 0], np.int64), "max")[0])

    def agree_all(self, flag: bool) -> bool:
        return not self.agree_any(not flag)

    def allreduce_max(self, x: float) -> float:
        return float(self._allreduce_array(np.array([x], np.float64), "max")[0])

    def allreduce_sum_int(self, q: torch.Tensor) -> torch.Tensor:
        """Exact, order-independent sum of int64 tensors (overflow is the caller's concern)."""
        if q.dtype != torch.int64:
            raise TypeError(f"allreduce_sum_int takes int64, got {q.dtype}")
        a = q.detach().to("cpu").contiguous().numpy()
        return torch.from_numpy(self._allreduce_array(a, "sum")).to(q.device)

    def allreduce_sum_exact(self, t: torch.Tensor) -> torch.Tensor:
        """Sum rows of t (n_local, D) — or one row (D,) — over all ranks; float32 (D,) result whose bits
        do not depend on world size, on which rank holds which row, or on reduction order.
        See the module docstring for the scheme and its precision."""
        rows = t.detach()
        if rows.dim() == 1:
            rows = rows.unsqueeze(0)
        if rows.dim() != 2:
            raise ValueError(f"allreduce_sum_exact takes (D,) or (n, D), got shape {tuple(t.shape)}")
        rows = rows.to(device="cpu", dtype=torch.float64)
        finite = torch.isfinite(rows)
        num_bad = int((~finite).sum())
        local_max = float(rows.abs().max()) if rows.numel() and num_bad == 0 else 0.0
        # One small collective for the max, the non-finite counts and the row counts of every rank.
        stats = np.concatenate(self._allgather_array(
            np.array([local_max, num_bad, rows.shape[0], rows.shape[1]], np.float64))).reshape(-1, 4)
        bad = [r for r in range(len(stats)) if stats[r, 1] > 0]
        if bad:
            counts = ", ".join(f"rank {r}: {int(stats[r, 1])}" for r in bad)
            raise FloatingPointError(f"allreduce_sum_exact: non-finite values (NaN/inf) in the input on "
                                     f"{counts}; the run has diverged (lower the learning rate or check "
                                     "the loss)")
        if len(set(stats[:, 3].tolist())) != 1:
            raise RuntimeError(f"allreduce_sum_exact: ranks passed different D: {stats[:, 3].astype(int).tolist()}")
        total_rows = int(stats[:, 2].sum())
        if total_rows > _MAX_ROWS:
            raise ValueError(f"allreduce_sum_exact: {total_rows} rows exceed the fixed-point headroom of "
                             f"{_MAX_ROWS}; pre-sum rows in int64 with fixed_point + allreduce_sum_int")
        exponent = fixed_point_exponent(float(stats[:, 0].max()))
        q = fixed_point(rows, exponent).sum(dim=0)
        total = self.allreduce_sum_int(q)
        return from_fixed_point(total, exponent, torch.float32).to(t.device)

    def check_consistent(self, tag: str, data: bytes) -> None:
        """Raise RuntimeError on every rank if ``data`` differs between ranks (compared by sha256)."""
        digest = hashlib.sha256(data).hexdigest()
        digests = self.allgather_obj(digest)
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise RuntimeError(
                f"cross-rank consistency check '{tag}' failed: rank(s) {differ} differ from rank 0 "
                f"(sha256 rank 0 {digests[0][:16]}…, rank {differ[0]} {digests[differ[0]][:16]}…). The "
                "ranks no longer compute identical state; this is a bug or non-deterministic hardware "
                "(try device=cpu or report it).")


class SerialComm(_CommBase):
    """One process: rank 0 of 1, every collective returns its input."""

    def __init__(self) -> None:
        self.rank, self.world_size = 0, 1
        self.local_rank, self.local_size, self.node, self.num_nodes = 0, 1, 0, 1

    def allgather_obj(self, obj: Any) -> list:
        return [obj]

    def bcast_obj(self, obj: Any, root: int = 0) -> Any:
        if root != 0:
            raise ValueError(f"bcast_obj root must be a rank in [0, 1), got {root}")
        return obj

    def _allgather_array(self, a: np.ndarray) -> list[np.ndarray]:
        return [a.copy()]

    def barrier(self) -> None:
        pass


def _node_layout(rank: int, size: int, fake_nodes: int | None) -> tuple[int, int]:
    """(node, ranks_per_node) for a simulated layout of ``fake_nodes`` nodes."""
    if fake_nodes is None:
        raise AssertionError("only for fake layouts")
    if not isinstance(fake_nodes, int) or isinstance(fake_nodes, bool) or fake_nodes < 1:
        raise ValueError(f"fake_nodes must be a positive integer, got {fake_nodes!r}")
    per = math.ceil(size / fake_nodes)
    return rank // per, per


class MPIComm(_CommBase):
    """A clone of COMM_WORLD (or of ``base``) with the node layout resolved once at construction.

    Collective: every rank must construct it together.
    """

    def __init__(self, base: Any = None, fake_nodes: int | None = None) -> None:
        from mpi4py import MPI  # lazy: the package works without MPI

        self._MPI = MPI
        self._comm = (base if base is not None else MPI.COMM_WORLD).Clone()
        self.rank, self.world_size = self._comm.Get_rank(), self._comm.Get_size()
        if fake_nodes is None:
            self._local = self._comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        else:
            color, _ = _node_layout(self.rank, self.world_size, fake_nodes)
            self._local = self._comm.Split(color=color, key=self.rank)
        self.local_rank, self.local_size = self._local.Get_rank(), self._local.Get_size()
        # Number nodes by their lowest world rank so the numbering is the same on every rank.
        leader = self._local.bcast(self.rank, root=0)
        leaders = sorted(set(self._comm.allgather(leader)))
        self.node, self.num_nodes = leaders.index(leader), len(leaders)
        self._exit_comm = self._comm.Dup()  # only for exit_together's non-blocking barrier

    def allgather_obj(self, obj: Any) -> list:
        return self._comm.allgather(obj)

    def bcast_obj(self, obj: Any, root: int = 0) -> Any:
        if not 0 <= root < self.world_size:
            raise ValueError(f"bcast_obj root must be a rank in [0, {self.world_size}), got {root}")
        return self._comm.bcast(obj, root=root)

    def _allgather_array(self, a: np.ndarray) -> list[np.ndarray]:
        a = np.ascontiguousarray(a)
        meta = self._comm.allgather((a.dtype.str, a.shape))
        if len({m[0] for m in meta}) != 1:
            raise RuntimeError(f"collective called with different dtypes on different ranks: {meta}")
        counts = [int(np.prod(s)) for _, s in meta]
        recv = np.empty(sum(counts), dtype=a.dtype)
        self._comm.Allgatherv(a.reshape(-1), [recv, counts])
        offsets = np.cumsum([0] + counts)
        return [recv[offsets[r]:offsets[r + 1]].reshape(meta[r][1]) for r in range(self.world_size)]

    def _allreduce_array(self, a: np.ndarray, op: str) -> np.ndarray:
        a = np.ascontiguousarray(a)
        out = np.empty_like(a)
        self._comm.Allreduce(a, out, op=self._MPI.SUM if op == "sum" else self._MPI.MAX)
        return out

    def barrier(self) -> None:
        self._comm.Barrier()

    def abort(self, code: int = EXIT_FAILURE) -> None:
        _flush_std()
        self._comm.Abort(code)

    def exit_together(self, code: int, grace_s: float = 3.0) -> None:
        """End this process with ``code``. If every rank calls this within ``grace_s`` seconds
        (found with a non-blocking barrier on a private communicator), all exit normally with
        ``code`` so the launcher's exit status is exactly ``code``; otherwise ``Abort(code)`` ends
        the ranks that are still busy. Never returns."""
        if not self.all_arrive(grace_s):
            self.abort(code)
        _flush_std()
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

    def free(self) -> None:
        """Release the cloned communicators (collective)."""
        for c in (self._exit_comm, self._local, self._comm):
            if c != self._MPI.COMM_NULL:
                c.Free()


class _ThreadGroup:
    def __init__(self, size: int) -> None:
        self.size = size
        self.slots: list[Any] = [None] * size
        self.barrier = threading.Barrier(size)


class ThreadComm(_CommBase):
    """Rank ``rank`` of a group of threads in one process (for tests; see ``run_threaded``).

    Objects are exchanged by reference, exactly like the pickled MPI path returns equal values.
    """

    def __init__(self, group: _ThreadGroup, rank: int, fake_nodes: int | None = None) -> None:
        self._group = group
        self.rank, self.world_size = rank, group.size
        node, per = _node_layout(rank, group.size, fake_nodes or 1)
        self.node, self.num_nodes = node, math.ceil(group.size / per)
        self.local_rank = rank - node * per
        self.local_size = min(per, group.size - node * per)

    def allgather_obj(self, obj: Any) -> list:
        g = self._group
        g.slots[self.rank] = obj
        g.barrier.wait()
        out = list(g.slots)
        g.barrier.wait()
        return out

    def bcast_obj(self, obj: Any, root: int = 0) -> Any:
        if not 0 <= root < self.world_size:
            raise ValueError(f"bcast_obj root must be a rank in [0, {self.world_size}), got {root}")
        return self.allgather_obj(obj)[root]

    def _allgather_array(self, a: np.ndarray) -> list[np.ndarray]:
        return [np.array(x, copy=True) for x in self.allgather_obj(np.asarray(a))]

    def abort(self, code: int = EXIT_FAILURE) -> None:
        self._group.barrier.abort()
        raise SystemExit(code)


def run_threaded(fn: Callable[[Comm], Any], world_size: int, fake_nodes: int | None = None) -> list:
    """Run ``fn(comm)`` on ``world_size`` ThreadComm ranks; return the results in rank order.

    An exception on any rank breaks the group's barrier (so no rank hangs) and is re-raised here,
    the first failing rank's own exception first.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    group = _ThreadGroup(world_size)
    results: list[Any] = [None] * world_size
    errors: list[tuple[int, BaseException]] = []

    def body(rank: int) -> None:
        try:
            results[rank] = fn(ThreadComm(group, rank, fake_nodes))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            errors.append((rank, exc))
            group.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,), name=f"rank{r}") for r in range(world_size)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        primary = [e for e in errors if not isinstance(e[1], threading.BrokenBarrierError)] or errors
        rank, exc = primary[0]
        raise RuntimeError(f"rank {rank} of {world_size} failed: {exc!r}") from exc
    return results


def mpi_available() -> bool:
    """True if mpi4py is installed (found without importing it, so MPI is not initialised)."""
    import importlib.util

    if "mpi4py" in sys.modules:
        return sys.modules["mpi4py"] is not None
    return importlib.util.find_spec("mpi4py") is not None


def _launched_with_several_ranks() -> bool:
    for var in _LAUNCHER_SIZE_VARS:
        with contextlib.suppress(ValueError):
            if int(os.environ.get(var, "1")) > 1:
                return True
    with contextlib.suppress(ValueError):  # srun without PMI: one task of several
        if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_STEP_NUM_TASKS",
                                                               os.environ.get("SLURM_NTASKS", "1"))) > 1:
            return True
    return False


def _launcher_size_known_one() -> bool:
    """Whether a launcher variable says the world has exactly one rank."""
    sizes = [os.environ[v] for v in _LAUNCHER_SIZE_VARS if v in os.environ]
    return bool(sizes) and all(v.strip() == "1" for v in sizes)


def launched_by_mpi() -> bool:
    """Whether an MPI launcher (mpiexec, mpirun, srun) started this process, judged from the
    environment alone, or mpi4py is already imported (``python -m mpi4py``). Only then does
    ``init_comm`` import mpi4py: a plain ``mpigls train`` never initialises MPI."""
    if sys.modules.get("mpi4py") is not None:
        return True
    return _launched_with_several_ranks() or any(v in os.environ for v in (*_LAUNCHER_SIZE_VARS, *_LAUNCHER_RANK_VARS))


def init_comm(fake_nodes: int | None = None) -> Comm:
    """The job's communicator: ``MPIComm`` when MPI has more than one rank, else ``SerialComm``.

    mpi4py is imported (and MPI initialised) only when ``launched_by_mpi()``: one process started
    without a launcher never touches the MPI installation (mpi4py is the optional ``mpi`` extra).
    ``fake_nodes=k`` simulates k nodes (see module docstring). Collective when MPI is in use.
    Raises RuntimeError when a launcher started this process but mpi4py cannot be imported, unless
    the launcher says the world has one rank (otherwise N copies would silently train and write
    the same checkpoints).
    """
    if fake_nodes is not None:
        _node_layout(0, 1, fake_nodes)  # validate before any collective
    if not launched_by_mpi():
        return SerialComm()
    try:
        from mpi4py import MPI
    except ImportError as exc:
        if not _launcher_size_known_one():
            raise RuntimeError("this process was started by an MPI launcher (mpiexec, mpirun or srun), but "
                               f"mpi4py cannot be imported ({exc}); install mpi4py built against the "
                               "launcher's MPI (pip install 'mpigls[mpi]', or 'mpigls[mpi,mpich]' for the "
                               "pip MPI), or run one process without the launcher") from exc
        return SerialComm()
    if MPI.COMM_WORLD.Get_size() == 1:
        return SerialComm()
    return MPIComm(fake_nodes=fake_nodes)


# ----------------------------------------------------------------------------- work split

def _check_split(num_blocks: int, world_size: int) -> None:
    if not isinstance(num_blocks, int) or num_blocks < 0:
        raise ValueError(f"num_blocks must be an integer >= 0, got {num_blocks!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")


def block_range(num_blocks: int, rank: int, world_size: int) -> range:
    """Contiguous, balanced share of ``range(num_blocks)`` for ``rank``: sizes differ by at most
    one, the first ``num_blocks % world_size`` ranks get the extra block; may be empty."""
    _check_split(num_blocks, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    base, extra = divmod(num_blocks, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def my_blocks(num_blocks: int, rank: int, world_size: int) -> list[int]:
    """``list(block_range(...))``: the block indices rank ``rank`` owns."""
    return list(block_range(num_blocks, rank, world_size))


def block_owner(block: int, num_blocks: int, world_size: int) -> int:
    """The rank whose ``my_blocks`` contains ``block``."""
    _check_split(num_blocks, world_size)
    if not 0 <= block < num_blocks:
        raise ValueError(f"block must be in [0, {num_blocks}), got {block}")
    base, extra = divmod(num_blocks, world_size)
    if block < extra * (base + 1):
        return block // (base + 1)
    return extra + (block - extra * (base + 1)) // base


# ----------------------------------------------------------------------------- devices

def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def bind_device(comm: Comm, device: str = "auto", threads: int | None = None) -> torch.device:
    """Pick this rank's device and torch thread count; root logs the whole mapping once.

    device: "auto" (a GPU if any, else CPU), "cpu" or "cuda". GPU = ``local_rank % device_count``
    (one GPU per rank when ranks per node == GPUs per node). threads: explicit count, else
    ``available_cpus // local_size`` — unless the launcher already pinned this rank to fewer CPUs
    than the node has (srun --cpus-per-task), then all CPUs of its affinity mask. Collective.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise ValueError("device='cuda' was requested but torch sees no CUDA GPU on "
                         f"{socket.gethostname()}; use device='auto' or 'cpu'")
    if device == "cpu" or not has_cuda:
        dev = torch.device("cpu")
    else:
        dev = torch.device("cuda", comm.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    if threads is None:
        avail, total = _available_cpus(), os.cpu_count() or 1
        threads = avail if avail < total else max(1, total // comm.local_size)
    torch.set_num_threads(threads)
    rows = comm.allgather_obj((comm.rank, socket.gethostname(), comm.node, comm.local_rank, str(dev), threads))
    if comm.is_root:
        log.info("rank -> (node, host, local_rank, device, threads):\n%s", "\n".join(
            f"  rank {r}: node {n} ({h}) local {lr} {d} threads {t}" for r, h, n, lr, d, t in rows))
        if dev.type == "cuda":
            shared = {d for _, _, _, _, d, _ in rows}
            if len(shared) < comm.local_size:
                log.warning("%d ranks per node share %d GPU(s); expect contention",
                            comm.local_size, len(shared))
    return dev


# ----------------------------------------------------------------------------- signals

class StopSignal:
    """A flag set by SIGTERM / SIGUSR1 / SIGINT. Agree on it at a generation boundary:
    ``if comm.agree_any(stop.requested): save(); return EXIT_PREEMPTED``.

    SIGINT is Ctrl-C (mpiexec forwards it to every rank): the first one stops cleanly with a
    checkpoint like SIGTERM, a second one raises KeyboardInterrupt at once. The handler otherwise
    only assigns attributes (CPython runs handlers between bytecodes on the main thread). Use as a
    context manager to restore the previous handlers.
    """

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None),
                                signal.SIGINT) if s)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without a checkpoint
        self.signum = signum

    def install(self) -> StopSignal:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("StopSignal.install must be called from the main thread")
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev)
        self._previous.clear()

    def __enter__(self) -> StopSignal:
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()


# ----------------------------------------------------------------------------- fault handling

def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def format_user_error(exc: BaseException, label: str = "") -> str:
    """One paragraph: ``[label: ]error: <message>`` (an OSError keeps its filename)."""
    msg = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in msg:
        msg = f"{msg}: {exc.filename}"
    return (f"{label}: " if label else "") + "error: " + " ".join(msg.split())


def _report(exc: BaseException, comm: Comm, user_errors: tuple[type[BaseException], ...],
            label: str = "") -> int:
    prefix = f"[rank {comm.rank}] " if comm.world_size > 1 else ""
    if isinstance(exc, user_errors):
        text = prefix + format_user_error(exc, label)
        code = EXIT_USER_ERROR
    else:
        lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
        text = "".join(prefix + line for chunk in lines for line in chunk.splitlines(True))
        code = EXIT_FAILURE
    print(text.rstrip("\n"), file=sys.stderr, flush=True)
    return code


def run_guarded(fn: Callable[[], int | None], comm: Comm | None = None, *,
                user_errors: tuple[type[BaseException], ...] = USER_ERRORS,
                grace_s: float = 3.0, label: str = "") -> int:
    """Run the program body ``fn()`` and turn its outcome into an exit code.

    Serially (or with ``ThreadComm``) the code is returned: fn's return value (None -> 0), the code
    of a SystemExit it raised, ``EXIT_USER_ERROR`` for a user error (one paragraph printed),
    ``EXIT_FAILURE`` for any other exception (traceback printed), 130 for KeyboardInterrupt.

    With several MPI ranks a non-zero outcome never returns:
    * runtime failure: the rank prints its traceback (each line ``[rank r] ``) and calls
      ``MPI_Abort(1)`` at once, which ends every rank within seconds;
    * user error or non-zero code (e.g. ``EXIT_PREEMPTED``): ``MPIComm.exit_together`` — when all
      ranks end the same way within ``grace_s`` (validation fails alike everywhere; all agreed to
      stop), only rank 0 prints the paragraph and all exit with exactly that code; otherwise the
      failing rank prints ``[rank r] error: ...`` and aborts the job.
    Exit code 0 returns normally so MPI finalises as usual. ``label`` prefixes user-error
    paragraphs (e.g. "mpigls train").
    """
    comm = comm if comm is not None else SerialComm()
    multi = isinstance(comm, MPIComm) and comm.world_size > 1
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
    if not multi:
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
    return code  # not reached


@contextlib.contextmanager
def abort_on_error(comm: Comm, *, user_errors: tuple[type[BaseException], ...] = USER_ERRORS):
    """Context-manager form of ``run_guarded`` for a block: any exception is reported and, with
    several ranks, aborts the job; serially it exits the process with the code."""
    try:
        yield
    except BaseException as exc:
        if isinstance(exc, SystemExit) and exc.code in (None, 0):
            raise
        code = _report(exc, comm, user_errors)
        if comm.world_size > 1:
            comm.abort(code)
        raise SystemExit(code) from exc
