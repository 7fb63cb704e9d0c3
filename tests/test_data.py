"""Dataset loading from tiny files in the real on-disk formats, and the errors for bad input."""

from __future__ import annotations

import gzip
import hashlib
import pickle

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from mpigls import data


def _check_dataset(ds, in_shape, num_classes, num_train, num_test):
    assert ds.in_shape == in_shape and ds.num_classes == num_classes
    assert ds.train_x.shape == (num_train, *in_shape) and ds.test_x.shape == (num_test, *in_shape)
    for x, y in ((ds.train_x, ds.train_y), (ds.test_x, ds.test_y)):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert int(y.min()) >= 0 and int(y.max()) < num_classes
    assert len(ds.mean) == len(ds.std) == in_shape[0]


# ---------------------------------------------------------------------------- MNIST (idx ubyte)


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


@pytest.fixture
def mnist_root(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    arrays = {}
    for prefix, n in (("train", 12), ("t10k", 5)):
        arrays[prefix] = (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8))
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(_idx_bytes(arrays[prefix][0]))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx_bytes(arrays[prefix][1]))
    return tmp_path, arrays


def test_mnist_loads_real_format(mnist_root):
    root, arrays = mnist_root
    ds = data.load("mnist", root)
    _check_dataset(ds, (1, 28, 28), 10, 12, 5)
    assert torch.equal(ds.train_x[:, 0], torch.from_numpy(arrays["train"][0]).float() / 255)
    assert torch.equal(ds.test_y, torch.from_numpy(arrays["t10k"][1]).long())
    assert ds.mean == (0.0,) and ds.std == (1.0,)
    sub = data.load("mnist", str(root), num_train=4, num_test=2)
    assert torch.equal(sub.train_x, ds.train_x[:4]) and torch.equal(sub.test_y, ds.test_y[:2])


def test_mnist_missing_files_and_gz_hint(mnist_root, tmp_path):
    root, _ = mnist_root
    raw = root / "MNIST" / "raw"
    path = raw / "t10k-labels-idx1-ubyte"
    content = path.read_bytes()
    path.unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte") as err:
        data.load("mnist", root)
    assert "MNIST/raw" in str(err.value) and "download=True" in str(err.value)
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(content))
    with pytest.raises(FileNotFoundError, match="gunzip"):
        data.load("mnist", root)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load("mnist", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="data.root"):
        data.load("mnist")


@pytest.mark.parametrize("sub", ["MNIST", "MNIST/raw"])
def test_mnist_root_inside_layout_hint(mnist_root, sub):
    root, _ = mnist_root
    with pytest.raises(FileNotFoundError, match=f"point inside the dataset: set it to '{root}'"):
        data.load("mnist", root / sub)


def test_mnist_torchvision_errors_are_wrapped(mnist_root, monkeypatch):
    root, _ = mnist_root

    def broken(*args, **kwargs):
        raise RuntimeError("Dataset not found. You can use download=True to download it")

    monkeypatch.setattr(torchvision.datasets, "MNIST", broken)
    with pytest.raises(ValueError, match="could not read MNIST from .*MNIST/raw.*Dataset not found.*download=True"):
        data.load("mnist", root)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[:-7], "truncated"),
        (lambda b: b[:2], "magic number"),
        (lambda b: b"\x00\x00\x08\x01" + b[4:], "magic number"),
        (lambda b: b"\x1f\x8b" + b[2:], "magic number.*gzip-compressed: `gunzip -c"),
    ],
)
def test_mnist_corrupt_file(mnist_root, damage, message):
    root, _ = mnist_root
    path = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=message) as err:
        data.load("mnist", root)
    assert "train-images-idx3-ubyte" in str(err.value) and "corrupt" in str(err.value)


def test_mnist_inconsistent_labels(mnist_root):
    root, arrays = mnist_root
    labels = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    labels.write_bytes(_idx_bytes(arrays["t10k"][1][:3]))
    with pytest.raises(ValueError, match="5 images but 3 labels"):
        data.load("mnist", root)
    labels.write_bytes(_idx_bytes(np.full(5, 12, dtype=np.uint8)))
    with pytest.raises(ValueError, match=r"corrupt: MNIST labels must lie in \[0, 10\)"):
        data.load("mnist", root)


