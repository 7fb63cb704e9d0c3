"""HDF5 checkpoints: the schema, atomic writes, validated reads, migration. The only h5py user.

File layout (``FORMAT_VERSION`` 2; names are the module constants below)::

    /                 attrs: schema="mpigls-checkpoint", format_version, noise_scheme, generation,
                             epoch, batch_in_epoch, num_params, world_size, created (UTC ISO 8601),
                             host, mpigls_version, state_sha256, config_sha256
    /theta            (D,) <f4   θ: the centre of the search distribution / the network parameters
    /sigma            (D,) <f4   per-parameter std (absent when the optimizer has none)
    /optimizer/       the REST of the optimizer state (never θ, σ or the generation again): one
                      dataset per array entry, scalars as attrs (e.g. step/t, step/m, step/v, step/velocity)
    /extra/           same layout, free for other state (e.g. certification results)
    /config           scalar UTF-8 string: the fully resolved config as JSON
    /arch             scalar UTF-8 string: the architecture dict as JSON
    /metrics/<key>    (n,) history of one metric (<f8 from training), written whole at every save (the dataset
                      name is the percent-quoted key, attr "key" holds the key itself)

θ, σ and the generation are stored once; the loop splits and joins the optimizer's state
(``optim.unit.split_state`` / ``join_state``). ``epoch`` and ``batch_in_epoch`` are the data
position of ``generation`` when it was written (informational for ``mpigls inspect``; a resume
recomputes them from the config and warns when they differ, i.e. the batch size or the training
set changed). ``state_sha256`` covers generation/epoch/batch position, θ, σ and the optimizer
state (dtype, shape and little-endian bytes of each entry, in sorted key order) and is verified
on load, before any migration. ``config_sha256`` covers the stored ``/config`` and ``/arch`` strings
as written (a certificate at an edited ``eps`` must not pass for the run's). Every format-2 file is
written with it, so a format-2 file without it is refused as edited or damaged; format-1 files
(written before it existed) are read without that check (the next save of a resumed run adds it).
The checksums detect tampering and damage; they do not prevent it (anyone who can write the file
can recompute them). A checkpoint path must be a regular file (``mpigls.files.input_file``): a FIFO
or device is refused before anything opens it.

Format 1 (mpigls up to commit 027d07e) also stored θ, σ and the generation inside /optimizer
(``center``, ``sigma``, ``generation``) and created the metrics datasets extendable.
It also kept ClipUp's velocity in Adam's ``step/m`` slot. ``MIGRATIONS[1]`` reads such a file: it
checks that the two copies agree bit for bit, drops the inner one and moves the velocity to
``step/velocity`` (tests/golden/format1_*.h5 are files written by the old code).

Atomicity (``save``; call on one rank only — rank 0): the file is written as ``.tmp-*.h5`` in the
target directory, flushed, fsync'ed and renamed (``os.replace``) to ``ckpt_{generation:08d}.h5``;
the directory is fsync'ed. ``latest.h5`` is then a *copy* of that file (fsync'ed), made under a temp
name and renamed over ``latest.h5``. rename() within one directory is atomic on POSIX file systems
including NFS and Lustre, so at every instant ``latest.h5`` is either the previous or the new
complete checkpoint. A copy, not a hard link: a damaged block of one file leaves the other intact
(the resume then falls back to it), and it stays readable when ``ckpt_*`` files are pruned (a
symlink could dangle). A kill at any moment leaves at worst a ``.tmp-*.h5`` file, which
``rundir.clean_stale_temps`` removes at the next start. HDF5 file locking is disabled (``locking=False``)
because files are never modified in place and flock is often unavailable on Lustre/NFS.
The policy of a run directory (which file to resume, refuse, move aside, stale temp files) and
the atomic JSON writer live in mpigls.run.rundir.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mpigls import files

__all__ = [
    "FORMAT_VERSION",
    "SCHEMA",
    "LATEST",
    "TEMP_PREFIX",
    "MIGRATIONS",
    "DS_THETA",
    "DS_SIGMA",
    "GRP_OPTIMIZER",
    "GRP_EXTRA",
    "DS_CONFIG",
    "DS_ARCH",
    "GRP_METRICS",
    "Checkpoint",
    "CheckpointError",
    "CheckpointWriteError",
    "save",
    "load",
    "list_checkpoints",
    "generation_of",
    "summary",
    "check_compatible",
    "theta_sha256",
    "state_sha256",
    "checkpoint_path",
    "fsync_path",
    "umask",
]

log = logging.getLogger("mpigls.run.checkpoint")

FORMAT_VERSION = 2
SCHEMA = "mpigls-checkpoint"
LATEST = "latest.h5"
TEMP_PREFIX = ".tmp-"
CKPT_RE = re.compile(r"^ckpt_(\d{8,})\.h5$")

DS_THETA = "theta"
DS_SIGMA = "sigma"
GRP_OPTIMIZER = "optimizer"
GRP_EXTRA = "extra"
DS_CONFIG = "config"
DS_ARCH = "arch"
GRP_METRICS = "metrics"
_REQUIRED_ATTRS = ("format_version", "noise_scheme", "generation", "epoch", "batch_in_epoch", "state_sha256")

Scalar = int | float | bool | str
StateDict = dict[str, "np.ndarray | Scalar"]

# MIGRATIONS[v] turns the raw content dict of a format-v file into that of format v+1 (see
# ``_read_raw`` for its keys); filled in below the reading functions.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}
# the state entries format 1 stored twice (inside /optimizer and at the top level)
_FORMAT1_COPIES = ("center", "sigma", "generation")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (corrupt, truncated, wrong version or architecture)."""


