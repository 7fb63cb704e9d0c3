"""Dataset download in an MPI job: rank 0 downloads once while the others wait; its failure is
raised on every rank (no hang)."""

from __future__ import annotations

import pytest

from mpigls import parallel
from mpigls.interop import fetch

pytestmark = pytest.mark.mpi(min_size=2)


def _write_mnist(name, into, mirror):
    raw = into / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in fetch.MNIST_FILES:
        (raw / f).write_bytes(b"complete")


def test_rank0_downloads_the_others_see_the_files(mpi_tmp_path):
    comm = parallel.init_comm()
    calls = []

    def download(name, into, mirror):
        calls.append(comm.rank)
        _write_mnist(name, into, mirror)

    fetch.ensure(comm, "mnist", mpi_tmp_path / "data", downloader=download, say=lambda m: None)
    assert fetch.present("mnist", mpi_tmp_path / "data")
    assert comm.allgather_obj(calls) == [[0]] + [[]] * (comm.world_size - 1)


def test_a_failure_on_rank0_is_raised_on_every_rank(mpi_tmp_path):
    comm = parallel.init_comm()

    def failing(name, into, mirror):
        raise OSError("Name or service not known")

    with pytest.raises(fetch.FetchError, match="Name or service not known"):
        fetch.ensure(comm, "mnist", mpi_tmp_path / "fail", downloader=failing, say=lambda m: None)
    assert not (mpi_tmp_path / "fail" / "MNIST").exists()
