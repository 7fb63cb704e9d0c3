"""A study's run records: their integrity (a checksum over the content) and their identity (the
settings they were trained and evaluated with).

A record is one JSON file ``RESULTS/<run id with / as __>.json``. Format 2 carries ``sha256``, the
SHA-256 of the record's canonical JSON without that field (keys sorted, no whitespace); a record
that does not parse, is not a study record, lacks its checksum or whose checksum does not match its
content is *damaged* and is refused loudly (``RecordError``): never read as "not finished", never
overwritten, never averaged. The checksum detects an edit or a truncation; it does not prevent one
(anyone may recompute it): ``mpigls study verify`` evaluates the network again. Format-1 records
(written before the checksum) are read as they are and counted (``unchecked``) so that commands can
say so.

A record stands for its run only while the run's settings are the record's: ``differences`` compares
every config setting (read with today's defaults, so a key added since takes the default the older
version used), the warm start (the run it starts from and, in format 2, the θ hash of that run's
final network) and the evaluation (methods, PGD restarts, number of test examples). A record whose
run differs is *stale*: the run is new work.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from mpigls import config as config_mod

__all__ = [
    "RECORD_SCHEMA",
    "RECORD_VERSION",
    "RecordError",
    "checksum",
    "seal",
    "read_record",
    "read_records",
    "is_record_name",
    "settings",
    "evaluation_identity",
    "config_differences",
]

RECORD_SCHEMA = "mpigls-study-run"
RECORD_VERSION = 2
CHECKSUM_KEY = "sha256"
_RECORD_NAME = re.compile(r"(^|__)seed\d+\.json$")
# settings that do not change a run's numbers: the warm start's path (the warm start is identified
# by its run id and the θ hash of its network) and the progress display
IGNORED_SETTINGS = frozenset({"model.init_from", "train.progress"})


class RecordError(ValueError):
    """A damaged or edited run record (a user error: one paragraph, exit code 2)."""


def _canonical(rec: dict) -> bytes:
    body = {k: v for k, v in rec.items() if k != CHECKSUM_KEY}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def checksum(rec: dict) -> str:
    """SHA-256 of the record's canonical JSON, the checksum field left out."""
    return hashlib.sha256(_canonical(rec)).hexdigest()


def seal(rec: dict) -> dict:
    """The record as it is written: JSON values only (NaN as null), format 2, its checksum."""
    from mpigls.run import rundir

    out = json.loads(json.dumps(rundir.json_safe(rec), default=str))
    out["version"] = RECORD_VERSION
    out.pop(CHECKSUM_KEY, None)
    out[CHECKSUM_KEY] = checksum(out)
    return out


def _damaged(path: Path, why: str) -> RecordError:
    return RecordError(
        f"study record {path} is damaged or was edited: {why}. Its numbers are not used and the run is not "
        f"trained over it: restore the file (e.g. from version control), or move it aside to train and "
        f"evaluate the run again"
    )


def read_record(path: Path) -> dict | None:
    """The record at ``path``; None when there is none. Raises ``RecordError`` when the file is not
    an intact study record (see the module docstring)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return None
    if not path.is_file():
        raise _damaged(path, "it is not a regular file")
    try:
        text = path.read_bytes().decode()
        rec = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _damaged(path, f"it is not readable JSON ({type(exc).__name__}: {exc}; a truncated write?)") from None
    if not isinstance(rec, dict) or rec.get("schema") != RECORD_SCHEMA:
        raise _damaged(path, f"it is not a study record (no schema {RECORD_SCHEMA!r})")
    version = rec.get("version")
    if version == 1 and CHECKSUM_KEY not in rec:
        return rec  # written before records had a checksum: read as it is, counted as unchecked
    if version != RECORD_VERSION:
        raise _damaged(path, f"format {config_mod.short_repr(version)} is not one this mpigls reads (1, 2)")
    if not isinstance(rec.get(CHECKSUM_KEY), str):
        raise _damaged(path, "a format-2 record without its checksum")
    try:
        ok = checksum(rec) == rec[CHECKSUM_KEY]
    except ValueError:  # NaN or infinity: never written by mpigls
        ok = False
    if not ok:
        raise _damaged(path, "its checksum does not match its content")
    return rec


def is_record_name(name: str) -> bool:
    """Whether a file name in a results folder is a run record's (tables and diagnostics are not)."""
    return bool(_RECORD_NAME.search(name))


def read_records(results: Path) -> list[dict]:
    """Every run record in a results folder, sorted by run id; a damaged one raises ``RecordError``."""
    results = Path(results)
    if not results.is_dir():
        return []
    recs = [read_record(p) for p in sorted(results.glob("*.json")) if is_record_name(p.name)]
    return sorted((r for r in recs if r is not None), key=lambda r: str(r.get("run")))


def unchecked(recs: list[dict]) -> int:
    """How many of these records carry no checksum (format 1)."""
    return sum(CHECKSUM_KEY not in r for r in recs)


def settings(values: dict) -> dict[str, Any]:
    """A config's settings that identify a run (dotted keys), read with today's defaults."""
    flat = config_mod.flatten(config_mod.to_dict(config_mod.from_dict(config_mod.stored_config(values))))
    return {k: v for k, v in flat.items() if k not in IGNORED_SETTINGS}


def evaluation_identity(evaluation: Any) -> dict:
    """The parts of a study's ``evaluation`` that change a record's natural, PGD and certified numbers."""
    methods = evaluation.methods
    return {
        "methods": list(methods) if methods is not None else None,
        "pgd_restarts": evaluation.pgd_restarts,
        "num_test": evaluation.num_test,
    }


def config_differences(recorded: Any, current: dict) -> list[str]:
    """The settings in which a record's config differs from the run's current one, as
    ``key: old -> new`` lines (empty: the same run)."""
    if not isinstance(recorded, dict):
        return ["the record holds no config"]
    try:
        have = settings(recorded)
    except (config_mod.ConfigError, TypeError, ValueError) as exc:
        return [f"the recorded config no longer reads ({exc})"]
    want = settings(current)
    keys = sorted(set(have) | set(want))
    return [f"{k}: {have.get(k)!r} -> {want.get(k)!r}" for k in keys if have.get(k) != want.get(k)]