@dataclass
class Checkpoint:
    """Everything that must survive a restart. Arrays are numpy; θ and σ are float32 (D,)."""

    generation: int
    epoch: int
    batch_in_epoch: int
    theta: np.ndarray
    sigma: np.ndarray | None
    opt_state: StateDict
    config: dict
    arch: dict
    metrics: dict[str, np.ndarray] = field(default_factory=dict)
    noise_scheme: str = ""
    extra: StateDict = field(default_factory=dict)
    world_size: int = 1
    created: str = ""  # filled by load(); save() records the current time
    host: str = ""  # filled by load(); save() records the writing host
    mpigls_version: str = ""  # filled by load(); save() records mpigls.__version__
    format_version: int = FORMAT_VERSION  # filled by load(): the file's version (older ones were migrated)


# ----------------------------------------------------------------------------- hashing


def theta_sha256(theta: np.ndarray) -> str:
    """sha256 hex digest of θ as little-endian float32 bytes (what ``mpigls inspect`` prints)."""
    return hashlib.sha256(np.ascontiguousarray(theta, dtype="<f4").tobytes()).hexdigest()


def _hash_entry(h: Any, key: str, value: Any) -> None:
    h.update(key.encode() + b"\0")
    if isinstance(value, np.ndarray):
        a = np.ascontiguousarray(value)
        a = a.astype(a.dtype.newbyteorder("<"), copy=False) if a.dtype.byteorder == ">" else a
        h.update(f"{a.dtype.str}{a.shape}".encode() + a.tobytes())
    else:
        h.update(f"{type(value).__name__}:{value!r}".encode())


def state_sha256(ckpt: Checkpoint) -> str:
    """Checksum over the resumable state (see module docstring)."""
    h = hashlib.sha256()
    for k in ("generation", "epoch", "batch_in_epoch"):
        _hash_entry(h, k, int(getattr(ckpt, k)))
    _hash_entry(h, DS_THETA, np.asarray(ckpt.theta, dtype=np.float32))
    _hash_entry(h, DS_SIGMA, None if ckpt.sigma is None else np.asarray(ckpt.sigma, dtype=np.float32))
    for k in sorted(ckpt.opt_state):
        _hash_entry(h, f"{GRP_OPTIMIZER}/{k}", ckpt.opt_state[k])
    return h.hexdigest()


# ----------------------------------------------------------------------------- validation


