"""Dataset download without the internet: torchvision's downloader against a mirror served from a
local directory over HTTP on 127.0.0.1 (checksums verified), a failing downloader, rank 0
downloading while the other ranks wait."""

import contextlib
import functools
import gzip
import hashlib
import http.server
import pickle
import struct
import tarfile
import threading

import numpy as np
import pytest
import torch

from mpigls import cli, config, data, parallel
from mpigls.interop import fetch
from mpigls.run import train

from conftest import tiny_overrides


def _idx(array: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


@contextlib.contextmanager
def _serve(directory):
    """An HTTP server on 127.0.0.1 serving ``directory``; yields its URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def mnist_mirror(tmp_path, monkeypatch):
    """A local HTTP mirror of MNIST-format .gz files (6 train, 4 test images), with torchvision's
    expected md5 sums pointed at them; yields (its URL, the arrays)."""
    rng = np.random.default_rng(0)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 6).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 4).astype(np.uint8),
    }
    resources = []
    for name, array in arrays.items():
        blob = gzip.compress(_idx(array), mtime=0)
        (mirror / f"{name}.gz").write_bytes(blob)
        resources.append((f"{name}.gz", hashlib.md5(blob).hexdigest()))
    from torchvision.datasets import MNIST

    monkeypatch.setattr(MNIST, "resources", resources)
    with _serve(mirror) as url:
        yield url, arrays


def test_fetch_cifar10_from_a_local_mirror_with_checksums(tmp_path, monkeypatch):
    """torchvision's CIFAR-10 download (tar.gz md5, extraction, per-batch md5) into the layout mpigls reads."""
    from torchvision.datasets import CIFAR10

    rng = np.random.default_rng(1)
    build = tmp_path / "build" / "cifar-10-batches-py"
    build.mkdir(parents=True)
    md5 = {}
    batches = {name: 3 for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")}
    batches["test_batch"] = 2
    labels = {}
    for name, n in batches.items():
        labels[name] = rng.integers(0, 10, n).tolist()
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": labels[name]}
        (build / name).write_bytes(pickle.dumps(entry))
    (build / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    for f in build.iterdir():
        md5[f.name] = hashlib.md5(f.read_bytes()).hexdigest()
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    with tarfile.open(mirror / CIFAR10.filename, "w:gz") as tar:
        tar.add(build, arcname="cifar-10-batches-py")
    monkeypatch.setattr(CIFAR10, "tgz_md5", hashlib.md5((mirror / CIFAR10.filename).read_bytes()).hexdigest())
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5["batches.meta"]})
    root = tmp_path / "data"
    with _serve(mirror) as url:
        fetch.fetch("cifar10", root, mirror=url, say=lambda m: None)
    ds = data.load("cifar10", root)
    assert ds.train_x.shape == (15, 3, 32, 32) and ds.test_x.shape == (2, 3, 32, 32)
    assert ds.train_y.tolist() == sum((labels[f"data_batch_{i}"] for i in range(1, 6)), [])
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]  # no archive, no temporary directory


def _no_leftovers(root):
    return not list(root.glob(".fetch-*"))


def test_fetch_mnist_from_a_local_mirror_with_checksums(tmp_path, mnist_mirror):
    url, arrays = mnist_mirror
    root = tmp_path / "data"
    said = []
    fetch.fetch("mnist", root, mirror=url, say=said.append)
    ds = data.load("mnist", root)
    assert ds.train_x.shape == (6, 1, 28, 28) and ds.test_x.shape == (4, 1, 28, 28)
    assert torch.equal(ds.train_y, torch.from_numpy(arrays["train-labels-idx1-ubyte"].astype(np.int64)))
    assert torch.equal(
        (ds.train_x[:, 0] * 255).round().to(torch.uint8), torch.from_numpy(arrays["train-images-idx3-ubyte"])
    )
    assert _no_leftovers(root)
    fetch.fetch("mnist", root, mirror="http://127.0.0.1:9/", say=said.append)  # present: not downloaded again
    assert "already in" in said[-1]


def test_a_bad_checksum_leaves_nothing_behind(tmp_path, mnist_mirror, monkeypatch):
    from torchvision.datasets import MNIST

    url, _ = mnist_mirror
    bad = [(f, "0" * 32) if i == 2 else (f, md5) for i, (f, md5) in enumerate(MNIST.resources)]
    monkeypatch.setattr(MNIST, "resources", bad)
    root = tmp_path / "data"
    with pytest.raises(fetch.FetchError, match=r"could not download mnist into .*t10k-images-idx3-ubyte\.gz"):
        fetch.fetch("mnist", root, mirror=url, say=lambda m: None)
    assert not (root / "MNIST").exists() and _no_leftovers(root)
    with pytest.raises(FileNotFoundError, match="MNIST files missing"):  # the usual message stays
        data.load("mnist", root)