# ------------------------------------------------------------------------ CIFAR-10 (pickles)


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    """Tiny CIFAR-10 batches; torchvision's md5 table is pointed at them (the real check still runs)."""
    rng = np.random.default_rng(1)
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    arrays = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        x = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, 3).tolist()
        arrays[name] = (x, y)
        (base / name).write_bytes(
            pickle.dumps(
                {"batch_label": name, "labels": y, "data": x, "filenames": [f"{name}_{i}.png" for i in range(3)]},
                protocol=2,
            )
        )
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}, protocol=2))
    md5 = {name: hashlib.md5((base / name).read_bytes()).hexdigest() for name in [*names, "batches.meta"]}
    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[n, md5[n]] for n in names[:5]])
    monkeypatch.setattr(cls, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5["batches.meta"]})
    return tmp_path, arrays, md5


def test_cifar10_loads_real_format(cifar_root):
    root, arrays, _ = cifar_root
    ds = data.load("cifar10", root)
    _check_dataset(ds, (3, 32, 32), 10, 15, 3)
    first = torch.from_numpy(arrays["data_batch_1"][0][0].reshape(3, 32, 32)).float() / 255
    assert torch.equal(ds.train_x[0], first)  # CHW order: rows of 1024 bytes are R, G, B planes
    assert ds.train_y[:3].tolist() == arrays["data_batch_1"][1]
    assert ds.test_y.tolist() == arrays["test_batch"][1]
    assert ds.mean == data.CIFAR10_MEAN and ds.std == data.CIFAR10_STD
    assert data.load("cifar10", root, num_train=4).train_x.shape[0] == 4


def test_cifar10_missing(cifar_root):
    root, _, _ = cifar_root
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3") as err:
        data.load("cifar10", root)
    assert "cifar-10-batches-py" in str(err.value) and "download=True" in str(err.value)
    (root / "cifar-10-python.tar.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="tar xzf"):
        data.load("cifar10", root)
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=f"set it to '{root}'"):
        data.load("cifar10", root / "cifar-10-batches-py")


def test_cifar10_truncated_fails_md5(cifar_root):
    root, _, _ = cifar_root
    path = root / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="data_batch_2' is corrupt: md5"):
        data.load("cifar10", root)


def test_cifar10_bad_pickle(cifar_root, monkeypatch):
    root, _, md5 = cifar_root
    path = root / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(b"this is not a pickle")
    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "test_list", [["test_batch", hashlib.md5(path.read_bytes()).hexdigest()]])
    with pytest.raises(ValueError, match="test_batch' is corrupt: not a readable pickle"):
        data.load("cifar10", root)


# --------------------------------------------------------------------- TinyImageNet (JPEG tree)

WNIDS = ["n01443537", "n01629819", "n01641577"]