def _normalise(ckpt: Checkpoint) -> Checkpoint:
    """Check types (user errors) and coerce θ/σ to float32, opt_state values to ndarray/scalar."""
    for k in ("generation", "epoch", "batch_in_epoch", "world_size"):
        v = getattr(ckpt, k)
        if isinstance(v, (bool, float)) or int(v) != v or int(v) < 0:
            raise ValueError(f"Checkpoint.{k} must be an integer >= 0, got {v!r}")
    theta = np.asarray(ckpt.theta)
    if theta.ndim != 1 or not np.issubdtype(theta.dtype, np.floating):
        raise ValueError(f"Checkpoint.theta must be a 1-D float array, got {theta.dtype} {theta.shape}")
    sigma = None if ckpt.sigma is None else np.asarray(ckpt.sigma)
    if sigma is not None and sigma.shape != theta.shape:
        raise ValueError(f"Checkpoint.sigma must have θ's shape {theta.shape} (or be None), got {sigma.shape}")
    return Checkpoint(
        generation=int(ckpt.generation),
        epoch=int(ckpt.epoch),
        batch_in_epoch=int(ckpt.batch_in_epoch),
        theta=theta.astype(np.float32, copy=False),
        sigma=None if sigma is None else sigma.astype(np.float32, copy=False),
        opt_state=_check_state("opt_state", ckpt.opt_state),
        config=dict(ckpt.config),
        arch=dict(ckpt.arch),
        metrics={str(k): np.asarray(v).reshape(-1) for k, v in ckpt.metrics.items()},
        noise_scheme=str(ckpt.noise_scheme),
        extra=_check_state("extra", ckpt.extra),
        world_size=int(ckpt.world_size),
        created=ckpt.created,
        host=ckpt.host,
        format_version=ckpt.format_version,
    )


def _check_state(name: str, d: Mapping[str, Any]) -> StateDict:
    out: StateDict = {}
    for k, v in d.items():
        if not isinstance(k, str) or not k:
            raise TypeError(f"Checkpoint.{name} keys must be non-empty strings, got {k!r}")
        if isinstance(v, (np.ndarray, np.generic)) and not isinstance(v, np.ndarray):
            v = v.item()
        if isinstance(v, (bool, int, float, str)):
            out[k] = v
        elif isinstance(v, np.ndarray) and v.dtype.kind in "biuf":
            out[k] = v
        elif hasattr(v, "detach") and hasattr(v, "cpu"):  # a torch tensor; converted without importing torch
            out[k] = v.detach().cpu().numpy()
        else:
            raise TypeError(
                f"Checkpoint.{name}[{k!r}] must be a numeric numpy array, int, float, bool "
                f"or str, got {type(v).__name__}; convert it (state_to_dict) before saving"
            )
    bad = [k for k in _FORMAT1_COPIES if k in out] if name == "opt_state" else []
    if bad:
        raise ValueError(
            f"Checkpoint.opt_state must not hold {bad}: θ, σ and the generation are stored once, "
            "as Checkpoint.theta / sigma / generation (optim.unit.split_state)"
        )
    return out


# ----------------------------------------------------------------------------- writing


def checkpoint_path(directory: str | os.PathLike, generation: int) -> Path:
    return Path(directory) / f"ckpt_{int(generation):08d}.h5"


def _quote(key: str) -> str:
    return urllib.parse.quote(key, safe="")


def _write_state(group: h5py.Group, d: StateDict) -> None:
    for k, v in d.items():
        if isinstance(v, np.ndarray):
            group.create_dataset(_quote(k), data=v).attrs["key"] = k
        else:
            group.attrs[k] = v


def fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _package_version() -> str:
    import mpigls  # the one place the version is written (pyproject reads it too)

    return mpigls.__version__


