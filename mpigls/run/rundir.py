"""The output directory of a run: check it, decide resume / fresh start / refusal, never lose a file.

Policy (rank 0 only; ``train`` broadcasts the outcome):

* ``--out`` must name a directory: not "", not an existing file, not a path under a file, and
  writable (probed with a temp file before any training, not discovered at the first save).
* Checkpoints there (``latest.h5``, ``ckpt_*.h5``) are tried newest first (``checkpoint.load``,
  checksum included). The newest loadable one is resumed. Files that do not load
  (newer or older) are moved into ``DIR/aside-<UTC time>/`` with a warning, so that neither retention
  (``keep_last``) nor a later save of the same generation can delete or overwrite them.
* When checkpoints exist but **none** loads (another format version, truncated, checksum
  mismatch, a foreign HDF5 file), the run is refused (``RunDirError``, exit 2) with each file and
  why it failed; nothing is changed. ``restart=True`` (``mpigls train --restart``) moves every run
  file (``RUN_FILES``) into ``DIR/aside-<UTC time>/`` and starts from generation 0. Nothing here
  ever deletes a checkpoint.
* ``train`` calls all this under the run-directory lock (mpigls.run.runlock): a second ``train`` on a
  running directory is refused before it reads, cleans or truncates anything.
* A run file (``RUN_FILES``) that is a symlink to a file outside the directory (a ``latest.h5``
  pointing into another run, say) is refused (``RunDirError``) by everything that reads a run
  directory: resuming it would continue, and append to, the other run. Links within the
  directory are followed.

Outputs (``refuse_output``): every option that names a file a command writes is checked before
anything is computed; it may not be a checkpoint (by name or by content: an HDF5 file), a file
a run or a study keeps in its directory (``OWN_FILES``), a non-regular file, or an input of the
same command (the same file, through any link).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import re
import stat
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpigls import files
from mpigls.config import short_repr, short_text
from mpigls.run import checkpoint

__all__ = [
    "RunDirError",
    "RUN_FILES",
    "ASIDE_PREFIX",
    "out_path",
    "Scan",
    "scan",
    "make_dir",
    "prepare",
    "describe",
    "move_aside",
    "candidates",
    "find_latest",
    "load_latest",
    "clean_stale_temps",
    "write_json",
    "OWN_FILES",
    "refuse_output",
]

log = logging.getLogger("mpigls.run.rundir")

ASIDE_PREFIX = "aside-"
# the files a run writes into --out: what --restart moves aside (never deletes)
RUN_FILES = re.compile(r"^(ckpt_\d{8,}\.h5|latest\.h5|eval\.json|certify_\d{8,}\.json|metrics.*)$")
# every file a run or a study keeps in its directory: no output option may name one (``refuse_output``);
# the lock names are runlock.LOCK_NAME and the study runner's LOCK_FILE / LOG_FILE / CONFIG_FILE
OWN_FILES = re.compile(
    r"^(ckpt_\d{8,}\.h5|latest\.h5|eval\.json|certify_\d{8,}\.json|metrics.*\.jsonl|config\.yaml|mpigls\.lock"
    r"|study\.lock|study\.log|.*\.h5|.*\.hdf5)$"
)
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


class RunDirError(ValueError):
    """--out cannot be used as it is (a user error: one paragraph, exit code 2)."""


def out_path(out: str | os.PathLike) -> Path:
    """``--out`` as a Path, refusing "" (which would silently mean the current directory)."""
    if str(out).strip() == "":
        raise RunDirError("--out is empty; name the output directory of the run, e.g. --out runs/quick")
    return Path(out)


def _check_path(d: Path) -> Path:
    """Refuse an existing non-directory or a path under a file; returns the nearest existing ancestor."""
    if d.exists() and not d.is_dir():
        raise RunDirError(
            f"--out {short_repr(str(d), 200)} exists and is a file, not a directory; pass a directory "
            "(it is created if missing), e.g. --out runs/quick"
        )
    probe = d
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise RunDirError(
            f"--out {short_repr(str(d), 200)} cannot be created: {str(probe)!r} is a file, not a "
            "directory; choose a path that is not inside a file"
        )
    return probe


def _check_writable(d: Path, what: str) -> None:
    try:
        fd, name = tempfile.mkstemp(prefix=f"{checkpoint.TEMP_PREFIX}probe-", suffix=".json", dir=d)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise RunDirError(
            f"{what} {str(d)!r} is not writable ({exc.strerror or exc}); training would fail at its "
            "first checkpoint. Fix the permissions or pass another --out directory"
        ) from None


@dataclass(frozen=True)
class Scan:
    """What a run directory holds: the newest loadable checkpoint (or None) and the failures."""

    path: Path | None = None
    ckpt: checkpoint.Checkpoint | None = None
    failed: list[tuple[Path, str]] = field(default_factory=list)  # the files that did not load, and why
    candidates: int = 0


def _reason(p: Path, exc: BaseException) -> str:
    """``name: why`` in one line (whole, unless unboundedly long)."""
    msg = " ".join(str(exc).replace(str(p), p.name).split())
    if not msg.startswith(p.name):
        msg = f"{p.name}: {msg}"
    return short_text(msg)


def scan(d: Path) -> Scan:
    """Try ``latest.h5`` and ``ckpt_*.h5`` newest first; stop at the first that loads."""
    if not d.is_dir():
        return Scan()
    found = candidates(d)
    failed: list[tuple[Path, str]] = []
    chosen: tuple[Path, checkpoint.Checkpoint] | None = None
    # every file is read, the older ones too: retention (keep_last) would otherwise delete an
    # unreadable one, and an unreadable latest.h5 (sorted last: its generation is unknown) would be
    # replaced by the next save
    for p in found:
        try:
            ckpt = checkpoint.load(p)
        except (OSError, ValueError) as exc:
            failed.append((p, _reason(p, exc)))
            continue
        if chosen is None:
            chosen = (p, ckpt)
    if chosen is None:
        return Scan(None, None, failed, len(found))
    return Scan(chosen[0], chosen[1], failed, len(found))


def _aside_dir(d: Path) -> Path:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for i in range(1000):
        target = d / f"{ASIDE_PREFIX}{stamp}{'' if i == 0 else f'-{i}'}"
        try:
            target.mkdir()
            return target
        except FileExistsError:
            continue
    raise RunDirError(f"cannot create an {ASIDE_PREFIX}* directory in {d}")


def move_aside(d: Path, paths: list[Path]) -> Path | None:
    """Rename ``paths`` (files inside ``d``) into a new ``d/aside-<UTC time>/``; returns it (None if none)."""
    if not paths:
        return None
    target = _aside_dir(d)
    for p in paths:
        os.replace(p, target / p.name)  # same directory tree: an atomic rename, never a copy + delete
    checkpoint.fsync_path(d, directory=True)
    return target


def _refusal(d: Path, sc: Scan) -> RunDirError:
    files = "; ".join(why for _, why in sc.failed)
    return RunDirError(
        f"--out {str(d)!r} holds {len(sc.failed)} checkpoint file(s) of an earlier run and none of them can be "
        f"resumed ({files}). Nothing was changed. To continue that run, use the mpigls version that wrote it or "
        f"restore an intact copy; to start a new run, pass another --out directory, or add --restart to move the "
        f"old files into {d / (ASIDE_PREFIX + '<UTC time>')}/ (nothing is deleted) and start from generation 0"
    )


def make_dir(out: str | os.PathLike) -> Path:
    """Check ``--out``, create it if missing and probe that it is writable (rank 0; before the run lock)."""
    d = out_path(out)
    _check_path(d)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(
            f"cannot create the output directory {str(d)!r} ({exc.strerror or exc}); pass another --out directory"
        ) from None
    _check_writable(d, "the output directory")
    return d


def prepare(
    out: str | os.PathLike, *, restart: bool = False, say: Callable[[str], None] = print
) -> checkpoint.Checkpoint | None:
    """Make ``out`` ready for a run and return the checkpoint to resume from (None: start fresh).
    Rank 0 only. Raises RunDirError for every user error (see the module docstring)."""
    d = make_dir(out)
    clean_stale_temps(d)
    if restart:
        old = sorted(p for p in d.iterdir() if RUN_FILES.match(p.name) and (p.is_file() or p.is_symlink()))
        target = move_aside(d, old)
        if target is not None:
            say(f"--restart: moved {len(old)} file(s) of the earlier run into {target}/; starting from generation 0")
        return None
    check_links(d)  # every run file, metrics.jsonl too (a resume appends to it)
    sc = scan(d)
    if sc.ckpt is None:
        if sc.failed:
            raise _refusal(d, sc)
        return None
    assert sc.path is not None  # scan sets path together with ckpt
    if sc.failed:
        target = move_aside(d, [p for p, _ in sc.failed])
        say(
            "warning: "
            + "; ".join(why for _, why in sc.failed)
            + f". These {len(sc.failed)} unreadable checkpoint file(s) were moved into {target}/ (not deleted); "
            f"resuming from {sc.path.name} (generation {sc.ckpt.generation})"
        )
    return sc.ckpt


def describe(out: str | os.PathLike, *, restart: bool = False) -> str:
    """What ``prepare`` would do, without changing anything (for ``train --dry-run``); raises the same
    RunDirError for an unusable directory."""
    d = out_path(out)
    probe = _check_path(d)
    _check_writable(probe, "the output directory" if probe == d else "the directory that would hold --out,")
    if not d.is_dir():
        return f"a new run in {d}"
    if restart:
        old = [p for p in d.iterdir() if RUN_FILES.match(p.name) and p.is_file()]
        return f"a new run in {d} after moving {len(old)} earlier file(s) aside"
    sc = scan(d)
    if sc.ckpt is None:
        if sc.failed:
            raise _refusal(d, sc)
        return f"a new run in {d}"
    extra = f" ({len(sc.failed)} newer unreadable file(s) would be moved aside)" if sc.failed else ""
    return f"resume {d} from generation {sc.ckpt.generation}{extra}"


# ----------------------------------------------------------------------------- files of a run directory


def json_safe(obj):
    """``obj`` with NaN and +-inf floats replaced by None (JSON has no NaN; ``json`` would print bare NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy scalars
        return json_safe(obj.item())
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (temp file, fsync, ``os.replace``). One rank only.

    Strict JSON: a NaN or infinity in ``obj`` (which ``json`` would write as a bare ``NaN`` that
    JSON readers refuse) raises RuntimeError before anything is written; pass ``json_safe(obj)``
    where a value may legitimately be missing (it becomes null)."""
    path = Path(path)
    try:
        text = json.dumps(obj, indent=2, default=str, allow_nan=False) + "\n"
    except ValueError as exc:
        raise RuntimeError(f"{path} was not written: its data hold a non-finite number ({exc})") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{checkpoint.TEMP_PREFIX}{path.stem}-", suffix=".json", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~checkpoint.umask())
        os.replace(tmp, path)
        checkpoint.fsync_path(path.parent, directory=True)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def clean_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Remove ``.tmp-*.h5`` / ``.tmp-*.json`` left by an interrupted save; returns what was removed. Call at start
    on rank 0 only, before any save, holding the run-directory lock (another job may be mid-write otherwise)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    removed = []
    for p in d.iterdir():
        if p.name.startswith(checkpoint.TEMP_PREFIX) and p.name.endswith((".h5", ".json")):
            p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        log.info("removed %d stale temp file(s) in %s", len(removed), d)
    return removed


def check_links(d: Path) -> None:
    """Refuse a run file of ``d`` that is a symlink to a file outside ``d`` (module docstring), and a
    metrics log or evaluation file that is not a regular file (a FIFO would block the run's first write;
    a checkpoint that is not one is set aside by ``scan`` like any unreadable checkpoint)."""
    if not d.is_dir():
        return
    home = d.resolve()
    for p in sorted(d.iterdir()):
        if RUN_FILES.match(p.name) and not checkpoint.CKPT_RE.match(p.name) and p.name != checkpoint.LATEST:
            try:
                mode = os.stat(p).st_mode  # never blocks
            except OSError:
                mode = None  # a dangling link: refused below if it points outside, else written as a new file
            if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # a directory fails at once
                raise RunDirError(
                    f"the run file {str(p)!r} is {files.kind_of(mode)}, not a regular file; opening it would block "
                    "or never end. Nothing was changed; move it away (mpigls writes regular files there)"
                )
        if RUN_FILES.match(p.name) and p.is_symlink():
            target = p.resolve()
            if target.parent != home:
                raise RunDirError(
                    f"{p} is a symlink to {str(target)!r}, outside the run directory {str(d)!r}; resuming or "
                    "reading it would continue (and write into) another run. Nothing was changed. Replace the "
                    f"link by a copy of the file (cp --remove-destination {str(target)!r} {str(p)!r}) or "
                    "start the run in its own directory"
                )


def candidates(d: Path) -> list[Path]:
    """latest.h5 and ckpt_*.h5, newest generation first; latest.h5 first among equals. A run file that
    links outside ``d`` is refused (``check_links``)."""
    check_links(d)
    candidates: list[tuple[int, int, Path]] = []
    latest = d / checkpoint.LATEST
    if latest.exists():
        g = checkpoint.generation_of(latest)
        candidates.append((g if g is not None else -1, 1, latest))
    candidates += [(g, 0, p) for g, p in checkpoint.list_checkpoints(d)]
    return [p for _, _, p in sorted(candidates, key=lambda c: (c[0], c[1]), reverse=True)]


def find_latest(directory: str | os.PathLike) -> Path | None:
    """The newest *loadable* checkpoint in directory, or None when there is none.

    Candidates are ``latest.h5`` and every ``ckpt_*.h5``, newest generation first (``latest.h5``
    wins a tie); each is fully loaded (checksum included) until one succeeds, warning about every
    unreadable file skipped. A crash between writing ``ckpt_G`` and relinking ``latest.h5`` is
    therefore resumed from G."""
    found = _first_loadable(Path(directory))
    return found[0] if found else None


def load_latest(directory: str | os.PathLike) -> checkpoint.Checkpoint | None:
    """``load(find_latest(directory))`` without reading the chosen file twice; None if none."""
    found = _first_loadable(Path(directory))
    return found[1] if found else None


def _first_loadable(d: Path) -> tuple[Path, checkpoint.Checkpoint] | None:
    """The first of ``candidates(d)`` that loads, warning about every unreadable one skipped."""
    if not d.is_dir():
        return None
    for p in candidates(d):
        try:
            return p, checkpoint.load(p)
        except (OSError, ValueError) as exc:
            warnings.warn(f"skipping unreadable checkpoint: {exc}", RuntimeWarning, stacklevel=3)
    return None


# ----------------------------------------------------------------------------- output options


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist (yet): compare where they would be
        return a.resolve() == b.resolve()


def _looks_hdf5(p: Path) -> bool:
    """A regular file that starts with the HDF5 signature (read after ``stat``: never a FIFO)."""
    try:
        with open(p, "rb") as fh:
            return fh.read(8) == _HDF5_SIGNATURE
    except OSError:
        return False


def refuse_output(path: str | os.PathLike, option: str, *, inputs: tuple[str | os.PathLike, ...] | list = ()) -> Path:
    """``path`` (an output option's value, e.g. ``report --out``) as a Path, or RunDirError when writing it
    would destroy a checkpoint, a run's or a study's own file, or an input of the same command
    (``inputs``, compared as files through any link). Call before computing anything. A directory
    passes (the caller names the file inside it)."""
    if str(path).strip() == "":
        raise RunDirError(f"{option} is empty; name the file to write")
    p = Path(path)
    names = f"{option} {short_repr(str(p), 200)}"
    try:
        st = os.stat(p)
    except OSError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        return p
    for q in (p, p.resolve()):
        if OWN_FILES.match(q.name):
            raise RunDirError(
                f"{names} names {q.name!r}, a file that runs and studies keep in their directory (a checkpoint, "
                "metrics, config, lock or evaluation); writing it would replace that file. Nothing was written; "
                "name another output file"
            )
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise RunDirError(
            f"{names} exists and is {files.kind_of(st.st_mode)}, not a regular file; writing it could block or "
            "replace it. Nothing was written; name a regular file or a new path"
        )
    if st is not None and _looks_hdf5(p):
        raise RunDirError(
            f"{names} is an HDF5 file (an mpigls checkpoint or another program's data); writing it would destroy "
            "it. Nothing was written; name another output file"
        )
    for given in inputs:
        if given is not None and str(given).strip() and _same_file(p, Path(given)):
            raise RunDirError(
                f"{names} is the same file as this command's input {short_repr(str(given), 200)}; writing it "
                "would replace what the command reads. Nothing was written; name another output file"
            )
    return p