@pytest.fixture
def tiny_root(tmp_path):
    rng = np.random.default_rng(2)
    base = tmp_path / "tiny-imagenet-200"
    (base / "wnids.txt").parent.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(reversed(WNIDS)) + "\n")
    for k, wnid in enumerate(WNIDS):
        images = base / "train" / wnid / "images"
        images.mkdir(parents=True)
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("ignored\n")
        for i in range(2 + k):
            mode, shape = ("L", (64, 64)) if (k, i) == (1, 0) else ("RGB", (64, 64, 3))
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(images / f"{wnid}_{i}.JPEG")
    (base / "val" / "images").mkdir(parents=True)
    lines = []
    for i, k in enumerate([2, 0, 1, 2]):
        image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        image.save(base / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{WNIDS[k]}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_tinyimagenet_loads_real_layout(tiny_root):
    ds = data.load("tinyimagenet", tiny_root)
    _check_dataset(ds, (3, 64, 64), 3, 9, 4)
    assert ds.train_y.tolist() == [0, 1, 2, 0, 1, 2, 1, 2, 2]  # round-robin over sorted wnids
    assert ds.test_y.tolist() == [2, 0, 1, 2]
    assert ds.mean == data.TINYIMAGENET_MEAN
    sub = data.load("tinyimagenet", tiny_root, num_train=3, num_test=1)
    assert sub.train_y.tolist() == [0, 1, 2] and torch.equal(sub.train_x, ds.train_x[:3])
    grey = ds.train_x[1]  # the greyscale JPEG became three equal channels
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_tinyimagenet_errors(tiny_root):
    base = tiny_root / "tiny-imagenet-200"
    bad = base / "train" / WNIDS[0] / "images" / f"{WNIDS[0]}_1.JPEG"
    bad.write_bytes(bad.read_bytes()[:20])
    with pytest.raises(ValueError, match=f"{WNIDS[0]}_1.JPEG' is corrupt"):
        data.load("tinyimagenet", tiny_root)
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="is corrupt"):
        data.load("tinyimagenet", tiny_root)
    (base / "val" / "images" / "val_3.JPEG").unlink()
    with pytest.raises(FileNotFoundError, match="val_3.JPEG"):
        data.load("tinyimagenet", tiny_root)
    (base / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(ValueError, match="val_annotations.txt' is corrupt at line 1"):
        data.load("tinyimagenet", tiny_root)
    for path in (base / "train" / WNIDS[2] / "images").iterdir():
        path.unlink()
    with pytest.raises(FileNotFoundError, match=WNIDS[2]):
        data.load("tinyimagenet", tiny_root)
    with pytest.raises(FileNotFoundError, match=f"set it to '{tiny_root}'"):
        data.load("tinyimagenet", base)
    (base / "wnids.txt").unlink()
    with pytest.raises(FileNotFoundError, match="wnids.txt.*unzip tiny-imagenet-200.zip"):
        data.load("tinyimagenet", tiny_root)


# --------------------------------------------------------------------------- offline datasets


def test_digits_offline():
    ds = data.load("digits")
    _check_dataset(ds, (1, 8, 8), 10, 1437, 360)
    assert float(ds.train_x.max()) == 1.0 and ds.mean == (0.0,) and ds.std == (1.0,)
    assert torch.equal(data.load("digits").test_x, ds.test_x)
    assert set(ds.test_y.tolist()) == set(range(10))


def test_synthetic_deterministic_and_learnable():
    ds = data.load("synthetic", shape=(2, 5, 5), num_classes=4, n=40, seed=3)
    _check_dataset(ds, (2, 5, 5), 4, 40, 40)
    assert torch.equal(ds.train_x, data.load("synthetic", shape=(2, 5, 5), num_classes=4, n=40, seed=3).train_x)
    assert not torch.equal(ds.train_x, data.load("synthetic", shape=(2, 5, 5), num_classes=4, n=40, seed=4).train_x)
    centroids = torch.stack([ds.train_x[ds.train_y == k].mean(0) for k in range(4)])  # (K, C, H, W)
    dist = ((ds.test_x[:, None] - centroids[None]) ** 2).flatten(2).sum(-1)  # (B, K)
    assert (dist.argmin(1) == ds.test_y).float().mean() > 0.9


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'.*digits, mnist, cifar10, tinyimagenet"):
        data.load("imagenet")
    with pytest.raises(TypeError, match="unknown options"):
        data.load("digits", shape=(1, 8, 8))
    with pytest.raises(ValueError, match="num_train must be a positive integer"):
        data.load("digits", num_train=0)
    with pytest.raises(ValueError, match="num_test=999 but dataset 'digits' has only 360"):
        data.load("digits", num_test=999)
    with pytest.raises(ValueError, match="synthetic data needs"):
        data.load("synthetic", num_classes=1)


def test_dataset_validates():
    x, y = torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="int64"):
        data.Dataset("t", x, y.int(), x, y, 2, (0.0,), (1.0,))
    with pytest.raises(ValueError, match="one value per channel"):
        data.Dataset("t", x, y, x, y, 2, (0.0, 0.0), (1.0, 1.0))