def _write_file(path: Path, ckpt: Checkpoint) -> None:
    with h5py.File(path, "w", locking=False) as f:
        a = f.attrs
        a["schema"] = SCHEMA
        a["format_version"] = FORMAT_VERSION
        a["noise_scheme"] = ckpt.noise_scheme
        a["generation"] = ckpt.generation
        a["epoch"] = ckpt.epoch
        a["batch_in_epoch"] = ckpt.batch_in_epoch
        a["num_params"] = ckpt.theta.shape[0]
        a["world_size"] = ckpt.world_size
        a["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        a["host"] = socket.gethostname()
        a["mpigls_version"] = _package_version()
        a["state_sha256"] = state_sha256(ckpt)
        config_text = json.dumps(ckpt.config, default=str)
        arch_text = json.dumps(ckpt.arch, default=str)
        a["config_sha256"] = _config_sha256(config_text, arch_text)
        f.create_dataset(DS_THETA, data=ckpt.theta)
        if ckpt.sigma is not None:
            f.create_dataset(DS_SIGMA, data=ckpt.sigma)
        _write_state(f.create_group(GRP_OPTIMIZER), ckpt.opt_state)
        _write_state(f.create_group(GRP_EXTRA), ckpt.extra)
        f.create_dataset(DS_CONFIG, data=config_text)
        f.create_dataset(DS_ARCH, data=arch_text)
        mg = f.create_group(GRP_METRICS)
        for k, v in ckpt.metrics.items():  # the whole history, rewritten at every save (one file per save)
            mg.create_dataset(_quote(k), data=v).attrs["key"] = k
        f.flush()
    fsync_path(path)


def _config_sha256(config_text: str, arch_text: str) -> str:
    """``config_sha256``: the stored config and architecture strings, exactly as written."""
    return hashlib.sha256(config_text.encode() + b"\0" + arch_text.encode()).hexdigest()


def _copy(src: Path, dst_tmp: Path) -> None:
    shutil.copyfile(src, dst_tmp)
    os.chmod(dst_tmp, 0o666 & ~umask())  # mkstemp made it 0600; checkpoints are shared like other outputs
    fsync_path(dst_tmp)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save(directory: str | os.PathLike, ckpt: Checkpoint, keep_last: int | None = 3) -> Path:
    """Write ``DIR/ckpt_{generation:08d}.h5`` atomically, point ``DIR/latest.h5`` at it and keep
    the newest ``keep_last`` ckpt files (None keeps all). Returns the new file's path. Call on one
    rank only (no collectives inside)."""
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be a positive integer or None, got {keep_last!r}")
    ckpt = _normalise(ckpt)
    d = Path(directory)
    final = checkpoint_path(d, ckpt.generation)
    tmp, link_tmp = None, None
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{final.stem}-", suffix=".h5", dir=d)
        os.close(fd)
        tmp = Path(tmp_name)
        os.chmod(tmp_name, 0o666 & ~umask())  # mkstemp makes 0600; checkpoints are shared like other outputs
        _write_file(tmp, ckpt)
        os.replace(tmp, final)
        fsync_path(d, directory=True)
        fd, link_name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}latest-", suffix=".h5", dir=d)
        os.close(fd)
        link_tmp = Path(link_name)
        _copy(final, link_tmp)
        os.replace(link_tmp, d / LATEST)
        fsync_path(d, directory=True)
    except (OSError, RuntimeError) as exc:  # h5py reports a failed flush / close (disk full) as RuntimeError
        raise CheckpointWriteError(_write_failure(d, final, exc)) from exc
    finally:
        for p in (tmp, link_tmp):
            if p is not None:
                with contextlib.suppress(OSError):
                    p.unlink(missing_ok=True)
    if keep_last is not None:
        # never a file newer than the one just written: it belongs to another (later) run
        for g, old in list_checkpoints(d)[:-keep_last]:
            if old != final and g < ckpt.generation:
                old.unlink(missing_ok=True)
    return final


class CheckpointWriteError(ValueError):
    """A checkpoint could not be written (disk full, quota, permissions); the previous one is intact."""


