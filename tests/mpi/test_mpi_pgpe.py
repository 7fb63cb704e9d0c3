"""Distributed PGPE update under a real MPI launch: every rank sums its own pairs, one int64
allreduce, and the new state is bitwise the serial pgpe.tell on every rank (any world size >= 2).

Run: mpiexec -n 3 python -m mpi4py -m pytest --with-mpi tests/mpi/test_mpi_pgpe.py -q
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mpigls import parallel
from mpigls.optim import pgpe
from mpigls.parallel import pgpe_unit

pytestmark = pytest.mark.mpi(min_size=2)


@pytest.fixture(scope="module")
def comm():
    return parallel.init_comm()


@pytest.mark.parametrize("block_size,fixed_sigma", [(1, False), (3, False), (4, True)])
def test_distributed_tell_is_serial_tell_bitwise(comm, block_size, fixed_sigma):
    D = 53
    params = pgpe.PGPEParams(popsize=22, lr=0.01, sigma_init=0.1, fixed_sigma=fixed_sigma)
    state = dataclasses.replace(pgpe.init(params, torch.linspace(-1, 1, D)), generation=5)
    loss = lambda x: (x.double() ** 2).sum(-1) + torch.sin(7 * x[:, 0].double())
    split = pgpe_unit.split_of(params, block_size)
    blocks = parallel.my_blocks(split.num_items, comm.rank, comm.world_size)
    source = pgpe_unit.NoiseSource(4, prefetch=comm.rank % 2 == 1)
    local, kept = pgpe_unit.evaluate(state, params, blocks, split, source, lambda x, ex: loss(x), torch.device("cpu"))
    source.close()
    all_losses = pgpe_unit.gather_losses(comm, split, local)[0]
    new, _ = pgpe.tell(
        state, params, 4, all_losses, summed=pgpe_unit.reduce_sums(comm, state, params, 4, all_losses, kept)
    )
    ref, _ = pgpe.tell(state, params, 4, loss(pgpe.ask(state, params, 4, range(11))))
    assert torch.equal(new.center, ref.center) and torch.equal(new.sigma, ref.sigma)
    comm.check_consistent("pgpe", new.center.numpy().tobytes() + new.sigma.numpy().tobytes())


@pytest.mark.parametrize("chunks", [1, 2, 4])
def test_chunked_minibatch_state_is_serial_reference_bitwise(comm, chunks):
    """Items (pair block, example chunk): the state after a generation equals, bit for bit, the same
    chunk count evaluated in ONE process (the serial reference), on every rank; one chunk equals
    the plain serial tell of the unchunked losses."""
    D, B = 41, 9
    X = torch.linspace(-2, 2, B * D).reshape(B, D).cos()
    params = pgpe.PGPEParams(popsize=10, lr=0.01, sigma_init=0.1)
    state = dataclasses.replace(pgpe.init(params, torch.linspace(-1, 1, D)), generation=2)

    def loss(points, ex):
        return ((points[:, None, :] - X[ex][None]) ** 2).sum(-1).mean(-1)

    split = pgpe_unit.split_of(params, 2, B, chunks)

    def step(c, items):
        source = pgpe_unit.NoiseSource(4, prefetch=c.rank % 2 == 1)
        local, kept = pgpe_unit.evaluate(state, params, items, split, source, loss, torch.device("cpu"))
        source.close()
        all_losses = pgpe_unit.gather_losses(c, split, local)[0]
        return pgpe.tell(
            state, params, 4, all_losses, summed=pgpe_unit.reduce_sums(c, state, params, 4, all_losses, kept)
        )[0], all_losses

    new, losses = step(comm, parallel.my_blocks(split.num_items, comm.rank, comm.world_size))
    ref, ref_losses = step(parallel.SerialComm(), range(split.num_items))
    assert torch.equal(losses, ref_losses)
    assert torch.equal(new.center, ref.center) and torch.equal(new.sigma, ref.sigma)
    full = loss(pgpe.ask(state, params, 4, range(5)), slice(0, B)).double()
    torch.testing.assert_close(losses, full, rtol=2e-6, atol=0)
    if chunks == 1:
        assert torch.equal(new.center, pgpe.tell(state, params, 4, full)[0].center)
    comm.check_consistent("pgpe-chunks", new.center.numpy().tobytes() + new.sigma.numpy().tobytes())


@pytest.mark.parametrize("kind", ["grad", "running"])
def test_control_variate_is_serial_tell_bitwise(comm, kind):
    """The control variate's products eps_j . g are formed by the rank that sums pair j; with max |eps . g|
    riding in the all-gather the new state (the running memory included) is the serial one, bitwise."""
    D = 53
    params = pgpe.PGPEParams(
        popsize=22, lr=0.01, sigma_init=0.1, fixed_sigma=False, fitness_shaping="raw", control_variate=kind
    )
    state = dataclasses.replace(pgpe.init(params, torch.linspace(-1, 1, D)), generation=5)
    if kind == "running":
        state = dataclasses.replace(state, cv=torch.linspace(-3, 2, D, dtype=torch.float64))
    loss = lambda x: (x.double() ** 2).sum(-1) + torch.sin(7 * x[:, 0].double())
    g = pgpe.control_variate(state, params, 2 * torch.linspace(-1, 1, D))
    split = pgpe_unit.split_of(params, 3)
    blocks = parallel.my_blocks(split.num_items, comm.rank, comm.world_size)
    source = pgpe_unit.NoiseSource(4)
    local, kept = pgpe_unit.evaluate(
        state, params, blocks, split, source, lambda x, ex: loss(x), torch.device("cpu"), g=g
    )
    source.close()
    all_losses, _, max_abs, max_c = pgpe_unit.gather_losses(comm, split, local, None, kept.max_abs, kept.max_abs_c)
    summed = pgpe_unit.reduce_sums(comm, state, params, 4, all_losses, kept, max_abs, max_c)
    new, _ = pgpe.tell(state, params, 4, all_losses, summed=summed, g=g)
    ref, _ = pgpe.tell(state, params, 4, loss(pgpe.ask(state, params, 4, range(11))), g=g)
    assert torch.equal(new.center, ref.center) and torch.equal(new.sigma, ref.sigma)
    assert (new.cv is None) == (kind == "grad") and (new.cv is None or torch.equal(new.cv, ref.cv))
