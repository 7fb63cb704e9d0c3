"""The ``Comm`` protocol, the serial and threaded communicators, and ``run_threaded``.

Everything outside ``mpigls.parallel`` receives a ``Comm`` (rank, world size, node layout and a
handful of collectives) and never touches MPI. Three implementations:

* ``SerialComm``  one process; every collective is the identity. Used without MPI / with 1 rank.
* ``ThreadComm``  N ranks as N threads of one process (``run_threaded``), so tests can check
                  world-size invariance of any code in-process, without ``mpiexec``.
* ``MPIComm``     in ``mpi.py`` (the only module that imports mpi4py).

They share ``CommBase``: the high-level operations built on four primitives a subclass provides
(``allgather_obj``, ``bcast_obj``, ``_allgather_array``, optionally ``_allreduce_array``).

Node layout: ranks on one node share memory; ``fake_nodes=k`` instead splits the ranks into k
simulated nodes of ``ceil(size / k)`` consecutive ranks (``node_layout``), so node-level code (GPU
binding, thread counts) is exercised on one machine.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, runtime_checkable

import numpy as np

from mpigls.parallel.exitcodes import EXIT_FAILURE, flush_std

__all__ = ["Comm", "CommBase", "SerialComm", "ThreadComm", "run_threaded", "node_layout"]

if TYPE_CHECKING:  # torch is imported by the collectives that take tensors (a command that only reads files
    import torch  # starts without it)


@runtime_checkable
class Comm(Protocol):
    """What the rest of mpigls may use. Every rank must make every collective call, in the same order.

    Ending a job (``abort``, ``all_arrive``, ``exit_together``) is part of the protocol, so
    ``run_guarded`` treats every communicator with several ranks alike."""

    rank: int
    world_size: int
    local_rank: int
    local_size: int
    node: int
    num_nodes: int

    @property
    def is_root(self) -> bool: ...
    def allgather_concat(self, t: torch.Tensor) -> torch.Tensor: ...
    def allgather_head(self, head: Sequence[float], body: torch.Tensor) -> tuple[list[float], torch.Tensor]: ...
    def allgather_obj(self, obj: Any) -> list: ...
    def bcast_obj(self, obj: Any, root: int = 0) -> Any: ...
    def agree_any(self, flag: bool) -> bool: ...
    def barrier(self) -> None: ...
    def allreduce_max(self, x: float) -> float: ...
    def allreduce_sum_int(self, q: torch.Tensor) -> torch.Tensor: ...
    def allreduce_sum_exact(self, t: torch.Tensor) -> torch.Tensor: ...
    def check_consistent(self, tag: str, data: bytes, generation: int | None = None) -> None: ...

    def abort(self, code: int = EXIT_FAILURE) -> NoReturn:
        """End every rank of the job now with ``code`` (not collective)."""
        ...

    def all_arrive(self, grace_s: float) -> bool:
        """Whether every rank reaches this call within ``grace_s`` seconds; never hangs on a busy rank."""
        ...

    def exit_together(self, code: int, grace_s: float = 3.0) -> NoReturn:
        """End this rank with ``code``: all ranks exit with exactly ``code`` if they all call this
        within ``grace_s``, otherwise ``abort(code)``."""
        ...


class CommBase:
    """High-level operations built on the primitives ``allgather_obj``, ``bcast_obj``,
    ``_allgather_array`` and ``_allreduce_array(np array, op in {"sum", "max"})``."""

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
        return (
            f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size}, node={self.node}/"
            f"{self.num_nodes}, local_rank={self.local_rank}/{self.local_size})"
        )

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

    def abort(self, code: int = EXIT_FAILURE) -> NoReturn:
        flush_std()
        os._exit(code)

    # -- derived ---------------------------------------------------------------------------
    def allgather_concat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate 1-D tensors of every rank in rank order (lengths may differ; dtypes must not)."""
        import torch

        if t.dim() != 1:
            raise ValueError(f"allgather_concat takes a 1-D tensor, got shape {tuple(t.shape)}; flatten it first")
        a = t.detach().to("cpu").contiguous().numpy()
        parts = self._allgather_array(a)
        dtypes = {p.dtype.str for p in parts}
        if len(dtypes) != 1:
            raise RuntimeError(f"allgather_concat: ranks passed different dtypes {sorted(dtypes)}")
        return torch.from_numpy(np.concatenate(parts)).to(t.device)

    def allgather_head(self, head: Sequence[float], body: torch.Tensor) -> tuple[list[float], torch.Tensor]:
        """ONE all-gather for a generation's scalars: (column-wise max of every rank's ``head``, the
        rank-order concatenation of every rank's 1-D ``body``) on every rank.

        ``head``: the same number of floats on every rank (flags as 0/1, whose max is their OR; a
        max |z|); ``body``: float64 (per-item losses), lengths may differ. The body's bits are kept.
        """
        import torch

        h = np.asarray([float(x) for x in head], dtype=np.float64)
        if body.dim() != 1:
            raise ValueError(f"allgather_head takes a 1-D body, got shape {tuple(body.shape)}; flatten it first")
        b = body.detach().to("cpu", torch.float64).contiguous().numpy()
        parts = self._allgather_array(np.concatenate([h, b]))
        if any(p.size < h.size for p in parts):
            raise RuntimeError(f"allgather_head: ranks passed heads of different lengths (this rank: {h.size})")
        heads = np.stack([p[: h.size] for p in parts])
        top = heads.max(axis=0) if h.size else heads.reshape(-1)[:0]
        return [float(x) for x in top], torch.from_numpy(np.concatenate([p[h.size :] for p in parts])).to(body.device)

    def agree_any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank (logical OR all-reduce)."""
        return bool(self._allreduce_array(np.array([1 if flag else 0], np.int64), "max")[0])

    def allreduce_max(self, x: float) -> float:
        return float(self._allreduce_array(np.array([x], np.float64), "max")[0])

    def allreduce_sum_int(self, q: torch.Tensor) -> torch.Tensor:
        """Exact, order-independent sum of int64 tensors (overflow is the caller's concern)."""
        import torch

        if q.dtype != torch.int64:
            raise TypeError(f"allreduce_sum_int takes int64, got {q.dtype}")
        a = q.detach().to("cpu").contiguous().numpy()
        return torch.from_numpy(self._allreduce_array(a, "sum")).to(q.device)

    def allreduce_sum_exact(self, t: torch.Tensor) -> torch.Tensor:
        """Rows of t (n_local, D) or (D,) summed over all ranks, bitwise independent of the world
        size and of which rank holds which row: ``exact.allreduce_sum_exact``."""
        from mpigls.parallel import exact

        return exact.allreduce_sum_exact(self, t)

    def check_consistent(self, tag: str, data: bytes, generation: int | None = None) -> None:
        """Raise RuntimeError on every rank if ``data`` differs between ranks (compared by sha256): the
        message names the ranks (and their hosts) outside the largest group of agreeing ranks."""
        import socket

        digest = hashlib.sha256(data).hexdigest()
        gathered = self.allgather_obj((digest, socket.gethostname()))
        digests = [d for d, _ in gathered]
        if len(set(digests)) == 1:
            return
        groups: dict[str, list[int]] = {}
        for r, d in enumerate(digests):
            groups.setdefault(d, []).append(r)
        ordered = sorted(groups.values(), key=lambda ranks: (-len(ranks), ranks[0]))
        majority, odd = ordered[0], sorted(r for g in ordered[1:] for r in g)
        hosts = sorted({gathered[r][1] for r in odd})
        at = f" at generation {generation}" if generation is not None else ""
        raise RuntimeError(
            f"cross-rank consistency check '{tag}' failed{at}: rank(s) {odd} (host(s) {', '.join(hosts)}) hold a "
            f"different {tag} than rank(s) {majority} ({len(groups)} distinct values). The ranks no longer compute "
            "identical state, so their steps would drift apart. Usual causes: nodes with different CPUs/GPUs or "
            "different torch/MKL builds (each rank's own float work rounds differently), or a bug. What to do: run "
            "on nodes of one type with one software environment (e.g. a SLURM --constraint), set train.device=cpu "
            "and the same MKL_CBWR value (e.g. MKL_CBWR=COMPATIBLE) on every node, then resume from the last "
            "checkpoint (written by rank 0); report it if it persists on identical nodes."
        )


class SerialComm(CommBase):
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

    def all_arrive(self, grace_s: float) -> bool:
        return True

    def exit_together(self, code: int, grace_s: float = 3.0) -> NoReturn:
        flush_std()
        raise SystemExit(code)


def node_layout(rank: int, size: int, fake_nodes: int) -> tuple[int, int]:
    """(node, ranks_per_node) of ``rank`` in a simulated layout of ``fake_nodes`` nodes of
    ``ceil(size / fake_nodes)`` consecutive ranks."""
    if not isinstance(fake_nodes, int) or isinstance(fake_nodes, bool) or fake_nodes < 1:
        raise ValueError(f"fake_nodes must be a positive integer, got {fake_nodes!r}")
    per = math.ceil(size / fake_nodes)
    return rank // per, per


class _ThreadGroup:
    def __init__(self, size: int) -> None:
        self.size = size
        self.slots: list[Any] = [None] * size
        self.barrier = threading.Barrier(size)
        self.exit_barrier = threading.Barrier(size)  # only for all_arrive, like MPIComm's private communicator


class ThreadComm(CommBase):
    """Rank ``rank`` of a group of threads in one process (for tests; see ``run_threaded``).

    Objects are exchanged by reference, exactly like the pickled MPI path returns equal values.
    Ending the job raises ``SystemExit(code)`` in the rank's thread (``abort`` first breaks the
    group's barrier so no other rank hangs); ``run_threaded`` re-raises it in the caller.
    """

    def __init__(self, group: _ThreadGroup, rank: int, fake_nodes: int | None = None) -> None:
        self._group = group
        self.rank, self.world_size = rank, group.size
        node, per = node_layout(rank, group.size, fake_nodes or 1)
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

    def abort(self, code: int = EXIT_FAILURE) -> NoReturn:
        self._group.barrier.abort()
        self._group.exit_barrier.abort()
        raise SystemExit(code)

    def all_arrive(self, grace_s: float) -> bool:
        try:
            self._group.exit_barrier.wait(timeout=grace_s)
        except threading.BrokenBarrierError:  # a rank timed out or aborted
            return False
        return True

    def exit_together(self, code: int, grace_s: float = 3.0) -> NoReturn:
        if not self.all_arrive(grace_s):
            self.abort(code)
        flush_std()
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