def _write_failure(d: Path, final: Path, exc: OSError | RuntimeError) -> str:
    code = getattr(exc, "errno", None)
    reason = os.strerror(code) if isinstance(code, int) and code else " ".join(str(exc).split())
    m = re.search(r"errno = (\d+)", str(exc))  # h5py reports the OS error inside its message
    if m and not (isinstance(code, int) and code):
        reason = f"{os.strerror(int(m.group(1)))} ({reason[:200]})"
    return (
        f"could not write checkpoint {final.name} in {d}: {reason}. The previous checkpoint "
        f"({LATEST}, if any) is intact and no partial file was left; free disk space or fix the "
        "permissions, then run the same command to resume from it"
    )


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """(generation, path) of every ``ckpt_*.h5`` in directory, oldest first (names only, unread)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = CKPT_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


# ----------------------------------------------------------------------------- reading


def _read_state(group: h5py.Group) -> StateDict:
    out: StateDict = {}
    for k, v in group.attrs.items():
        value = v.item() if isinstance(v, np.generic) else v
        out[k] = value.decode() if isinstance(value, bytes) else value
    for name, ds in group.items():
        out[str(ds.attrs.get("key", urllib.parse.unquote(name)))] = np.array(ds[()])
    return out


def _str_ds(f: h5py.File, name: str) -> str:
    v = f[name][()]
    return v.decode() if isinstance(v, bytes) else str(v)


def _check_self_contained(group: h5py.Group, path: Path) -> None:
    """Refuse soft / external links and datasets stored outside the file (external raw storage, virtual
    datasets) before any is read: a checkpoint is one file, and reading such an object would open
    another file (which may be a FIFO that never answers, or another run's data)."""
    for name in group:
        link = group.get(name, getlink=True)
        where = f"{group.name.rstrip('/')}/{name}"
        if not isinstance(link, h5py.HardLink):
            raise CheckpointError(
                f"{path}: {where} is a {type(link).__name__}, not data inside the file; mpigls checkpoints are "
                "self-contained, so this file was edited or written by another program; use a checkpoint from a run"
            )
        obj = group[name]
        if isinstance(obj, h5py.Dataset) and (obj.external or obj.is_virtual):
            raise CheckpointError(
                f"{path}: the dataset {where} keeps its data outside the file (external or virtual storage); "
                "mpigls checkpoints are self-contained, so this file was edited or written by another program"
            )
        if isinstance(obj, h5py.Group):
            _check_self_contained(obj, path)


def _read_raw(f: h5py.File) -> dict[str, Any]:
    """All content as plain Python / numpy (the input of MIGRATIONS)."""
    raw: dict[str, Any] = {"attrs": {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}}
    raw["theta"] = np.array(f[DS_THETA][()])
    raw["sigma"] = np.array(f[DS_SIGMA][()]) if DS_SIGMA in f else None
    raw["opt_state"] = _read_state(f[GRP_OPTIMIZER])
    raw["extra"] = _read_state(f[GRP_EXTRA]) if GRP_EXTRA in f else {}
    config_text, arch_text = _str_ds(f, DS_CONFIG), _str_ds(f, DS_ARCH)
    raw["config_sha256"] = _config_sha256(config_text, arch_text)
    raw["config"] = json.loads(config_text)
    raw["arch"] = json.loads(arch_text)
    raw["metrics"] = {
        str(ds.attrs.get("key", urllib.parse.unquote(n))): np.array(ds[()]) for n, ds in f[GRP_METRICS].items()
    }
    return raw


def _open(path: Path) -> h5py.File:
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint file not found: {path}; give an existing .h5 file or an "
            "output directory that holds ckpt_*.h5 / latest.h5"
        )
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file; use {path / LATEST}")
    try:  # before any open: a FIFO or a device would block it
        files.input_file(path, "checkpoint", advice="give an mpigls checkpoint (.h5) written by `mpigls train`")
    except files.InputFileError as exc:
        raise CheckpointError(str(exc)) from None
    with open(path, "rb") as fh:
        head = fh.read(8)
    if not h5py.is_hdf5(str(path)):
        raise CheckpointError(
            f"{path} is not an HDF5 file (starts with {head!r}); mpigls checkpoints are "
            "HDF5 files written by `mpigls train`; check the path"
        )
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as exc:
        raise CheckpointError(
            f"{path} is an HDF5 file but cannot be opened ({' '.join(str(exc).split())}); it "
            "is probably truncated by a crash or an incomplete copy; use an older "
            "checkpoint (find_latest falls back automatically)"
        ) from exc


def _header(f: h5py.File, path: Path) -> dict[str, Any]:
    attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
    if attrs.get("schema") != SCHEMA:
        raise CheckpointError(
            f"{path} is an HDF5 file but not an mpigls checkpoint (schema attribute "
            f"{attrs.get('schema')!r}, expected {SCHEMA!r})"
        )
    version = attrs.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path} has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version}, but this mpigls reads "
            f"versions up to {FORMAT_VERSION}; upgrade mpigls to read it"
        )
    if version < FORMAT_VERSION and any(v not in MIGRATIONS for v in range(version, FORMAT_VERSION)):
        raise CheckpointError(
            f"{path} has checkpoint format version {version}, and no migration to the "
            f"current version {FORMAT_VERSION} exists; read it with the mpigls "
            "release that wrote it"
        )
    missing = [k for k in _REQUIRED_ATTRS if k not in attrs]
    if missing:
        raise CheckpointError(f"{path} lacks the attribute(s) {missing}; the file is incomplete or damaged")
    return attrs


