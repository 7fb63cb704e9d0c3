"""Datasets in memory, the shared-seed minibatch order, and deterministic augmentation.

Every rank loads the whole dataset and draws the SAME minibatch for a step: the batch order and
the augmentation are functions of (seed, epoch, batch) only, drawn from numpy's Philox
counter-based generator (``noise.numpy_generator``), so they do not depend on the number of
ranks, the device or the machine. Images are float32 in [0, 1], NCHW; the per-channel mean/std of
a ``Dataset`` are meant for the model's first (``Normalize``) layer, so eps stays in pixel space.
Augmentation follows Gaussian Loss Smoothing (arXiv 2403.07095) App. B.4 (after Müller et al.
2023): none for MNIST; CIFAR-10 gets a random 32x32 crop after 2-pixel zero padding and a random
horizontal flip.

Expected on-disk layout (``data.root`` = ROOT). Loading never downloads; ``data.download: true`` or
``mpigls data fetch mnist|cifar10 --root ROOT`` fetches MNIST or CIFAR-10 into this layout first
(``mpigls.interop.fetch``):

- ``digits``: none; scikit-learn's bundled 8x8 digits (1x8x8, 10 classes, values 0..16 / 16).
  1797 images; the last 360 are the test set, the first 1437 the training set.
- ``mnist``: exactly what ``torchvision.datasets.MNIST(ROOT, download=True)`` leaves::

      ROOT/MNIST/raw/train-images-idx3-ubyte   ROOT/MNIST/raw/train-labels-idx1-ubyte
      ROOT/MNIST/raw/t10k-images-idx3-ubyte    ROOT/MNIST/raw/t10k-labels-idx1-ubyte

  (uncompressed idx files; if you only have the ``.gz`` files, ``gunzip ROOT/MNIST/raw/*.gz``).
  1x28x28, 10 classes, no normalisation (mean 0, std 1) as in the paper.
- ``cifar10``: the extracted python version, as ``torchvision.datasets.CIFAR10(ROOT,
  download=True)`` leaves it (``tar xzf cifar-10-python.tar.gz -C ROOT``)::

      ROOT/cifar-10-batches-py/{data_batch_1..data_batch_5, test_batch, batches.meta}

  md5 sums are verified by torchvision. 3x32x32, 10 classes, dataset mean/std normalisation.
- ``tinyimagenet``: the extracted ``tiny-imagenet-200.zip`` (http://cs231n.stanford.edu/)::

      ROOT/tiny-imagenet-200/wnids.txt                       one class id (wnid) per line
      ROOT/tiny-imagenet-200/train/<wnid>/images/*.JPEG      training images
      ROOT/tiny-imagenet-200/val/images/*.JPEG               validation images, labelled by
      ROOT/tiny-imagenet-200/val/val_annotations.txt         "<file>\\t<wnid>\\t..." lines

  (a ``val/<wnid>/images/*.JPEG`` tree is accepted too). The labelled validation set is the test
  set. 3x64x64 (grey images are converted to RGB), one class per wnid in wnids.txt (200).
  Training images are ordered round-robin over classes so that ``num_train`` keeps classes
  balanced. Memory: the full set is ~4.9 GB as float32.
- ``synthetic``: none; random class prototypes plus noise, deterministic from ``seed`` (tests).

Validation split (``data.val_size`` > 0): ``val_size`` examples are drawn out of the training set
by a Philox permutation keyed by ``data.val_seed`` (``validation_split``) and held apart as
``Dataset.val_x``/``val_y``; training sees only the rest (in its original order), the test set is
untouched. The split is carved before ``num_train`` is applied, so it does not change with it.

Shapes: B batch, C/H/W image, N examples, K classes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import operator
import os
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mpigls.numerics.noise import STREAM_DATA, numpy_generator

__all__ = ["DATASETS", "AUGMENTATIONS", "Dataset", "load", "validation_split", "batch_indices", "augment"]

DATASETS = ("digits", "mnist", "cifar10", "tinyimagenet", "synthetic")
AUGMENTATIONS = ("none", "flip", "cifar")
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
TINYIMAGENET_MEAN, TINYIMAGENET_STD = (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)
CROP_PADDING = 2
DIGITS_NUM_TEST = 360
# numpy's SeedSequence pads short keys with zeros, so (seed, 3, epoch, 0) would reproduce the
# batch-order stream (seed, 3, epoch); a trailing tag word keeps the augmentation stream apart.
_AUGMENT_TAG = 1
_SYNTHETIC_TAG = 2**32 - 1
_VALIDATION_TAG = 2**32 - 2  # (val_seed, STREAM_DATA, tag): apart from every epoch's batch order
_SYNTHETIC_OPTS = ("shape", "num_classes", "n", "seed")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A labelled image dataset held in memory (CPU tensors)."""

    name: str
    train_x: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    train_y: torch.Tensor  # (N,) int64 in [0, K)
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]  # per channel, for the model's Normalize layer
    std: tuple[float, ...]
    val_x: torch.Tensor | None = None  # the validation split carved from the training set (data.val_size)
    val_y: torch.Tensor | None = None

    def __post_init__(self):
        splits = [("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)]
        if (self.val_x is None) != (self.val_y is None):
            raise ValueError(f"dataset {self.name!r}: give both validation images and labels, or neither")
        if self.val_x is not None and self.val_y is not None:
            splits.append(("validation", self.val_x, self.val_y))
        for split, x, y in splits:
            if x.dtype != torch.float32 or x.dim() != 4 or y.dtype != torch.int64 or y.shape != x.shape[:1]:
                raise ValueError(
                    f"dataset {self.name!r}: {split} images must be float32 (N, C, H, W) and labels "
                    f"int64 (N,), got {x.dtype} {tuple(x.shape)} and {y.dtype} {tuple(y.shape)}"
                )
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise ValueError(
                f"dataset {self.name!r}: train images {tuple(self.train_x.shape[1:])} and test images "
                f"{tuple(self.test_x.shape[1:])} differ in shape"
            )
        if len(self.mean) != self.train_x.shape[1] or len(self.std) != self.train_x.shape[1]:
            raise ValueError(
                f"dataset {self.name!r}: mean/std need one value per channel "
                f"({self.train_x.shape[1]}), got {self.mean} / {self.std}"
            )

    @property
    def in_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = (int(s) for s in self.train_x.shape[1:])
        return c, h, w


def load(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    num_train: int | None = None,
    num_test: int | None = None,
    val_size: int = 0,
    val_seed: int = 0,
    **opts,
) -> Dataset:
    """Load dataset ``name`` (one of DATASETS) from ``root``; keep the first num_train/num_test examples.

    ``val_size`` > 0 first moves that many training examples, chosen by ``val_seed``
    (``validation_split``), into the validation split; ``num_train`` then counts what is left.
    ``opts`` are for "synthetic" only: shape=(1, 8, 8), num_classes=3, n=256 (examples per split),
    seed=0. Missing files raise FileNotFoundError, corrupt files ValueError, both naming the path.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    allowed = _SYNTHETIC_OPTS if name == "synthetic" else ()
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise TypeError(
            f"load({name!r}) got unknown options {unknown}; allowed: {list(allowed) or 'none'} "
            f"(plus num_train, num_test)"
        )
    for key, value in (("num_train", num_train), ("num_test", num_test)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{key} must be a positive integer or None (all examples), got {value!r}")
    if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 0:
        raise ValueError(f"val_size must be an integer >= 0 (0: no validation split), got {val_size!r}")
    if name == "digits":
        ds = _load_digits()
    elif name == "synthetic":
        ds = _load_synthetic(**opts)
    else:
        if root is None:
            raise FileNotFoundError(
                f"dataset {name!r} is read from a local directory but no root was given; "
                f"set data.root to the directory holding it (layouts: mpigls.data docstring)"
            )
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(
                f"dataset root {str(root)!r} for {name!r} does not exist or is not a directory; "
                f"set data.root to the directory holding the {name} files "
                f"(layouts: mpigls.data docstring)"
            )
        if name == "tinyimagenet":
            ds = _load_tinyimagenet(root, None if num_train is None else num_train + val_size)
        else:
            ds = {"mnist": _load_mnist, "cifar10": _load_cifar10}[name](root)
    if val_size:
        ds = _carve_validation(ds, val_size, val_seed)
    return _subset(ds, num_train, num_test)


def validation_split(num_examples: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices) of a training set of ``num_examples``, both sorted.

    The validation indices are the first ``val_size`` of a Philox permutation keyed by
    (seed, STREAM_DATA, _VALIDATION_TAG): the same on every machine and rank, another for another seed.
    """
    num_examples, val_size = operator.index(num_examples), operator.index(val_size)
    if not 0 < val_size < num_examples:
        raise ValueError(
            f"data.val_size must lie in [1, {num_examples - 1}] (the training set has {num_examples} "
            f"examples and some must stay for training), got {val_size}"
        )
    perm = numpy_generator(seed, STREAM_DATA, _VALIDATION_TAG).permutation(num_examples)
    return np.sort(perm[val_size:]).astype(np.int64), np.sort(perm[:val_size]).astype(np.int64)


def _carve_validation(ds: Dataset, val_size: int, seed: int) -> Dataset:
    train_idx, val_idx = (torch.from_numpy(i) for i in validation_split(len(ds.train_y), val_size, seed))
    return dataclasses.replace(
        ds,
        train_x=ds.train_x[train_idx],
        train_y=ds.train_y[train_idx],
        val_x=ds.train_x[val_idx],
        val_y=ds.train_y[val_idx],
    )


def _subset(ds: Dataset, num_train: int | None, num_test: int | None) -> Dataset:
    for key, value, have in (("num_train", num_train, len(ds.train_y)), ("num_test", num_test, len(ds.test_y))):
        if value is not None and value > have:
            raise ValueError(
                f"{key}={value} but dataset {ds.name!r} has only {have} examples in that split; "
                f"use at most {have} or leave {key} unset"
            )
    return dataclasses.replace(
        ds,
        train_x=ds.train_x[:num_train],
        train_y=ds.train_y[:num_train],
        test_x=ds.test_x[:num_test],
        test_y=ds.test_y[:num_test],
    )


def _misplaced(root: Path, layout: str, marker: str) -> str:
    """A hint when data.root points inside the dataset's layout instead of at its top."""
    for parent in (root.parent, root.parent.parent):
        if parent != root and (parent / layout / marker).is_file():
            return f"; data.root seems to point inside the dataset: set it to {str(parent)!r}"
    return ""


def _check_labels(name: str, where: str, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"{where} is corrupt: {name} labels must lie in [0, {num_classes}), found "
            f"[{int(y.min())}, {int(y.max())}]; re-download or re-extract the dataset"
        )
    return y.to(torch.int64)


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    cut = len(y) - DIGITS_NUM_TEST
    return Dataset("digits", x[:cut], y[:cut], x[cut:], y[cut:], 10, (0.0,), (1.0,))


def _load_synthetic(shape=(1, 8, 8), num_classes: int = 3, n: int = 256, seed: int = 0) -> Dataset:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1 or num_classes < 2 or n < 1:
        raise ValueError(
            f"synthetic data needs shape (C, H, W) > 0, num_classes >= 2 and n >= 1, got "
            f"shape={shape}, num_classes={num_classes}, n={n}"
        )
    rng = numpy_generator(seed, STREAM_DATA, _SYNTHETIC_TAG)
    prototypes = rng.uniform(0.2, 0.8, size=(num_classes, *shape))  # (K, C, H, W)

    def split():
        y = rng.permutation(np.arange(n) % num_classes)
        x = np.clip(prototypes[y] + 0.1 * rng.standard_normal((n, *shape)), 0.0, 1.0)
        return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))

    train_x, train_y = split()
    test_x, test_y = split()
    c = shape[0]
    return Dataset("synthetic", train_x, train_y, test_x, test_y, num_classes, (0.0,) * c, (1.0,) * c)


