"""Studies: a grid of training runs described in one YAML file, run resumably, one record per run.

A study file (docs/study.md has the full reference)::

    study: digits-pilot                 # name: runs/studies/NAME, results/studies/NAME by default
    base: ../digits-grad-ibp.yaml       # optional base config, relative to the study file
    config: {data: {val_size: 200}}     # optional nested overrides of the base
    seeds: [0, 1, 2]                    # train.seed of every configuration
    axes:                               # optional global axes: every row is run at every value
      bound.eps: [0.2, 0.1]
    evaluation: {pgd_restarts: 1, verify: true, time_limit: 10}
    rows:
      - name: pgd-warm
        set: {optimizer.name: grad, bound.method: pgd}
      - name: pgpe-deeppoly
        after: pgd-warm                 # model.init_from = the finished pgd-warm run, same seed and axes
        set: {optimizer.name: pgpe, bound.method: deeppoly}
        grid: {optimizer.popsize: [16, 64]}   # hyperparameter axes: one configuration per point

An axis or grid value is a scalar (the axis name is the dotted config key) or a mapping of dotted
keys, optionally with a ``label``. The config of a run is: base, ``config``, the global axes'
values, the row's ``set``, its grid point, ``train.seed``; then ``train.threads: 1`` and
``train.progress: false`` unless given. Every run needs ``data.val_size > 0``: hyperparameters are
chosen on the validation split carved from the training set, never on the test set.

Runs are expanded into stages (a run with ``after`` comes one stage after its dependency). Each
run lives in its own directory ``RUNS/<id>/`` (``config.yaml``, checkpoints, ``metrics.jsonl``,
``study.log``) and, once finished, has one record ``RESULTS/<id with / as __>.json``: config,
seed, commit, cost in seconds, the validation evaluation (for selection) and the test evaluation
(natural, PGD, each certificate, their union and, when asked, the complete verifier), the test set
being evaluated once, when the run has finished. A run's state is: finished (its record exists),
interrupted (checkpoints, no record: ``mpigls train`` resumes it), not started. ``run_study``
starts every unfinished run whose dependency is finished, ``jobs`` at a time, each in its own
process with one thread; a run is guarded by an exclusive lock on ``RUNS/<id>/study.lock``, so two
runners never train the same run at once and every run is trained exactly once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fcntl
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from mpigls import config as config_mod
from mpigls.studies import records as records_mod
from mpigls.studies.records import RECORD_SCHEMA, RECORD_VERSION, RecordError

__all__ = [
    "RECORD_SCHEMA",
    "RecordError",
    "StudyError",
    "Study",
    "Row",
    "StudyRun",
    "Paths",
    "load_study",
    "run_state",
    "run_one",
    "run_study",
    "verify_finished",
    "read_record",
    "read_records",
    "stale_reasons",
    "states",
    "current_records",
    "RecordMismatch",
    "STOPPED",
    "EXIT_BUSY",
]

EXIT_BUSY = 75  # a worker found its run's lock held by another process (the runner waits for it)
STOPPED = "stopped at --max-generations"  # the state of a run paused on purpose: not a failure
LOCK_FILE = "study.lock"
LOG_FILE = "study.log"
CONFIG_FILE = "config.yaml"
_STUDY_KEYS = {"study", "base", "config", "seeds", "axes", "rows", "evaluation", "select"}
_ROW_KEYS = {"name", "set", "grid", "after"}
_EVAL_KEYS = {"methods", "pgd_restarts", "verify", "time_limit", "max_domains", "num_test"}
_WORKER_ENV = "MPIGLS_STUDY_WORKER"  # set in the run processes: they never start runs themselves
_RUN_DEFAULTS = {"train.threads": 1, "train.progress": False}


class StudyError(ValueError):
    """A user error in a study file (one paragraph, exit code 2)."""


@dataclasses.dataclass(frozen=True)
class Choice:
    """One value of an axis: its label (for directory names and tables) and its dotted overrides."""

    label: str
    values: tuple[tuple[str, Any], ...]


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    set: tuple[tuple[str, Any], ...]
    grid: tuple[tuple[Choice, ...], ...]  # one tuple of choices per grid axis
    after: str | None


@dataclasses.dataclass(frozen=True)
class Evaluation:
    methods: tuple[str, ...] | None = None  # None: each run's eval.methods
    pgd_restarts: int = 1
    verify: bool = False  # the complete verifier on the test set
    time_limit: float | None = 10.0  # seconds per sample for the verifier
    max_domains: int | None = None
    num_test: int | None = None  # None: the whole test set


@dataclasses.dataclass(frozen=True)
class Study:
    name: str
    path: Path
    base: dict
    seeds: tuple[int, ...]
    axes: tuple[tuple[Choice, ...], ...]
    rows: tuple[Row, ...]
    evaluation: Evaluation
    select: str  # the validation metric configurations are chosen by (higher is better)


@dataclasses.dataclass(frozen=True)
class StudyRun:
    """One training run of a study."""

    id: str  # "<axes labels>/<row>/<grid labels>/seed<k>" (empty parts left out)
    row: str
    group: str  # the global axes' labels ("" without axes)
    configuration: str  # the grid point's labels ("" without a grid)
    seed: int
    stage: int
    after: str | None  # id of the run whose final checkpoint is model.init_from
    config: dict  # the resolved config (model.init_from filled in by ``resolved_config``)
    evaluation: dict = dataclasses.field(default_factory=dict)  # records.evaluation_identity of the study


@dataclasses.dataclass(frozen=True)
class Paths:
    runs: Path  # run directories
    results: Path  # one JSON record per finished run

    def run_dir(self, run: StudyRun) -> Path:
        return self.runs / run.id

    def record(self, run: StudyRun) -> Path:
        return self.record_of(run.id)

    def record_of(self, run_id: str) -> Path:
        """The record of the run with this id (e.g. a warm start named by ``StudyRun.after``)."""
        return self.results / (run_id.replace("/", "__") + ".json")

    @classmethod
    def default(cls, study: Study, runs: str | None = None, results: str | None = None) -> Paths:
        return cls(
            Path(runs) if runs else Path("runs") / "studies" / study.name,
            Path(results) if results else Path("results") / "studies" / study.name,
        )


# ------------------------------------------------------------------------------------------ loading


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise StudyError(f"{where} must be a mapping, got {config_mod.short_repr(value)}")
    return value


def _label(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return text.replace("/", "_").replace(" ", "")


def _choices(axis: str, values: Any, where: str) -> tuple[Choice, ...]:
    if not isinstance(values, list) or not values:
        raise StudyError(f"{where}.{axis} must be a non-empty list of values, got {config_mod.short_repr(values)}")
    out = []
    for v in values:
        if isinstance(v, dict):
            sets = {k: x for k, x in v.items() if k != "label"}
            if not sets or any("." not in k for k in sets):
                raise StudyError(
                    f"{where}.{axis}: a mapping value holds dotted config keys (and an optional label), "
                    f"got {config_mod.short_repr(v)}"
                )
            label = str(v.get("label") or ",".join(f"{k.split('.')[-1]}={_label(x)}" for k, x in sets.items()))
            out.append(Choice(_label(label), tuple(sets.items())))
        else:
            if "." not in axis:
                raise StudyError(
                    f"{where}.{axis}: a scalar value needs the axis to be a dotted config key "
                    f"(e.g. optimizer.lr), or give mappings of dotted keys"
                )
            out.append(Choice(f"{axis.split('.')[-1]}={_label(v)}", ((axis, v),)))
    labels = [c.label for c in out]
    if len(set(labels)) != len(labels):
        raise StudyError(f"{where}.{axis} has repeated values or labels {labels}; give each a distinct label")
    return tuple(out)


def _axes(value: Any, where: str) -> tuple[tuple[Choice, ...], ...]:
    return tuple(_choices(str(k), v, where) for k, v in _mapping(value, where).items())


def load_study(path: str | os.PathLike) -> Study:
    """Read and check a study file; every run's config is validated (``expand`` builds them)."""
    from mpigls.files import input_file

    path = input_file(path, "study file", advice="pass a YAML file such as configs/studies/digits-cnn3-short.yaml")
    raw = config_mod.yaml_load(path.read_text(), source=f"study file {str(path)!r}")
    raw = _mapping(raw, f"study file {path}")
    unknown = sorted(set(raw) - _STUDY_KEYS)
    if unknown:
        raise StudyError(f"study file {path}: unknown keys {unknown}; valid keys are {sorted(_STUDY_KEYS)}")
    name = raw.get("study") or path.stem
    if not isinstance(name, str) or "/" in name or name in (".", ".."):
        raise StudyError(
            f"study name must be a string without '/' (it names the folders runs/studies/NAME and "
            f"results/studies/NAME), got {config_mod.short_repr(name)}"
        )
    base: dict = {}
    if raw.get("base"):
        if not isinstance(raw["base"], str):
            raise StudyError(
                f"study {name}: base must be the path of a config file, got {config_mod.short_repr(raw['base'])}"
            )
        base_path = input_file((path.parent / raw["base"]).resolve(), f"study {name}: base config")
        base = _mapping(config_mod.yaml_load(base_path.read_text(), str(base_path)), str(base_path))
    base = _merge(base, _mapping(raw.get("config"), "config"))
    seeds = raw.get("seeds", [0])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
    ):
        raise StudyError(f"study {name}: seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise StudyError(f"study {name}: seeds {seeds} repeat a value")
    rows = []
    raw_rows = raw.get("rows") or []
    if not isinstance(raw_rows, list):
        raise StudyError(f"study {name}: rows must be a list of mappings, got {config_mod.short_repr(raw_rows)}")
    for i, r in enumerate(raw_rows):
        r = _mapping(r, f"rows[{i}]")
        bad = sorted(set(r) - _ROW_KEYS)
        if bad or not isinstance(r.get("name"), str) or r["name"] in ("", ".", "..") or "/" in r["name"]:
            raise StudyError(
                f"study {name}: rows[{i}] needs a name (no '/') and only the keys {sorted(_ROW_KEYS)}; got {sorted(r)}"
            )
        if r.get("after") is not None and not isinstance(r["after"], str):
            raise StudyError(
                f"study {name}: row {r['name']!r} has after: {config_mod.short_repr(r['after'])}; after names one "
                "other row (a string), whose final network is this row's warm start"
            )
        rows.append(
            Row(
                r["name"],
                tuple(_mapping(r.get("set"), f"rows[{i}].set").items()),
                _axes(r.get("grid"), r["name"]),
                r.get("after"),
            )
        )
    if not rows:
        raise StudyError(f"study {name}: no rows; give at least one row with a name")
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise StudyError(f"study {name}: row names {names} repeat")
    by_name = {r.name: r for r in rows}
    axes = _axes(raw.get("axes"), "axes")
    _check_overrides(name, rows, axes)
    for r in rows:
        if r.after is not None and (r.after not in by_name or r.after == r.name):
            raise StudyError(f"study {name}: row {r.name!r} runs after {r.after!r}, which is not another row")
        if r.after is not None and by_name[r.after].grid:
            raise StudyError(
                f"study {name}: row {r.name!r} starts from row {r.after!r}, which has a grid; a warm-start "
                "row must have one configuration (move its grid into separate rows)"
            )
    select = raw.get("select", "certified")
    if not isinstance(select, str):
        raise StudyError(f"study {name}: select must be a metric name, got {config_mod.short_repr(select)}")
    study = Study(
        name,
        path,
        base,
        tuple(seeds),
        axes,
        tuple(rows),
        _evaluation(raw.get("evaluation"), name),
        select,
    )
    runs = expand(study)  # validates every run's config now, not hours into the study
    _check_select(study, runs)
    return study


def _evaluation(value: Any, name: str) -> Evaluation:
    """The ``evaluation`` section, every value checked (it is used only after the training)."""
    ev = dict(_mapping(value, "evaluation"))
    bad = sorted(set(ev) - _EVAL_KEYS)
    if bad:
        raise StudyError(f"study {name}: unknown evaluation keys {bad}; valid keys are {sorted(_EVAL_KEYS)}")

    def fail(key: str, what: str) -> StudyError:
        return StudyError(f"study {name}: evaluation.{key} must be {what}, got {config_mod.short_repr(ev[key])}")

    def integer(key: str, low: int, none: bool) -> None:
        v = ev.get(key)
        if key in ev and not (v is None and none) and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            raise fail(key, f"an integer >= {low}" + (" or null" if none else ""))

    if "methods" in ev and ev["methods"] is not None:
        methods = ev["methods"]
        ok = isinstance(methods, list) and methods and len(set(map(str, methods))) == len(methods)
        if not ok or any(m not in config_mod.CERTIFY_METHODS for m in methods):
            raise fail("methods", f"a list of distinct sound bound methods among {list(config_mod.CERTIFY_METHODS)}")
        ev["methods"] = tuple(methods)
    integer("pgd_restarts", 1, False)
    integer("max_domains", 1, True)
    integer("num_test", 1, True)
    if "verify" in ev and not isinstance(ev["verify"], bool):
        raise fail("verify", "true or false")
    limit = ev.get("time_limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or not 0 < limit < 1e9):
        raise fail("time_limit", "a positive number of seconds per example, or null (no limit)")
    return Evaluation(**ev)


def _check_overrides(name: str, rows: list[Row], axes: tuple[tuple[Choice, ...], ...]) -> None:
    """Refuse overrides the runner would silently replace: ``train.seed`` (``seeds`` gives it) and
    ``model.init_from`` in a row that starts from another (``after`` gives it)."""
    for where, keys, after in [
        *((f"row {r.name!r}", [k for k, _ in r.set] + [k for ax in r.grid for c in ax for k, _ in c.values], r.after)
          for r in rows),
        *((f"axis value {c.label!r}", [k for k, _ in c.values], None) for ax in axes for c in ax),
    ]:  # fmt: skip
        if "train.seed" in keys:
            raise StudyError(
                f"study {name}: {where} sets train.seed, which the study sets from seeds: for every run; list the "
                "seeds in seeds: instead"
            )
        if after is not None and "model.init_from" in keys:
            raise StudyError(
                f"study {name}: {where} sets model.init_from and starts from row {after!r} (after:), which sets it "
                "to that run's final network; keep one of the two"
            )


def _check_select(study: Study, runs: list[StudyRun]) -> None:
    """``select`` must be a validation metric every run records (the report would otherwise choose blindly)."""
    names: set[str] | None = None
    for r in runs:
        methods = study.evaluation.methods or r.config["eval"]["methods"]
        attack = r.config["eval"].get("pgd_steps", 1) > 0 and study.evaluation.pgd_restarts > 0
        metrics = (
            {"natural", "certified"} | {f"certified/{m}" for m in methods} | ({"adversarial"} if attack else set())
        )
        names = metrics if names is None else names & metrics
    names = names or set()
    if study.select not in names:
        raise StudyError(
            f"study {study.name}: select: {study.select!r} is not a validation metric of every run; choose one of "
            f"{sorted(names)} (the report picks each row's configuration by it)"
        )


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "options" else v
    return out


def _apply(values: dict, sets: tuple[tuple[str, Any], ...] | list, where: str) -> dict:
    """Dotted overrides into a nested dict (the values are Python objects, not YAML text)."""
    out = values
    for key, value in sets:
        parts = str(key).split(".")
        if len(parts) < 2 or not all(parts):
            raise StudyError(f"{where}: {key!r} is not a dotted config key (e.g. optimizer.lr)")
        out = _merge(out, _nest(parts, value))
    return out


def _nest(parts: list[str], value: Any) -> dict:
    return {parts[0]: value if len(parts) == 1 else _nest(parts[1:], value)}


def _stage(rows: dict[str, Row], name: str) -> int:
    seen, stage = {name}, 0
    while rows[name].after is not None:
        name = rows[name].after  # type: ignore[assignment]
        if name in seen:
            raise StudyError(f"rows {sorted(seen)} depend on each other in a cycle")
        seen.add(name)
        stage += 1
    return stage


def expand(study: Study) -> list[StudyRun]:
    """Every run of the study, ordered by stage (warm-start runs first in theirs), then global axes,
    row, grid point and seed."""
    rows = {r.name: r for r in study.rows}
    evaluation = records_mod.evaluation_identity(study.evaluation)
    runs = []
    for group in itertools.product(*study.axes) if study.axes else [()]:
        group_label = ",".join(c.label for c in group)
        for row in study.rows:
            for point in itertools.product(*row.grid) if row.grid else [()]:
                conf_label = ",".join(c.label for c in point)
                for seed in study.seeds:
                    values = study.base
                    for c in group:
                        values = _apply(values, c.values, f"axes {c.label}")
                    values = _apply(values, row.set, f"row {row.name}")
                    for c in point:
                        values = _apply(values, c.values, f"row {row.name} grid {c.label}")
                    values = _apply(values, [("train.seed", seed)], row.name)
                    flat = config_mod.flatten(values)
                    values = _apply(values, [(k, v) for k, v in _RUN_DEFAULTS.items() if k not in flat], row.name)
                    run_id = "/".join(p for p in (group_label, row.name, conf_label, f"seed{seed}") if p)
                    after = "/".join(p for p in (group_label, row.after, f"seed{seed}") if p) if row.after else None
                    try:
                        cfg = config_mod.from_dict(values)
                    except config_mod.ConfigError as exc:
                        raise StudyError(f"study {study.name}: run {run_id}: {exc}") from None
                    if cfg.data.val_size <= 0:
                        raise StudyError(
                            f"study {study.name}: run {run_id} has data.val_size={cfg.data.val_size}; a study "
                            "chooses hyperparameters on a validation split carved from the training set: set "
                            "config: {data: {val_size: N}} (e.g. 200 for digits)"
                        )
                    runs.append(
                        StudyRun(
                            run_id,
                            row.name,
                            group_label,
                            conf_label,
                            seed,
                            _stage(rows, row.name),
                            after,
                            config_mod.to_dict(cfg),
                            evaluation,
                        )
                    )
    ids = [r.id for r in runs]
    for rid in ids:  # a run id is a path under the study's folders: it must stay there
        if any(part in (".", "..") for part in rid.split("/")):
            raise StudyError(f"study {study.name}: run id {rid!r} has a part '.' or '..'; give the axis value a label")
    names = [rid.replace("/", "__") for rid in ids]
    if len(set(names)) != len(names) and len(set(ids)) == len(ids):
        raise StudyError(
            f"study {study.name}: two run ids differ only by '/' against '__' and would share one record file; "
            "rename the row or label with '__' in it"
        )
    if len(set(ids)) != len(ids):
        raise StudyError(f"study {study.name}: two runs share an id; give the axis values distinct labels")
    needed = {r.after for r in runs if r.after}  # warm starts first within their stage: they unblock others
    return [r for _, r in sorted(enumerate(runs), key=lambda t: (t[1].stage, t[1].id not in needed, t[0]))]


# ------------------------------------------------------------------------------------------- state


def read_record(path: Path) -> dict | None:
    """The run record at ``path``, None when there is none; a damaged or edited one raises
    ``RecordError`` (``mpigls.studies.records``)."""
    return records_mod.read_record(path)


def _locked(run_dir: Path) -> bool:
    lock = run_dir / LOCK_FILE
    if not lock.exists():
        return False
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def stale_reasons(run: StudyRun, rec: dict, paths: Paths) -> list[str]:
    """Why the record ``rec`` does not stand for ``run`` as the study now describes it (empty: it does):
    a setting, the warm start or the evaluation differs (``mpigls.studies.records``)."""
    reasons = []
    if rec.get("run") != run.id:
        reasons.append(f"the record is of run {config_mod.short_repr(rec.get('run'))}")
    if rec.get("after") != run.after:
        reasons.append(f"warm start: {rec.get('after')!r} -> {run.after!r}")
    recorded = rec.get("config")
    if run.after is None and isinstance(recorded, dict):  # a fixed model.init_from is a setting of its own
        old = (recorded.get("model") or {}).get("init_from")
        new = run.config["model"].get("init_from")
        if old != new:
            reasons.append(f"model.init_from: {old!r} -> {new!r}")
    reasons += records_mod.config_differences(recorded, run.config)
    checked = records_mod.CHECKSUM_KEY in rec  # format 2 says how it was evaluated and from which network
    if ("evaluation" in rec or checked) and rec.get("evaluation") != run.evaluation:
        had: dict = rec["evaluation"] if isinstance(rec.get("evaluation"), dict) else {}
        reasons += [
            f"evaluation.{k}: {had.get(k)!r} -> {v!r}" for k, v in run.evaluation.items() if had.get(k, "?") != v
        ]
    if run.after is not None and (checked or "warm_start_theta_sha256" in rec):
        dep = read_record(paths.record_of(run.after))
        if dep is not None and dep.get("theta_sha256") != rec.get("warm_start_theta_sha256"):
            reasons.append(f"its warm start {run.after} has been trained again since (another network)")
    return reasons


def _stale(reasons: list[str]) -> str:
    shown = "; ".join(reasons[:4]) + (f"; {len(reasons) - 4} more" if len(reasons) > 4 else "")
    return f"stale ({shown})"


def run_state(run: StudyRun, paths: Paths, *, holding_lock: bool = False) -> str:
    """finished (a record that stands for the run), stale (a record of other settings: new work),
    running (lock held; not asked when the caller holds it), interrupted (checkpoint, no record) or
    not started. A damaged record raises ``RecordError``."""
    from mpigls.run import rundir

    rec = read_record(paths.record(run))
    if rec is not None:
        reasons = stale_reasons(run, rec, paths)
        return _stale(reasons) if reasons else "finished"
    d = paths.run_dir(run)
    if not holding_lock and _locked(d):
        return "running"
    if not (d.is_dir() and rundir.find_latest(d) is not None):
        return "not started"
    changed = _started_differently(run, d)
    return (
        f"interrupted, settings changed ({'; '.join(changed[:4])}): run starts it again" if changed else "interrupted"
    )


def _started_differently(run: StudyRun, d: Path) -> list[str]:
    """The settings in which the run directory's config (written when the run started) differs from the run's."""
    try:
        started = yaml.safe_load((d / CONFIG_FILE).read_text())
    except (OSError, yaml.YAMLError):
        return []  # not started by the runner (or by an older one): train's own resume checks apply
    return records_mod.config_differences(started, run.config)


def states(runs: list[StudyRun], paths: Paths) -> dict[str, str]:
    """``run_state`` of every run (in stage order), a run whose warm start is stale being stale too,
    and a damaged record shown as such instead of raising."""
    out: dict[str, str] = {}
    for run in runs:
        try:
            state = run_state(run, paths)
        except RecordError as exc:
            out[run.id] = f"damaged record ({exc})"
            continue
        dep = out.get(run.after) if run.after else None
        if state == "finished" and dep is not None and dep.startswith(("stale", "damaged")):
            state = _stale([f"its warm start {run.after} is {dep.split(' (')[0]}"])
        out[run.id] = state
    return out


def resolved_config(run: StudyRun, paths: Paths) -> config_mod.Config:
    """The run's config with model.init_from set to its dependency's final checkpoint."""
    from mpigls.run import checkpoint

    values = run.config
    if run.after is not None:
        dep = paths.runs / run.after / checkpoint.LATEST
        values = _apply(values, [("model.init_from", str(dep))], run.id)
    return config_mod.from_dict(values)


# ------------------------------------------------------------------------------------------ running


def _commit() -> str:
    """The git commit of the mpigls source that ran (``+dirty`` with uncommitted changes)."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no", "--", "."],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def _evaluate(
    cfg: config_mod.Config, ckpt, ev: Evaluation, *, validation: bool = True
) -> tuple[dict | None, dict, float, float]:
    """(validation summary, test summary, their seconds): the validation split without the
    verifier (for selection; None with ``validation=False``), the test set once with it when
    ``ev.verify``."""
    import torch

    from mpigls.evaluation import certify
    from mpigls.run import train as train_mod

    dataset, model, _ = train_mod.build_problem(cfg)
    methods = list(ev.methods or cfg.eval.methods)
    theta = torch.from_numpy(ckpt.theta.copy())
    common: dict[str, Any] = dict(
        batch_size=cfg.eval.batch_size,
        pgd_steps=cfg.eval.pgd_steps,
        pgd_restarts=ev.pgd_restarts,
        seed=cfg.train.seed,
    )
    t0 = time.perf_counter()
    val = None
    if validation:
        assert dataset.val_x is not None and dataset.val_y is not None  # expand() requires data.val_size > 0
        val, _ = certify.certify(model, theta, dataset.val_x, dataset.val_y, cfg.bound.eps, methods, **common)
    t1 = time.perf_counter()
    n = ev.num_test or len(dataset.test_y)
    test, _ = certify.certify(
        model,
        theta,
        dataset.test_x[:n],
        dataset.test_y[:n],
        cfg.bound.eps,
        methods,
        **common,
        verify=ev.verify,
        verify_time_limit=ev.time_limit or None,
        verify_max_domains=ev.max_domains,
    )
    return val, test, t1 - t0, time.perf_counter() - t1


def run_one(
    study: Study,
    run: StudyRun,
    paths: Paths,
    *,
    max_generations: int | None = None,
    log: Callable[[str], None] | None = None,
) -> str:
    """Train (or resume) one run, then evaluate it and write its record. Returns its state after:
    finished, ``STOPPED`` (``max_generations`` reached), interrupted (a signal) or busy (another
    process holds its lock). A finished run is left alone; a stale one (its record is of other
    settings) is new work: its record is moved into ``RESULTS/superseded/`` and its run files aside
    (``mpigls train --restart``), as are those of an interrupted run started with other settings. A
    damaged record raises ``RecordError`` and is never overwritten."""
    log = log or (lambda msg: print(msg, flush=True))
    if run_state(run, paths) == "finished":
        return "finished"
    if run.after is not None:
        dep = next(r for r in expand(study) if r.id == run.after)
        dep_state = run_state(dep, paths)
        if dep_state != "finished":
            raise StudyError(
                f"run {run.id} starts from {run.after}, which has not finished ({dep_state}); run that first"
            )
        if not (paths.runs / run.after / "latest.h5").is_file():
            raise StudyError(
                f"run {run.id} starts from the final checkpoint of {run.after}, "
                f"{paths.runs / run.after / 'latest.h5'}, which is missing although that run has a record; copy its "
                f"run directory there, or move its record {paths.record_of(run.after)} aside to train it again"
            )
    d = paths.run_dir(run)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / LOCK_FILE, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log(f"[study] {run.id}: another process holds {d / LOCK_FILE}; leaving it")
            return "busy"
        state = run_state(run, paths, holding_lock=True)  # another process may have finished it meanwhile
        if state == "finished":
            return "finished"
        restart = state.startswith(("stale", "interrupted, settings changed"))
        if state.startswith("stale"):
            moved = _supersede(paths, run)
            log(f"[study] {run.id}: {state}; its record moved to {moved}, training it again")
        elif restart:
            log(f"[study] {run.id}: {state}")
        cfg = resolved_config(run, paths)
        (d / CONFIG_FILE).write_text(yaml.safe_dump(config_mod.to_dict(cfg), sort_keys=False))
        log(f"[study] {run.id}: training ({'from the start' if restart else run_state_text(d)})")
        from mpigls.run import train as train_mod

        result = train_mod.train(cfg, d, max_generations=max_generations, log=log, restart=restart)
        if result.stopped_by_signal or not result.finished:
            log(f"[study] {run.id}: stopped at generation {result.generation} of {result.total_generations}")
            return "interrupted" if result.stopped_by_signal else STOPPED
        record = _evaluate_and_record(study, run, paths, cfg, log)
        rec_path = paths.record(run)
        log(f"[study] {run.id}: finished; validation certified {100 * record['validation']['certified']:.2f}%, "
            f"record {rec_path}")  # fmt: skip
        return "finished"


def _supersede(paths: Paths, run: StudyRun, folder: str = "superseded") -> Path:
    """Move a run's record into ``RESULTS/<folder>/`` (kept, never deleted); returns its new path."""
    src = paths.record(run)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dst = paths.results / folder / f"{src.stem}.{stamp}.json"
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)
    return dst


def _evaluate_and_record(
    study: Study, run: StudyRun, paths: Paths, cfg: config_mod.Config, log: Callable[[str], None]
) -> dict:
    """Evaluate a finished run's final network and write its record (sealed with its checksum)."""
    import numpy as np

    from mpigls.run import checkpoint, rundir

    d = paths.run_dir(run)
    ckpt = rundir.load_latest(d)
    assert ckpt is not None
    log(f"[study] {run.id}: evaluating on the validation split and the test set")
    val, test, val_s, test_s = _evaluate(cfg, ckpt, study.evaluation)
    assert val is not None
    history = {k: np.asarray(v, dtype=np.float64) for k, v in ckpt.metrics.items()}
    dep = read_record(paths.record_of(run.after)) if run.after is not None else None
    record = {
        "schema": RECORD_SCHEMA,
        "version": RECORD_VERSION,
        "study": study.name,
        "run": run.id,
        "row": run.row,
        "group": run.group,
        "configuration": run.configuration,
        "seed": run.seed,
        "after": run.after,
        "warm_start_theta_sha256": dep.get("theta_sha256") if dep is not None else None,
        "commit": _commit(),
        "finished_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "generations": int(ckpt.generation),
        "theta_sha256": checkpoint.theta_sha256(ckpt.theta),
        "cost_s": {
            "train": float(np.nansum(history.get("time/generation_s", np.zeros(0)))),
            "live_validation": float(np.nansum(history.get("time/val_s", np.zeros(0)))),
            "validation": val_s,
            "test": test_s,
        },
        "evaluation": run.evaluation,
        "validation": {k: v for k, v in val.items() if k != "time_s"},
        "test": {k: v for k, v in test.items() if k != "time_s"},
        "config": config_mod.to_dict(cfg),
    }
    record = records_mod.seal(record)
    rundir.write_json(paths.record(run), record)
    return record


def verify_finished(
    study: Study,
    paths: Paths,
    *,
    time_limit: float | None = 10.0,
    max_domains: int | None = None,
    only: list[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> list[str]:
    """Add the complete verifier to finished runs evaluated without it: each record whose test
    evaluation has no ``verified`` is evaluated again on the same test examples, with the study's
    methods and PGD settings and the verifier (``time_limit`` seconds per example), from the run's
    final checkpoint; the record gains ``test.verified`` (with ``unknown``, ``falsified`` and the
    search's statistics) and ``cost_s.verify``, and keeps its other numbers. Validation (the
    selection) is not touched. Returns the ids of the runs verified.

    Every record is read first: a damaged or edited one (checksum) raises ``RecordError`` before
    anything is evaluated. A record whose natural, PGD or certified test accuracy does not come out
    again is not kept: it is moved into ``RESULTS/rejected/`` (the run is no longer finished) and,
    after the other runs, ``RecordMismatch`` names them."""

    log = log or (lambda msg: print(msg, flush=True))
    ev = dataclasses.replace(study.evaluation, verify=True, time_limit=time_limit, max_domains=max_domains)
    done: list[str] = []
    rejected: list[str] = []
    runs = [r for r in expand(study) if only is None or r.id in only]
    found = {r.id: read_record(paths.record(r)) for r in runs}  # every damaged record is refused up front
    for run in runs:
        rec = found[run.id]
        if rec is None or "verified" in rec.get("test", {}):
            continue
        with _run_lock(paths.run_dir(run)) as held:
            if not held:
                log(f"[study] {run.id}: another process holds {paths.run_dir(run) / LOCK_FILE}; left for now")
                continue
            if read_record(paths.record(run)) != rec:  # changed by another process meanwhile
                continue
            outcome = _verify_one(run, rec, paths, ev, log)
        (done if outcome is None else rejected).append(outcome or run.id)
    if rejected:
        raise RecordMismatch(
            f"study {study.name}: {len(rejected)} record(s) do not reproduce from their run's final network and "
            f"were not kept: {'; '.join(rejected)}. `mpigls study run {study.path}` evaluates those runs again "
            f"(from their checkpoints); {len(done)} other run(s) were verified"
        )
    return done


@contextlib.contextmanager
def _run_lock(d: Path):
    """The run's ``study.lock`` held for the block (yields False when another process holds it)."""
    if not d.is_dir():
        yield True
        return
    with open(d / LOCK_FILE, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        yield True


def _verify_one(run: StudyRun, rec: dict, paths: Paths, ev: Evaluation, log: Callable[[str], None]) -> str | None:
    """``verify_finished`` for one run (its lock held): None when verified, else why its record was rejected."""
    import numpy as np

    from mpigls.run import checkpoint, rundir

    time_limit, max_domains = ev.time_limit, ev.max_domains
    ckpt = rundir.load_latest(paths.run_dir(run))
    if ckpt is None:
        raise StudyError(
            f"run {run.id} has a record but no checkpoint in {paths.run_dir(run)}; the verifier needs its "
            "final network (copy its run directory there)"
        )
    if checkpoint.theta_sha256(ckpt.theta) != rec.get("theta_sha256"):
        raise StudyError(
            f"run {run.id}: the checkpoint in {paths.run_dir(run)} is not the network its record describes"
        )
    # the final network comes from the checkpoint, not from the warm start
    cfg = config_mod.from_dict(_apply(rec["config"], [("model.init_from", None)], run.id))
    ev_run = dataclasses.replace(ev, num_test=rec["test"].get("num_examples") or ev.num_test)
    log(f"[study] {run.id}: complete verifier on the test set ({time_limit} s per example)")
    _, test, _, test_s = _evaluate(cfg, ckpt, ev_run, validation=False)
    differs = [
        k
        for k in ("natural", "adversarial", "certified")  # adversarial is absent without an attack
        if (test.get(k) is None) != (rec["test"].get(k) is None)
        or (test.get(k) is not None and not np.isclose(test[k], rec["test"][k]))
    ]
    if differs:
        moved = _supersede(paths, run, "rejected")
        log(
            f"[study] {run.id}: the test evaluation does not reproduce its record ("
            + ", ".join(f"{k} {rec['test'].get(k)} recorded, {test.get(k)} now" for k in differs)
            + f"); the record is not kept: moved to {moved}"
        )
        return f"{run.id} ({', '.join(differs)}; record moved to {moved})"
    added = {k: v for k, v in test.items() if k in ("verified", "unknown", "falsified") or k.startswith("verify/")}
    rec["test"].update(added)
    rec["cost_s"]["verify"] = test_s
    rec["verify"] = {"time_limit": time_limit, "max_domains": max_domains}
    rundir.write_json(paths.record(run), records_mod.seal(rec))
    log(f"[study] {run.id}: verified {100 * test['verified']:.2f}% ({test.get('unknown', 0)} unknown)")
    return None


class RecordMismatch(RuntimeError):
    """``study verify``: records whose numbers do not come out again (exit code 1)."""


def run_state_text(d: Path) -> str:
    from mpigls.run import rundir

    ckpt = rundir.find_latest(d)
    return "resuming" if ckpt is not None else "from the start"


def read_records(paths: Paths) -> list[dict]:
    """Every run record in the results folder, sorted by run id; a damaged one raises ``RecordError``."""
    return records_mod.read_records(paths.results)


def current_records(study: Study, paths: Paths) -> tuple[list[dict], list[str]]:
    """The records that stand for the study's runs as the study file now describes them, and a note
    for each record left out (stale, of a warm start that is stale) or read without a checksum
    (format 1). A damaged record raises ``RecordError``."""
    out, notes = [], []
    run_states = states(runs := expand(study), paths)
    for run in runs:
        state = run_states[run.id]
        if state.startswith("damaged"):
            read_record(paths.record(run))  # raises the damaged record's own paragraph
        if state.startswith("stale"):
            notes.append(f"{run.id}: {state}; not reported")
        elif state == "finished":
            out.append(read_record(paths.record(run)))
    unchecked = records_mod.unchecked([r for r in out if r is not None])
    if unchecked:
        notes.append(f"{unchecked} record(s) of format 1 carry no checksum: an edit to them cannot be detected")
    return sorted((r for r in out if r is not None), key=lambda r: str(r["run"])), notes


def run_study(
    study: Study,
    paths: Paths,
    *,
    jobs: int = 1,
    inline: bool = False,
    only: list[str] | None = None,
    max_generations: int | None = None,
    log: Callable[[str], None] | None = None,
    poll_s: float = 1.0,
) -> dict[str, str]:
    """Run every unfinished run (or the ``only`` ids) whose dependency has finished, ``jobs`` at a
    time; returns {run id: state after}. ``inline`` trains one run after the other in this process
    (tests, debugging); otherwise each run is a ``python -m mpigls study run STUDY --only ID``
    process with OMP_NUM_THREADS=1, its output in ``RUNS/<id>/study.log``.

    A run that another process is training (its lock is held: a second ``study run`` of the same
    study) is waited for, not started and not counted as failed: when that process ends, the run is
    finished (its record) or this runner takes it up. Every record is read before anything starts:
    a damaged one raises ``RecordError``."""
    log = log or (lambda msg: print(msg, flush=True))
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    if max_generations is not None and max_generations < 0:
        raise ValueError(f"--max-generations must be >= 0, got {max_generations}")
    if not inline and os.environ.get(_WORKER_ENV):
        raise RuntimeError("a study worker process may only train its own run (--inline)")
    every = expand(study)
    runs = every
    if only:
        unknown = sorted(set(only) - {r.id for r in runs})
        if unknown:
            raise StudyError(f"study {study.name} has no runs {unknown}; `mpigls study status` lists them")
        runs = [r for r in runs if r.id in only]
    initial = states(every, paths)
    damaged = [s for r, s in initial.items() if s.startswith("damaged")]
    if damaged:
        raise RecordError(f"study {study.name}: {len(damaged)} damaged record(s), nothing was started. " + damaged[0])
    by_id = {r.id: r for r in every}
    outcome = {r.id: "finished" for r in runs if initial[r.id] == "finished"}
    pending = [r for r in runs if r.id not in outcome]
    running: dict[str, tuple[subprocess.Popen, Any]] = {}
    told: set[str] = set()  # runs reported as being trained elsewhere

    def dep_state(run: StudyRun) -> str:
        if run.after is None:
            return "finished"
        if run.after in outcome:
            return outcome[run.after]
        if any(r.id == run.after for r in pending) or _locked(paths.run_dir(by_id[run.after])):
            return "pending"  # it runs in this invocation or in another process: wait for it
        state = run_state(by_id[run.after], paths)
        return "finished" if state == "finished" else f"not run here, {state}"

    def start(r: StudyRun) -> None:
        if inline:
            outcome[r.id] = run_one(study, r, paths, max_generations=max_generations, log=log)
        else:
            running[r.id] = _spawn(study, r, paths, max_generations)
            log(f"[study] {r.id}: started (stage {r.stage}, pid {running[r.id][0].pid})")

    stop = _Stop(running, log) if not inline else None
    with stop if stop is not None else contextlib.nullcontext():
        while pending or running:
            if stop is not None and stop.requested:  # no new runs; the running ones checkpoint and stop
                for r in pending:
                    outcome[r.id] = "not started (stopped)"
                pending = []
            _reap(running, outcome, paths, by_id, stop, log)
            for rid in [k for k, v in outcome.items() if v == "busy"]:  # lost the race for its lock: wait
                del outcome[rid]
                pending.append(by_id[rid])
            for r in [r for r in pending if dep_state(r) not in ("finished", "pending")]:
                pending.remove(r)
                outcome[r.id] = _blocked(r, dep_state(r))
                log(f"[study] {r.id}: {outcome[r.id]}")
            elsewhere = [r for r in pending if _locked(paths.run_dir(r))]
            for r in elsewhere:
                if r.id not in told:
                    told.add(r.id)
                    log(f"[study] {r.id}: being trained by another process; waiting for it")
            ready = [r for r in pending if dep_state(r) == "finished" and r not in elsewhere]
            for r in ready:
                if len(running) >= jobs and not inline:
                    break
                pending.remove(r)
                if run_state(r, paths) == "finished":  # finished by another process meanwhile
                    outcome[r.id] = "finished"
                    continue
                start(r)
            held = any(r.after is not None and _locked(paths.run_dir(by_id[r.after])) for r in pending)
            if running or elsewhere or held:
                time.sleep(poll_s)
            elif pending and not ready:
                for r in pending:  # their dependency did not finish in this invocation
                    outcome[r.id] = _blocked(r, dep_state(r))
                    log(f"[study] {r.id}: {outcome[r.id]}")
                pending = []
    return outcome


def _blocked(run: StudyRun, dep: str) -> str:
    """The state of a run not started because its warm start did not finish: waiting (the warm start
    was paused or interrupted and resumes with the next ``study run``) or blocked."""
    if dep in (STOPPED, "interrupted") or dep.startswith("not started (stopped)"):
        return f"waiting ({run.after}: {dep})"
    return f"blocked ({run.after}: {dep})"


def _spawn(study: Study, r: StudyRun, paths: Paths, max_generations: int | None) -> tuple[subprocess.Popen, Any]:
    """One run in its own process (``study run --inline --only ID``), its output in ``RUNS/<id>/study.log``."""
    d = paths.run_dir(r)
    d.mkdir(parents=True, exist_ok=True)
    fh = open(d / LOG_FILE, "a")  # noqa: SIM115 - closed when the process is reaped
    cmd = [sys.executable, "-m", "mpigls", "study", "run", str(study.path), "--inline", "--only", r.id]
    cmd += ["--runs", str(paths.runs), "--results", str(paths.results)]
    if max_generations is not None:
        cmd += ["--max-generations", str(max_generations)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", _WORKER_ENV: "1"}
    return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env), fh


def _reap(running: dict, outcome: dict, paths: Paths, by_id: dict, stop: Any, log: Callable[[str], None]) -> None:
    """The state of each run process that has ended: from its exit code and its record."""
    for rid, (proc, fh) in list(running.items()):
        rc = proc.poll()
        if rc is None:
            continue
        fh.close()
        del running[rid]
        if rc == 0:
            state = "finished" if run_state(by_id[rid], paths) == "finished" else STOPPED
        else:
            state = {3: "interrupted", EXIT_BUSY: "busy"}.get(rc, f"failed (exit {rc})")
        if stop is not None and stop.requested and rc < 0:  # stopped before it could checkpoint
            state = "interrupted"
        outcome[rid] = state
        log(f"[study] {rid}: {state} (log {paths.runs / rid / LOG_FILE})")


class _Stop:
    """While the runner waits: SIGTERM / SIGINT / SIGUSR1 are passed on to the run processes as
    SIGUSR1 (each writes a checkpoint and stops: mpigls train's stop signal) and no run is started."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self, running: dict, log: Callable[[str], None]):
        self.running, self.log, self.requested = running, log, False
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.log(f"[study] signal {signum}: stopping the {len(self.running)} running run(s) at a checkpoint")
        for proc, _ in self.running.values():
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGUSR1)

    def __enter__(self) -> _Stop:
        with contextlib.suppress(ValueError):  # not the main thread: no forwarding
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


def status(study: Study, paths: Paths) -> list[tuple[StudyRun, str]]:
    """Every run with its state (``states``: stale and damaged records shown with the reason)."""
    runs = expand(study)
    st = states(runs, paths)
    return [(r, st[r.id]) for r in runs]