def load(path: str | os.PathLike, *, verify: bool = True) -> Checkpoint:
    """Read and validate a checkpoint (schema, version, migration, checksum when ``verify``).

    Raises FileNotFoundError for a missing path and CheckpointError (a ValueError) with a
    one-paragraph explanation for anything else that makes the file unusable."""
    path = Path(path)
    f = _open(path)
    try:
        with f:
            attrs = _header(f, path)
            _check_self_contained(f, path)
            try:
                raw = _read_raw(f)
            except KeyError as exc:
                raise CheckpointError(
                    f"{path} lacks a required dataset or group ({exc}); the file is "
                    "incomplete or damaged; use an older checkpoint"
                ) from exc
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path} cannot be read ({' '.join(str(exc).split())}); it is probably "
            "truncated or corrupt; use an older checkpoint"
        ) from exc
    version = int(attrs["format_version"])
    if verify and _raw_sha256(raw) != raw["attrs"]["state_sha256"]:
        raise CheckpointError(
            f"{path}: the state checksum does not match (stored {raw['attrs']['state_sha256'][:16]}…, "
            f"computed {_raw_sha256(raw)[:16]}…); the file was modified or damaged; "
            "use an older checkpoint"
        )
    stored_config_sha = raw["attrs"].get("config_sha256")
    if verify and stored_config_sha is None and version >= 2:
        raise CheckpointError(
            f"{path} is a format-{version} checkpoint without its config checksum (config_sha256); every "
            "format-2 file is written with one, so this file was edited or damaged and its eps, model or data "
            "settings cannot be trusted; use an older checkpoint of the run"
        )
    if verify and stored_config_sha is not None and stored_config_sha != raw["config_sha256"]:
        raise CheckpointError(
            f"{path}: the stored config or architecture does not match its checksum (stored "
            f"{str(stored_config_sha)[:16]}…, computed {raw['config_sha256'][:16]}…); the file was edited or "
            "damaged, so its eps, model or data settings cannot be trusted; use an older checkpoint, or pass "
            "settings explicitly (certify --eps / --set) to a checkpoint that loads"
        )
    for v in range(version, FORMAT_VERSION):
        try:
            raw = MIGRATIONS[v](raw)
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{path}: cannot migrate checkpoint format {v} to {v + 1}: {exc}") from exc
    a = raw["attrs"]
    ckpt = Checkpoint(
        **_state_fields(raw),
        config=raw["config"],
        arch=raw["arch"],
        metrics=raw["metrics"],
        noise_scheme=str(a["noise_scheme"]),
        extra=raw["extra"],
        world_size=int(a.get("world_size", 1)),
        created=str(a.get("created", "")),
        host=str(a.get("host", "")),
        mpigls_version=str(a.get("mpigls_version", "")),
        format_version=version,
    )
    if ckpt.theta.dtype != np.float32 or ckpt.theta.ndim != 1:
        raise CheckpointError(f"{path}: theta must be float32 (D,), found {ckpt.theta.dtype} {ckpt.theta.shape}")
    return ckpt


def _state_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """The Checkpoint fields ``state_sha256`` covers, from a file's content as read."""
    a = raw["attrs"]
    return {
        "generation": int(a["generation"]),
        "epoch": int(a["epoch"]),
        "batch_in_epoch": int(a["batch_in_epoch"]),
        "theta": raw["theta"],
        "sigma": raw["sigma"],
        "opt_state": raw["opt_state"],
    }


def _raw_sha256(raw: dict[str, Any]) -> str:
    """``state_sha256`` of a file's content as read (any format: the recipe never changed)."""
    return state_sha256(Checkpoint(**_state_fields(raw), config={}, arch={}))