def test_a_download_failing_midway_leaves_no_partial_file(tmp_path):
    def half(name, into, mirror):
        raw = into / "MNIST" / "raw"
        raw.mkdir(parents=True)
        (raw / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03 truncated")
        raise ConnectionResetError("connection reset by peer")

    root = tmp_path / "data"
    with pytest.raises(
        fetch.FetchError, match=r"ConnectionResetError: connection reset by peer.*mpigls data fetch mnist"
    ):
        fetch.fetch("mnist", root, downloader=half, say=lambda m: None)
    assert not (root / "MNIST").exists() and _no_leftovers(root)


def _fake_download(calls):
    lock = threading.Lock()

    def download(name, into, mirror):
        with lock:
            calls.append(threading.current_thread().name)
        raw = into / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for f in fetch.MNIST_FILES:
            (raw / f).write_bytes(b"complete")

    return download


def test_rank0_downloads_while_the_others_wait(tmp_path):
    calls = []
    root = tmp_path / "shared"

    def body(comm):
        fetch.ensure(comm, "mnist", root, downloader=_fake_download(calls), say=lambda m: None)
        return fetch.present("mnist", root)  # every rank returns only after rank 0 has finished

    assert parallel.run_threaded(body, 3) == [True, True, True]
    assert calls == ["rank0"]


def test_a_failure_on_rank0_reaches_every_rank(tmp_path):
    def failing(name, into, mirror):
        raise OSError("Temporary failure in name resolution")

    def body(comm):
        try:
            fetch.ensure(comm, "mnist", tmp_path / "r", downloader=failing, say=lambda m: None)
        except fetch.FetchError as exc:
            return str(exc)
        return None

    messages = parallel.run_threaded(body, 3)  # returns: no rank hangs
    assert all(m and "Temporary failure in name resolution" in m for m in messages), messages
    assert messages[0].startswith("could not download mnist") and messages[1].startswith("rank 0 could not download")


def test_a_root_not_shared_with_rank0_is_named(tmp_path):
    def body(comm):
        try:  # each rank its own directory: a node-local data.root
            fetch.ensure(
                comm, "mnist", tmp_path / f"node{comm.rank}", downloader=_fake_download([]), say=lambda m: None
            )
        except fetch.FetchError as exc:
            return str(exc)
        return "ok"

    ok, other = parallel.run_threaded(body, 2)
    assert ok == "ok" and "rank 1 does not see the files" in other and "shared" in other


def test_data_download_config_and_cli(tmp_path, mnist_mirror, capsys):
    url, _ = mnist_mirror
    root = tmp_path / "data"
    assert cli.main(["data", "fetch", "mnist", "--root", str(root), "--mirror", url]) == 0
    assert "mnist ready in" in capsys.readouterr().out and fetch.present("mnist", root)
    assert cli.main(["data", "fetch", "mnist", "--root", str(tmp_path / "x"), "--mirror", url + "missing/"]) == 2
    assert "could not download mnist" in capsys.readouterr().err
    with pytest.raises(config.ConfigError, match="data.download=true can fetch mnist and cifar10"):
        config.load_config(
            None, tiny_overrides(**{"data.name": "tinyimagenet", "data.root": "/x", "data.download": True})
        )


def test_training_without_download_keeps_the_not_found_message(tmp_path):
    cfg = config.load_config(
        None, tiny_overrides(**{"data.name": "mnist", "data.root": str(tmp_path), "data.num_train": "null"})
    )
    assert not cfg.data.download
    with pytest.raises(FileNotFoundError, match="MNIST files missing"):
        train.train(cfg, tmp_path / "run", max_generations=1, log=lambda m: None)
    assert not (tmp_path / "MNIST").exists()


def test_training_with_download_fetches_on_rank0_first(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(fetch, "_torchvision_download", _fake_download(calls))
    cfg = config.load_config(
        None,
        tiny_overrides(**{"data.name": "mnist", "data.root": str(tmp_path / "d"), "data.download": True}),
    )
    # the fake files are not MNIST: loading them fails after the download, which is what is checked
    with pytest.raises(ValueError, match="MNIST file .* is corrupt"):
        train.train(cfg, tmp_path / "run", max_generations=1, log=lambda m: None)
    assert len(calls) == 1 and fetch.present("mnist", tmp_path / "d")
