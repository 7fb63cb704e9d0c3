"""Finished examples of a long evaluation kept on disk, so that an interrupted run resumes them.

``certify --verify`` runs the complete verifier for minutes per example. Each rank appends every
verifier result it finishes to its own file ``<base>.part<rank>`` (one JSON line, flushed at once),
so Ctrl-C, SIGTERM or a killed job loses at most the example in progress. The next run reads the
rows of every ``<base>.part*`` file and reuses those of the same evaluation; the final results
file is written as if the run had never stopped, and the partial files are removed.

The same evaluation means the same ``key``: a SHA-256 over the parameter vector θ, the network's
layer structure, the examples (pixels and labels) and every setting that changes a result (eps,
bound methods, PGD steps and restarts, seed, the verifier's limits, ...). A file with another key
belongs to another network, data or settings and is never reused: it is replaced when this rank
writes, and removed with the others at the end. Rows are checked on reading (an index inside the
evaluated range, a known status, numbers where numbers belong); a truncated last line (a kill in
the middle of a write) is skipped.

File format: a header line ``{"schema": "mpigls-partial", "version": 1, "key": ..., "what": ...}``,
then ``{"index": i, "row": [...]}`` per finished example.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np
import torch

__all__ = ["SCHEMA", "VERSION", "evaluation_key", "PartialResults", "part_files"]

SCHEMA = "mpigls-partial"
VERSION = 1
_STATUSES = ("verified", "falsified", "unknown")


def _sha_update(h, t: torch.Tensor | np.ndarray) -> None:
    a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    a = np.ascontiguousarray(a)
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())


def evaluation_key(
    model: torch.nn.Module, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, settings: dict
) -> str:
    """SHA-256 (hex) naming one evaluation: θ, the layer structure, the examples and ``settings``."""
    from mpigls import __version__

    h = hashlib.sha256()
    h.update(json.dumps({"settings": settings, "mpigls": __version__}, sort_keys=True, default=str).encode())
    h.update(str(model).encode())
    for t in (theta, x, y):
        _sha_update(h, t)
    return h.hexdigest()


def part_files(base: str | os.PathLike) -> list[Path]:
    """The partial files of ``base`` (every rank's), sorted."""
    base = Path(base)
    if not base.parent.is_dir():
        return []
    return sorted(p for p in base.parent.glob(f"{base.name}.part*") if p.name[len(base.name) + 5 :].isdigit())


def _valid_row(row) -> bool:
    if not (isinstance(row, list) and len(row) == 5):
        return False
    status, reason, time_s, domains, lps = row
    numbers_ok = (
        isinstance(time_s, (int, float))
        and math.isfinite(time_s)
        and time_s >= 0
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (domains, lps))
    )
    return status in _STATUSES and isinstance(reason, str) and numbers_ok


def _read(path: Path, key: str, num_examples: int) -> dict[int, tuple] | None:
    """The rows of one partial file, or None when it is not of evaluation ``key``."""
    try:
        if not path.is_file():
            return None
        lines = path.read_bytes().split(b"\n")
    except OSError:
        return None
    rows: dict[int, tuple] = {}
    for i, raw in enumerate(lines[:-1]):  # the part after the last newline is a write cut short
        try:
            obj = json.loads(raw)
        except ValueError:
            if i == 0:
                return None
            continue
        if i == 0:
            ok = isinstance(obj, dict) and obj.get("schema") == SCHEMA and obj.get("version") == VERSION
            if not (ok and obj.get("key") == key):
                return None
            continue
        if not isinstance(obj, dict):
            continue
        index, row = obj.get("index"), obj.get("row")
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < num_examples:
            continue
        if isinstance(row, list) and _valid_row(row):
            rows[index] = tuple(row)
    return rows


class PartialResults:
    """This rank's partial file of evaluation ``key`` under ``base``, and the rows every rank's files
    already hold for it. ``get(index)`` a kept row or None; ``put(index, row)`` appends one.
    ``resume=False`` reuses nothing: every file is treated as another evaluation's."""

    def __init__(
        self,
        base: str | os.PathLike,
        key: str,
        *,
        rank: int = 0,
        num_examples: int,
        what: str = "",
        warn: Callable[[str], None] | None = None,
        resume: bool = True,
    ):
        self.base, self.key, self.what, self.resume = Path(base), key, what, resume
        self._warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.disabled = False
        self.path = self.base.with_name(f"{self.base.name}.part{int(rank)}")
        self.rows: dict[int, tuple] = {}
        self.foreign: list[Path] = []  # partial files of another evaluation (not reused)
        for p in part_files(self.base):
            got = _read(p, key, num_examples) if resume else None
            if got is None:
                self.foreign.append(p)
            else:
                self.rows.update(got)
        self.reused = 0
        self._file: IO[str] | None = None

    def get(self, index: int) -> tuple | None:
        row = self.rows.get(int(index))
        if row is not None:
            self.reused += 1
        return row

    def _open(self) -> IO[str]:
        own = _read(self.path, self.key, 1 << 62) if self.resume else None
        if own is None:  # absent, of another evaluation, or not to be resumed: start it afresh
            tmp = self.path.with_name(f".tmp-{self.path.name}")
            try:
                tmp.write_text(
                    json.dumps({"schema": SCHEMA, "version": VERSION, "key": self.key, "what": self.what}) + "\n"
                )
                os.replace(tmp, self.path)
            finally:
                tmp.unlink(missing_ok=True)
        f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held open while the evaluation runs
        if own is not None and self.path.stat().st_size and not self.path.read_bytes().endswith(b"\n"):
            f.write("\n")  # end a line cut short by a kill, so that the next row is a line of its own
        return f

    def put(self, index: int, row) -> None:
        """Keep one finished example (written and flushed before this returns). A file that cannot
        be written (read-only folder, full disk) costs the resumability only: one warning, and the
        evaluation goes on without it."""
        row = [row[0], row[1], float(row[2]), int(row[3]), int(row[4])]
        self.rows[int(index)] = tuple(row)
        if self.disabled:
            return
        try:
            if self._file is None:
                self._file = self._open()
            self._file.write(json.dumps({"index": int(index), "row": row}, allow_nan=False) + "\n")
            self._file.flush()
        except OSError as exc:
            self.disabled = True
            self.close()
            self._warn(
                f"warning: cannot keep finished examples in {self.path} ({exc.strerror or exc}); the evaluation "
                "goes on, but an interrupted run will not resume them"
            )

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def __enter__(self) -> PartialResults:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def remove_all(self) -> None:
        """Remove every rank's partial file of ``base`` (after the complete results are written)."""
        self.close()
        for p in part_files(self.base):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
