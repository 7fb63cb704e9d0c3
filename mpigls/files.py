"""The files mpigls reads: one check that a path is a regular file before anything opens it.

``input_file(path, what)`` is called before every open of a file the project reads (checkpoints,
ONNX files, PyTorch state dicts, configs, records): it ``os.stat``s the path, which never blocks,
and refuses anything but a regular file (symlinks are followed: a symlink to a regular file is
that file). Opening a FIFO blocks until a writer appears and a character device may never end, so
a pipe or a device given as a checkpoint would otherwise hang the command (while it holds the run
lock, for ``train``); a directory or a socket would fail with a traceback. The refusal is an
``InputFileError`` (a ValueError: the command line reports it in one paragraph, exit code 2).

The module imports nothing from mpigls, so every layer of the package may use it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["InputFileError", "input_file", "kind_of"]


class InputFileError(ValueError):
    """A path given as an input is not a regular file (a user error: one paragraph, exit code 2)."""


def kind_of(mode: int) -> str:
    """What a ``st_mode`` is, in words ("a regular file", "a directory", "a FIFO (named pipe)", ...)."""
    for test, words in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return words
    return "not a regular file"


def input_file(path: str | os.PathLike, what: str, *, advice: str = "") -> Path:
    """``path`` as a Path once ``os.stat`` shows a regular file; FileNotFoundError when it does not
    exist, InputFileError for a directory, FIFO, device or socket (nothing is opened).

    ``what`` names the input in the message ("checkpoint", "model.init_from", "config file"),
    ``advice`` says what to pass instead."""
    p = Path(path)
    tail = f"; {advice}" if advice else ""
    if str(path).strip() == "":
        raise InputFileError(f"{what} is an empty path{tail}")
    try:
        st = os.stat(p)  # follows symlinks; never blocks, whatever the file is
    except FileNotFoundError:
        dangling = " (a symlink whose target does not exist)" if p.is_symlink() else ""
        raise FileNotFoundError(f"{what} {str(p)!r} does not exist{dangling}{tail}") from None
    except OSError as exc:
        raise InputFileError(f"{what} {str(p)!r} cannot be examined ({exc.strerror or exc}){tail}") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputFileError(
            f"{what} {str(p)!r} is {kind_of(st.st_mode)}, not a regular file; mpigls reads only regular files "
            f"(a pipe or device would block or never end){tail}"
        )
    return p