# ---------------------------------------------------------------------------------------- MNIST

_MNIST_FILES = {
    "train-images-idx3-ubyte": 3,
    "train-labels-idx1-ubyte": 1,
    "t10k-images-idx3-ubyte": 3,
    "t10k-labels-idx1-ubyte": 1,
}
_MNIST_FIX = (
    "download it once on a machine with internet with "
    "torchvision.datasets.MNIST(ROOT, download=True) and copy ROOT/MNIST/raw/* into data.root/MNIST/raw/"
)


def _check_idx(path: Path, ndim: int) -> None:
    """Validate an idx ubyte header (magic 0x000008<ndim>, big-endian sizes) against the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(4 + 4 * ndim)
    if len(header) < 4 + 4 * ndim or header[:3] != b"\x00\x00\x08" or header[3] != ndim:
        fix = (
            f"it is gzip-compressed: `gunzip -c {path} > {path}.tmp && mv {path}.tmp {path}`"
            if header[:2] == b"\x1f\x8b"
            else _MNIST_FIX
        )
        raise ValueError(
            f"MNIST file {str(path)!r} is corrupt: expected an idx ubyte file with magic number "
            f"0x0000080{ndim}, got header bytes {header[:4].hex() or 'none'}; {fix}"
        )
    dims = [int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if size != expected:
        raise ValueError(
            f"MNIST file {str(path)!r} is corrupt (truncated or padded): header says {dims} so "
            f"{expected} bytes, the file has {size}; {_MNIST_FIX}"
        )


def _load_mnist(root: Path) -> Dataset:
    import torchvision

    raw = root / "MNIST" / "raw"
    processed = root / "MNIST" / "processed"
    if not all((processed / f).is_file() for f in ("training.pt", "test.pt")):  # torchvision's legacy cache
        missing = [f for f in _MNIST_FILES if not (raw / f).is_file()]
        if missing:
            gz = [f for f in missing if (raw / (f + ".gz")).is_file()]
            hint = f"found {gz[0]}.gz: decompress with `gunzip {raw}/*.gz`" if gz else _MNIST_FIX
            raise FileNotFoundError(
                f"MNIST files missing under {str(raw)!r}: {', '.join(missing)}; expected "
                f"ROOT/MNIST/raw/{{{', '.join(_MNIST_FILES)}}} (uncompressed); {hint}"
                f"{_misplaced(root, 'MNIST/raw', 'train-images-idx3-ubyte')}"
            )
        for f, ndim in _MNIST_FILES.items():
            _check_idx(raw / f, ndim)
    splits = []
    for train in (True, False):
        try:
            ds = torchvision.datasets.MNIST(str(root), train=train, download=False)
        except Exception as exc:  # torchvision raises RuntimeError/AssertionError/TypeError for bad files
            raise ValueError(
                f"could not read MNIST from {str(raw)!r} ({type(exc).__name__}: {exc}); the files "
                f"are corrupt or not MNIST; {_MNIST_FIX}"
            ) from exc
        x, y = ds.data, ds.targets  # (N, 28, 28) uint8, (N,) int64
        where = f"MNIST {'train' if train else 'test'} split under {str(raw)!r}"
        if len(x) != len(y):
            raise ValueError(f"{where} is corrupt: {len(x)} images but {len(y)} labels; {_MNIST_FIX}")
        splits += [x.unsqueeze(1).to(torch.float32) / 255.0, _check_labels("MNIST", where, y, 10)]
    train_x, train_y, test_x, test_y = splits
    return Dataset("mnist", train_x, train_y, test_x, test_y, 10, (0.0,), (1.0,))


# ------------------------------------------------------------------------------------- CIFAR-10

_CIFAR_FIX = (
    "download once with torchvision.datasets.CIFAR10(ROOT, download=True) on a machine with internet "
    "(or `tar xzf cifar-10-python.tar.gz -C ROOT`) and copy ROOT/cifar-10-batches-py/ into data.root"
)


def _cifar_files():
    from torchvision.datasets import CIFAR10

    return [*CIFAR10.train_list, *CIFAR10.test_list, [CIFAR10.meta["filename"], CIFAR10.meta["md5"]]]


def _diagnose_cifar(base: Path) -> str:
    """Name the first CIFAR-10 file whose md5 or pickle is bad (torchvision's errors do not)."""
    for name, md5 in _cifar_files():
        path = base / name
        data = path.read_bytes()
        got = hashlib.md5(data).hexdigest()
        if got != md5:
            return f"CIFAR-10 file {str(path)!r} is corrupt: md5 {got}, expected {md5}"
        try:
            pickle.loads(data, encoding="latin1")
        except Exception as exc:  # noqa: BLE001 - whatever unpickling raises, the file is corrupt
            return f"CIFAR-10 file {str(path)!r} is corrupt: not a readable pickle ({type(exc).__name__}: {exc})"
    return f"CIFAR-10 files under {str(base)!r} are corrupt or not CIFAR-10"


def _load_cifar10(root: Path) -> Dataset:
    import torchvision

    base = root / "cifar-10-batches-py"
    missing = [name for name, _ in _cifar_files() if not (base / name).is_file()]
    if missing:
        tar = root / "cifar-10-python.tar.gz"
        hint = f"found {str(tar)!r}: extract it with `tar xzf {tar} -C {root}`" if tar.is_file() else _CIFAR_FIX
        raise FileNotFoundError(
            f"CIFAR-10 files missing under {str(base)!r}: {', '.join(missing)}; expected "
            f"ROOT/cifar-10-batches-py/{{data_batch_1..5, test_batch, batches.meta}}; {hint}"
            f"{_misplaced(root, 'cifar-10-batches-py', 'data_batch_1')}"
        )
    splits = []
    for train in (True, False):
        try:
            ds = torchvision.datasets.CIFAR10(str(root), train=train, download=False)
            x = torch.from_numpy(np.ascontiguousarray(ds.data))  # (N, 32, 32, 3) uint8
            y = torch.as_tensor(ds.targets, dtype=torch.int64)
        except Exception as exc:
            raise ValueError(f"{_diagnose_cifar(base)} ({type(exc).__name__}: {exc}); {_CIFAR_FIX}") from exc
        where = f"CIFAR-10 {'train' if train else 'test'} split under {str(base)!r}"
        if len(x) != len(y):
            raise ValueError(f"{where} is corrupt: {len(x)} images but {len(y)} labels; {_CIFAR_FIX}")
        splits += [
            x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0).contiguous(),
            _check_labels("CIFAR-10", where, y, 10),
        ]
    train_x, train_y, test_x, test_y = splits
    return Dataset("cifar10", train_x, train_y, test_x, test_y, 10, CIFAR10_MEAN, CIFAR10_STD)


