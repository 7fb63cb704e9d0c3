"""Training with each member's minibatch split into example chunks (optimizer.batch_chunks) under a
real MPI launch: theta after a few generations is bitwise the one-process run of the same config,
on every rank (PGPE).

Run: mpiexec -n 3 python -m mpi4py -m pytest --with-mpi tests/mpi/test_mpi_chunks.py -q
"""

from __future__ import annotations

import pytest
import torch

from mpigls import config, parallel
from mpigls.run import train

from conftest import tiny_overrides

pytestmark = pytest.mark.mpi(min_size=2)


@pytest.mark.parametrize(
    "optimizer,chunks,noise", [("pgpe", 1, "host"), ("pgpe", 2, "host"), ("pgpe", 4, "host"), ("pgpe", 2, "device")]
)
def test_chunked_training_is_bitwise_the_one_process_run(mpi_tmp_path, optimizer, chunks, noise):
    """optimizer.noise: device as well (noise from mpigls.numerics.philox, state and update on the device)."""
    comm = parallel.init_comm()
    cfg = config.load_config(
        None,
        tiny_overrides(
            **{
                "optimizer.name": optimizer,
                "optimizer.batch_chunks": chunks,
                "optimizer.noise": noise,
                "train.checkpoint_every": 100,
            }
        ),
    )
    quiet = lambda msg: None
    got = train.train(cfg, mpi_tmp_path / f"{optimizer}{chunks}{noise}-mpi", comm=comm, max_generations=3, log=quiet)
    ref = train.train(
        cfg,
        mpi_tmp_path / f"{optimizer}{chunks}{noise}-serial{comm.rank}",
        comm=parallel.SerialComm(),
        max_generations=3,
        log=quiet,
    )
    assert got.generation == ref.generation == 3
    assert torch.equal(got.theta, ref.theta)
    comm.check_consistent("theta-chunks", got.theta.numpy().tobytes())
