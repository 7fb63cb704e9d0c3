"""mpigls.parallel under a real MPI launch; pass at any world size >= 2.

Run: mpiexec -n 2 python -m mpi4py -m pytest --with-mpi tests/mpi -q
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mpigls import parallel

pytestmark = pytest.mark.mpi(min_size=2)


@pytest.fixture(scope="module")
def comm():
    return parallel.init_comm()


def test_init_comm_is_mpi(comm):
    assert isinstance(comm, parallel.MPIComm) and isinstance(comm, parallel.Comm)
    from mpi4py import MPI

    assert comm.world_size == MPI.COMM_WORLD.Get_size() and comm.rank == MPI.COMM_WORLD.Get_rank()
    assert comm.is_root == (comm.rank == 0)
    assert comm._comm != MPI.COMM_WORLD  # a clone, not the world itself
    # one real machine: all ranks share a node
    assert (comm.node, comm.num_nodes, comm.local_size) == (0, 1, comm.world_size)
    assert comm.local_rank == comm.rank


@pytest.mark.parametrize("k", [1, 2, 3])
def test_fake_nodes_layout(k):
    c = parallel.init_comm(fake_nodes=k)
    n = c.world_size
    per = math.ceil(n / k)
    assert c.node == c.rank // per and c.local_rank == c.rank % per
    assert c.num_nodes == math.ceil(n / per)
    assert c.local_size == min(per, n - c.node * per)
    rows = c.allgather_obj((c.node, c.local_rank))
    assert len(set(rows)) == n
    c.free()


def test_collectives(comm):
    n, r = comm.world_size, comm.rank
    got = comm.allgather_concat(torch.full((r,), float(r), dtype=torch.float64))
    assert got.dtype == torch.float64
    assert got.tolist() == [float(i) for i in range(n) for _ in range(i)]
    got = comm.allgather_concat(torch.arange(2, dtype=torch.float32) + 10 * r)
    assert got.tolist() == [float(10 * i + j) for i in range(n) for j in range(2)]
    assert comm.allgather_obj({"r": r}) == [{"r": i} for i in range(n)]
    assert comm.bcast_obj(("from", r), root=n - 1) == ("from", n - 1)
    assert comm.agree_any(r == n - 1) is True and comm.agree_any(False) is False
    assert comm.all_arrive(60.0) is True  # every rank calls it: the non-blocking barrier completes
    assert comm.allreduce_max(float(r)) == float(n - 1)
    # shapes and dtypes travel in a fixed-size buffer all-gather: 2-d and empty parts keep theirs
    parts = comm._allgather_array(np.full((r, 2), r, dtype=np.int32))
    assert [p.shape for p in parts] == [(i, 2) for i in range(n)] and all(p.dtype == np.int32 for p in parts)
    if n > 1:
        with pytest.raises(RuntimeError, match="different dtypes"):
            comm._allgather_array(np.zeros(1, dtype=np.float32 if r == 0 else np.float64))
    top, cat = comm.allgather_head([float(r == 0), float(r)], torch.full((r,), r + 0.25, dtype=torch.float64))
    assert top == [1.0, float(n - 1)] and cat.tolist() == [i + 0.25 for i in range(n) for _ in range(i)]
    assert comm.allreduce_sum_int(torch.tensor([r, 1], dtype=torch.int64)).tolist() == [n * (n - 1) // 2, n]
    comm.barrier()


@pytest.mark.parametrize("num_rows", [0, 1, 7, 13])
def test_exact_sum_matches_serial_bits(comm, num_rows):
    g = torch.Generator().manual_seed(num_rows)
    rows = torch.randn(num_rows, 101, generator=g) * torch.logspace(-5, 5, 101)
    want = parallel.SerialComm().allreduce_sum_exact(rows)
    mine = parallel.block_range(num_rows, comm.rank, comm.world_size)
    got = comm.allreduce_sum_exact(rows[mine.start : mine.stop])
    assert got.numpy().tobytes() == want.numpy().tobytes()
    comm.check_consistent("exact-sum", got.numpy().tobytes())


def test_exact_sum_nonfinite_raises_everywhere(comm):
    t = torch.ones(4)
    if comm.rank == comm.world_size - 1:
        t[1] = float("nan")
    with pytest.raises(FloatingPointError, match=f"rank {comm.world_size - 1}: 1"):
        comm.allreduce_sum_exact(t)


def test_check_consistent_names_ranks(comm):
    comm.check_consistent("same", b"abc")
    with pytest.raises(
        RuntimeError,
        match=r"'theta' failed: rank\(s\) \[1\] \(host\(s\) .*\) hold a different theta than rank\(s\) \[0",
    ):
        comm.check_consistent("theta", b"x" if comm.rank == 1 else b"y")


def test_bind_device_logs_once(comm, caplog):
    before = torch.get_num_threads()
    try:
        with caplog.at_level("INFO", logger="mpigls.parallel"):
            dev = parallel.bind_device(comm, device="cpu", threads=1)
        assert dev.type == "cpu" and torch.get_num_threads() == 1
        if comm.is_root:
            assert all(f"rank {i}:" in caplog.text for i in range(comm.world_size))
        else:
            assert "rank 0:" not in caplog.text
    finally:
        torch.set_num_threads(before)


def test_stop_flag_agreement(comm):
    stop = parallel.StopSignal()
    if comm.rank == comm.world_size - 1:
        stop.signum = 10  # as if SIGUSR1 arrived on one rank only
    assert comm.agree_any(stop.requested) is True