# --------------------------------------------------------------------------------- TinyImageNet

_TINY_FIX = (
    "download http://cs231n.stanford.edu/tiny-imagenet-200.zip and `unzip tiny-imagenet-200.zip -d ROOT`; "
    "expected ROOT/tiny-imagenet-200/{wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, "
    "val/val_annotations.txt}"
)


def _read_images(paths: list[str]) -> torch.Tensor:
    """Decode JPEGs (PIL, converted to RGB) into (N, C, H, W) float32 in [0, 1]; all must share one size."""
    from PIL import Image

    out = None
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as img:
                arr = np.asarray(img.convert("RGB"))  # (H, W, 3) uint8
        except OSError as exc:  # PIL.UnidentifiedImageError and truncated files are OSErrors
            raise ValueError(
                f"TinyImageNet image {path!r} is corrupt ({type(exc).__name__}: {exc}); {_TINY_FIX}"
            ) from exc
        if out is None:
            out = np.empty((len(paths), *arr.shape), dtype=np.uint8)
        if arr.shape != out.shape[1:]:
            raise ValueError(
                f"TinyImageNet image {path!r} has size {arr.shape[:2]}, expected {out.shape[1:3]} "
                f"like the first image; the dataset is corrupt or mixed; {_TINY_FIX}"
            )
        out[i] = arr
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(torch.float32).div_(255.0).contiguous()


