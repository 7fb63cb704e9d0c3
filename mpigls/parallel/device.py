"""Bind each rank to its device (a GPU by local rank, or the CPU) and its torch thread count."""

from __future__ import annotations

import logging
import os
import socket

import torch

from mpigls.parallel.comm import Comm

__all__ = ["bind_device"]

log = logging.getLogger(__name__)


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
        raise ValueError(
            "device='cuda' was requested but torch sees no CUDA GPU on "
            f"{socket.gethostname()}; use device='auto' or 'cpu'"
        )
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
        log.info(
            "rank -> (node, host, local_rank, device, threads):\n%s",
            "\n".join(f"  rank {r}: node {n} ({h}) local {lr} {d} threads {t}" for r, h, n, lr, d, t in rows),
        )
        if dev.type == "cuda":
            shared = {d for _, _, _, _, d, _ in rows}
            if len(shared) < comm.local_size:
                log.warning("%d ranks per node share %d GPU(s); expect contention", comm.local_size, len(shared))
    return dev
