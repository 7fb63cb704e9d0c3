"""Distributed PGPE update under a real MPI launch: every rank sums its own pairs, one int64
allreduce, and the new state is bitwise the serial pgpe.tell on every rank (any world size >= 2).

Run: mpiexec -n 3 python -m mpi4py -m pytest --with-mpi tests/mpi/test_mpi_pgpe.py -q
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from mpigls import dist, pgpe_dist
from mpigls.optim import pgpe

pytestmark = pytest.mark.mpi(min_size=2)


@pytest.fixture(scope="module")
def comm():
    return dist.init_comm()


@pytest.mark.parametrize("block_size,fixed_sigma", [(1, False), (3, False), (4, True)])
def test_distributed_tell_is_serial_tell_bitwise(comm, block_size, fixed_sigma):
    D = 53
    params = pgpe.PGPEParams(popsize=22, lr=0.01, sigma_init=0.1, fixed_sigma=fixed_sigma)
    state = dataclasses.replace(pgpe.init(params, torch.linspace(-1, 1, D)), generation=5)
    loss = lambda x: (x.double() ** 2).sum(-1) + torch.sin(7 * x[:, 0].double())
    blocks = dist.my_blocks(math.ceil(11 / block_size), comm.rank, comm.world_size)
    source = pgpe_dist.NoiseSource(4, prefetch=comm.rank % 2 == 1)
    local, kept = pgpe_dist.evaluate(state, params, blocks, block_size, source, loss, torch.device("cpu"))
    source.close()
    all_losses = comm.allgather_concat(local)
    new, _ = pgpe.tell(state, params, 4, all_losses,
                       summed=pgpe_dist.reduce_sums(comm, state, params, 4, all_losses, kept))
    ref, _ = pgpe.tell(state, params, 4, loss(pgpe.ask(state, params, 4, range(11))))
    assert torch.equal(new.center, ref.center) and torch.equal(new.sigma, ref.sigma)
    comm.check_consistent("pgpe", new.center.numpy().tobytes() + new.sigma.numpy().tobytes())