def _image_folder(directory: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    from torchvision.datasets.folder import make_dataset

    try:
        return make_dataset(str(directory), class_to_idx, extensions=(".jpeg", ".jpg", ".png"))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"TinyImageNet images missing under {str(directory)!r}: {exc}; {_TINY_FIX}") from exc


def _round_robin(samples: list[tuple[str, int]]) -> list[tuple[str, int]]:
    by_class: dict[int, list[tuple[str, int]]] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    queues = [by_class[k] for k in sorted(by_class)]
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


def _load_tinyimagenet(root: Path, num_train: int | None) -> Dataset:
    base = root / "tiny-imagenet-200"
    wnids_file, train_dir, val_dir = base / "wnids.txt", base / "train", base / "val"
    for path in (wnids_file, train_dir, val_dir):
        if not path.exists():
            raise FileNotFoundError(
                f"TinyImageNet path {str(path)!r} is missing; {_TINY_FIX}"
                f"{_misplaced(root, 'tiny-imagenet-200', 'wnids.txt')}"
            )
    wnids = sorted({line.strip() for line in wnids_file.read_text().splitlines() if line.strip()})
    if not wnids:
        raise ValueError(f"TinyImageNet file {str(wnids_file)!r} is corrupt: it lists no class ids; {_TINY_FIX}")
    class_to_idx = {wnid: i for i, wnid in enumerate(wnids)}
    train = _round_robin(_image_folder(train_dir, class_to_idx))[:num_train]
    annotations = val_dir / "val_annotations.txt"
    if annotations.is_file():
        test = []
        for lineno, line in enumerate(annotations.read_text().splitlines(), 1):
            fields = line.split("\t")
            if not line.strip():
                continue
            if len(fields) < 2 or fields[1] not in class_to_idx:
                raise ValueError(
                    f"TinyImageNet file {str(annotations)!r} is corrupt at line {lineno}: {line!r} "
                    f"does not start with '<file>\\t<wnid from wnids.txt>'; {_TINY_FIX}"
                )
            path = val_dir / "images" / fields[0]
            if not path.is_file():
                raise FileNotFoundError(
                    f"TinyImageNet image {str(path)!r} listed in {str(annotations)!r} is missing; {_TINY_FIX}"
                )
            test.append((str(path), class_to_idx[fields[1]]))
    else:
        test = _image_folder(val_dir, class_to_idx)
    xs = [_read_images([p for p, _ in split]) for split in (train, test)]
    ys = [torch.tensor([k for _, k in split], dtype=torch.int64) for split in (train, test)]
    return Dataset("tinyimagenet", xs[0], ys[0], xs[1], ys[1], len(wnids), TINYIMAGENET_MEAN, TINYIMAGENET_STD)


