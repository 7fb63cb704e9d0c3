"""Checkpoints in an MPI job: rank 0 writes, every rank reads the same bits."""

from __future__ import annotations

import numpy as np
import pytest

from mpigls import parallel
from mpigls.run import checkpoint, rundir

pytestmark = pytest.mark.mpi(min_size=2)


def test_root_saves_all_ranks_load_identical(mpi_tmp_path):
    comm = parallel.init_comm()
    theta = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
    ckpt = checkpoint.Checkpoint(
        4,
        1,
        2,
        theta,
        np.full(1000, 0.1, np.float32),
        {"m": theta * 2, "t": 4},
        {"seed": 1},
        {"name": "mlp"},
        {"loss": np.ones(4)},
        "n",
        world_size=comm.world_size,
    )
    if comm.is_root:
        rundir.clean_stale_temps(mpi_tmp_path)
        checkpoint.save(mpi_tmp_path, ckpt)
    comm.barrier()
    path = rundir.find_latest(mpi_tmp_path)
    got = checkpoint.load(path)
    assert got.theta.tobytes() == theta.tobytes()
    comm.check_consistent("loaded-theta", got.theta.tobytes())
    s = checkpoint.summary(path)
    assert comm.allgather_obj(s["theta_sha256"]) == [checkpoint.theta_sha256(theta)] * comm.world_size
