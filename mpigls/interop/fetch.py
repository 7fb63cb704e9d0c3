"""Dataset download: MNIST and CIFAR-10 into ``data.root`` with torchvision's own downloader.

``fetch(name, root)`` downloads with torchvision (its mirrors, its md5 checksums, its archive
extraction) into a temporary directory inside ``root`` and only then moves the layout that
``mpigls.data`` reads into place, file by file with atomic renames: a failed or interrupted
download leaves no partial file in the dataset's layout (the temporary directory is removed; a kill
can leave a ``.fetch-*`` directory, never a truncated dataset file). Files already in place are
not downloaded again.

``ensure(comm, ...)`` is what ``data.download: true`` runs before a run loads its data: rank 0
fetches while the other ranks wait in a broadcast; rank 0's failure reaches every rank as the same
``FetchError`` (no hang), and a rank that cannot see the files rank 0 wrote (``data.root`` not on
a shared file system) gets an error saying so. ``mpigls data fetch NAME --root DIR`` is the same
download by hand (e.g. once on a login node with internet).

``mirror`` (a URL prefix, http or https, of a server holding the same files) replaces torchvision's
download locations, e.g. a site-local copy; the checksums are still verified.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["FETCHABLE", "FetchError", "fetch", "ensure", "present"]

FETCHABLE = ("mnist", "cifar10")
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR_DIR = "cifar-10-batches-py"

Downloader = Callable[[str, Path, "str | None"], None]


class FetchError(FileNotFoundError):
    """A dataset that is not in data.root and could not be downloaded (reported as a user error)."""


def _cifar_names() -> list[str]:
    from mpigls.data import _cifar_files

    return [name for name, _ in _cifar_files()]


def _layout(name: str) -> tuple[Path, list[str]]:
    """(directory relative to root, the files mpigls.data reads there)."""
    if name == "mnist":
        return Path("MNIST") / "raw", list(MNIST_FILES)
    return Path(CIFAR_DIR), _cifar_names()


def present(name: str, root: str | os.PathLike) -> bool:
    """Every file ``mpigls.data`` reads for ``name`` exists under ``root``."""
    sub, files = _layout(name)
    return all((Path(root) / sub / f).is_file() for f in files)


def _torchvision_download(name: str, into: Path, mirror: str | None) -> None:
    """torchvision's download + md5 check + extraction of ``name`` into directory ``into``."""
    from torchvision import datasets

    prefix = None if mirror is None else mirror.rstrip("/") + "/"
    if name == "mnist":
        # the class must be called MNIST: torchvision places its files under ROOT/<class name>/raw
        cls = type("MNIST", (datasets.MNIST,), {} if prefix is None else {"mirrors": [prefix]})
        cls(str(into), train=True, download=True)
    else:
        extra = {} if prefix is None else {"url": prefix + datasets.CIFAR10.filename}
        cls = type("CIFAR10", (datasets.CIFAR10,), extra)
        cls(str(into), train=True, download=True)


def _install(name: str, tmp: Path, root: Path) -> None:
    sub, files = _layout(name)
    missing = [f for f in files if not (tmp / sub / f).is_file()]
    if missing:
        raise FetchError(f"the download finished without {', '.join(missing)} (an unexpected archive layout)")
    (root / sub).mkdir(parents=True, exist_ok=True)
    for f in files:  # every file complete before it appears: an atomic rename within root's file system
        os.replace(tmp / sub / f, root / sub / f)


def fetch(
    name: str,
    root: str | os.PathLike,
    *,
    mirror: str | None = None,
    downloader: Downloader | None = None,
    say: Callable[[str], None] = print,
) -> Path:
    """Download dataset ``name`` (one of FETCHABLE) into ``root`` unless it is there; returns root.
    FetchError (naming the dataset, root and cause) on failure, with nothing partial left behind."""
    if name not in FETCHABLE:
        raise ValueError(
            f"mpigls can download {list(FETCHABLE)}, not {name!r}; place {name} under data.root by hand "
            "(layouts: mpigls.data docstring)"
        )
    root = Path(root).expanduser()
    if present(name, root):
        say(f"{name} is already in {root}")
        return root
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".fetch-{name}-", dir=root))
    except OSError as exc:
        raise FetchError(f"cannot create the dataset directory {str(root)!r} for {name}: {exc}") from None
    say(f"downloading {name} into {root} (torchvision, md5 checked)")
    try:
        (downloader or _torchvision_download)(name, tmp, mirror)
        _install(name, tmp, root)
    except Exception as exc:  # every cause becomes one clear message
        hint = f" or from the mirror {mirror}" if mirror else ""
        raise FetchError(
            f"could not download {name} into {str(root)!r}{hint} ({type(exc).__name__}: {str(exc).strip()[:400]}); "
            f"nothing was left in the dataset layout. Check the network or proxy (https_proxy), or download "
            f"it on a machine with internet with `mpigls data fetch {name} --root DIR` and copy DIR into data.root"
        ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def ensure(
    comm,
    name: str,
    root: str | os.PathLike | None,
    *,
    mirror: str | None = None,
    downloader: Downloader | None = None,
    say: Callable[[str], None] = print,
) -> None:
    """``data.download``: rank 0 fetches ``name`` when missing while the others wait; any failure is
    raised on every rank. Datasets that need no files (digits, synthetic) are left alone."""
    if name not in FETCHABLE or root is None:
        return
    error: str | None = None
    if comm.is_root:
        try:
            fetch(name, root, mirror=mirror, downloader=downloader, say=say)
        except (FetchError, ValueError) as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - never leave the other ranks waiting
            error = f"{type(exc).__name__}: {exc}"
    error = comm.bcast_obj(error)
    if error is not None:
        raise FetchError(error if comm.is_root else f"rank 0 could not download {name}: {error}")
    if not present(name, root):
        raise FetchError(
            f"rank 0 downloaded {name} into data.root={str(root)!r}, but rank {comm.rank} does not see the files "
            "there: data.root is not on a file system shared by all ranks. Use a shared directory, or run "
            f"`mpigls data fetch {name} --root DIR` once on every node"
        )