# ----------------------------------------------------------------------- batches and augmentation


def batch_indices(seed: int, epoch: int, num_examples: int, batch_size: int) -> np.ndarray:
    """Minibatch order of one epoch, (num_batches, batch_size) int64; the last partial batch is dropped.

    A permutation from Philox keyed by (seed, STREAM_DATA, epoch): identical on every rank and for
    every world size.
    """
    num_examples, batch_size = operator.index(num_examples), operator.index(batch_size)
    if batch_size < 1 or num_examples < 1 or batch_size > num_examples:
        raise ValueError(
            f"batch_size must lie in [1, num_examples={num_examples}], got {batch_size}; "
            f"lower train.batch_size or use more training examples"
        )
    perm = numpy_generator(seed, STREAM_DATA, epoch).permutation(num_examples)
    num_batches = num_examples // batch_size
    return perm[: num_batches * batch_size].astype(np.int64).reshape(num_batches, batch_size)


def augment(x: torch.Tensor, seed: int, epoch: int, batch: int, kind: str) -> torch.Tensor:
    """Deterministic augmentation of a batch x (B, C, H, W) -> (B, C, H, W), same on every rank.

    kind: "none" (x itself), "flip" (horizontal flip with probability 1/2), "cifar" (zero-pad by
    CROP_PADDING, random HxW crop, then the flip; paper App. B.4). Randomness: Philox keyed by
    (seed, STREAM_DATA, epoch, batch, tag), drawn in the order flip, row offset, column offset.
    """
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r}; valid kinds: {', '.join(AUGMENTATIONS)}")
    if kind == "none":
        return x
    if x.dim() != 4:
        raise ValueError(f"augment expects images (B, C, H, W), got shape {tuple(x.shape)}")
    b, _, h, w = x.shape
    pad = CROP_PADDING if kind == "cifar" else 0
    rng = numpy_generator(seed, STREAM_DATA, epoch, batch, _AUGMENT_TAG)
    flip = rng.random(b) < 0.5
    off_y = rng.integers(0, 2 * pad + 1, size=b)
    off_x = rng.integers(0, 2 * pad + 1, size=b)
    rows = off_y[:, None] + np.arange(h)  # (B, H) rows of the padded image
    cols = off_x[:, None] + np.where(flip[:, None], np.arange(w)[::-1], np.arange(w))  # (B, W)
    rows_t = torch.as_tensor(rows, device=x.device, dtype=torch.int64)
    cols_t = torch.as_tensor(cols, device=x.device, dtype=torch.int64)
    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x
    batch_idx = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch_idx, rows_t[:, :, None], cols_t[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()