def _migrate_1_to_2(raw: dict[str, Any]) -> dict[str, Any]:
    """Format 1 -> 2: drop the second copy of θ, σ and the generation from the optimizer state,
    after checking that it agrees bit for bit with the stored one (nothing checked that before);
    ClipUp's velocity moves from ``step/m`` to its own ``step/velocity`` slot."""
    opt = dict(raw["opt_state"])
    a = raw["attrs"]
    center = opt.pop("center", None)
    if center is not None and not np.array_equal(np.asarray(center, dtype=np.float32), raw["theta"]):
        raise ValueError("its optimizer state's centre differs from /theta (the two copies of format 1 disagree)")
    sigma = opt.pop("sigma", None)
    if sigma is not None and (
        raw["sigma"] is None or not np.array_equal(np.asarray(sigma, dtype=np.float32), raw["sigma"])
    ):
        raise ValueError("its optimizer state's sigma differs from /sigma (the two copies of format 1 disagree)")
    generation = opt.pop("generation", None)
    if generation is not None and int(generation) != int(a["generation"]):
        raise ValueError(f"its optimizer state's generation {generation} differs from the file's {a['generation']}")
    if "step/m" in opt and "step/velocity" not in opt:  # format 1 kept ClipUp's velocity in Adam's slot
        m = np.asarray(opt["step/m"])
        config = raw["config"] if isinstance(raw["config"], dict) else {}
        clipup = config.get("optimizer", {}).get("step_rule") == "clipup"
        opt["step/m"], opt["step/velocity"] = (m[:0].copy(), m) if clipup else (m, m[:0].copy())
    return {**raw, "opt_state": opt, "attrs": {**a, "format_version": 2}}


MIGRATIONS[1] = _migrate_1_to_2


def generation_of(path: Path) -> int | None:
    """The generation in a checkpoint's header (None when it cannot be read); reads no arrays."""
    try:
        with _open(path) as f:
            return int(_header(f, path)["generation"])
    except (OSError, ValueError):
        return None


def check_compatible(
    ckpt: Checkpoint,
    arch: Mapping[str, Any],
    num_params: int | None = None,
    *,
    advice: str = "resume with the model settings it was trained with, or use a fresh --out "
    "directory (or --restart to move the earlier run aside)",
) -> None:
    """Raise ValueError if the checkpoint was written for another architecture than ``arch``."""
    want = json.loads(json.dumps(dict(arch), default=str))  # compare in the stored (JSON) form
    diffs = [
        f"{k}: checkpoint {ckpt.arch.get(k, '<missing>')!r} vs now {want.get(k, '<missing>')!r}"
        for k in sorted(set(want) | set(ckpt.arch))
        if ckpt.arch.get(k) != want.get(k)
    ]
    if num_params is not None and ckpt.theta.shape[0] != num_params:
        diffs.append(f"num_params: checkpoint {ckpt.theta.shape[0]} vs now {num_params}")
    if diffs:
        raise ValueError(
            "the checkpoint was written for a different architecture (" + "; ".join(diffs) + "); " + advice
        )


def summary(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON-able description of a checkpoint (what ``mpigls inspect --json`` prints)."""
    path = Path(path)
    c = load(path)
    version = c.format_version
    sig = (
        None
        if c.sigma is None
        else {"min": float(c.sigma.min()), "max": float(c.sigma.max()), "mean": float(c.sigma.mean())}
        if c.sigma.size
        else {}
    )
    last = {k: (v[-1].item() if v.size else None) for k, v in c.metrics.items()}
    return {
        "path": str(path),
        "format_version": version,
        "migrated": version != FORMAT_VERSION,
        "generation": c.generation,
        "epoch": c.epoch,
        "batch_in_epoch": c.batch_in_epoch,
        "theta_sha256": theta_sha256(c.theta),
        "num_params": int(c.theta.shape[0]),
        "sigma": sig,
        "metrics": last,
        "num_logged": max((len(v) for v in c.metrics.values()), default=0),
        "noise_scheme": c.noise_scheme,
        "world_size": c.world_size,
        "created": c.created,
        "host": c.host,
        "mpigls_version": c.mpigls_version,
        "config": c.config,
        "arch": c.arch,
    }
