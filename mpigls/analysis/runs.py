"""Runs as data, for notebooks and the ``plot`` / ``report`` commands: ``load_run(path)``.

A run is a training output directory (checkpoints, ``latest.h5``, ``metrics.jsonl``,
``eval.json``, certification files) or a single checkpoint file. ``load_run`` returns its config,
its metrics history as numpy arrays aligned on ``metrics["generation"]`` (NaN where a metric was
not recorded; ``run.df`` is the same as a pandas DataFrame, which needs the ``analysis`` extra:
without pandas it raises ImportError saying so), its checkpoints and its stored
certification results. It works on a run that is still training: the history is the union of the
newest loadable checkpoint's and the live metrics log's records (the log wins where both have a
generation), and a half-written last log line is ignored.

Certification results are read tolerantly from any JSON file in the run directory (or one level
below, except the ``aside-*`` folders of earlier runs) that holds at least a ``natural`` accuracy:
``eval.json`` (written by a finished ``train``), ``certify_*.json`` (``mpigls report --certify``)
and per-checkpoint results of ``mpigls certify``.
Accuracies may be fractions or per-sample lists (their mean is taken); ``pgd`` is read as
``adversarial``; ``summary`` sub-objects are unwrapped.

Example::

    from mpigls.analysis import load_run
    run = load_run("runs/quickstart")
    print(run.config["optimizer"]["name"], run.generations[-1], run.final("val/certified/deeppoly"))
    run.df.plot(x="generation", y=["loss/mean", "val/natural"])   # pip install 'mpigls[analysis]'
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpigls.run import checkpoint, rundir
from mpigls.run.monitor import METRICS_FILE, read_metrics_log
from mpigls.run.rundir import ASIDE_PREFIX

__all__ = ["Run", "load_run", "load_runs", "read_certifications", "normalise_result", "CERT_FILE_GLOBS"]

CERT_FILE_GLOBS = ("*.json", "*/*.json")


@dataclass(frozen=True)
class Run:
    path: Path  # what was given: a run directory or a checkpoint file
    label: str  # short name for legends and tables
    config: dict  # the fully resolved config of the run
    metrics: dict[str, np.ndarray]  # key -> (n,) float64, aligned with metrics["generation"]
    checkpoints: list[tuple[int, Path]]  # (generation, path), oldest first
    certification: list[dict]  # normalised stored results (normalise_result), oldest first
    checkpoint_path: Path | None = None  # the checkpoint the run was read from (None: log only)

    @functools.cached_property
    def df(self) -> Any:
        """The metrics as a pandas DataFrame (one row per generation); ImportError naming the
        ``analysis`` extra when pandas is not installed."""
        return _dataframe(self.metrics)

    @property
    def directory(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    @property
    def generations(self) -> np.ndarray:
        return self.metrics["generation"].astype(np.int64)

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(generations, values) of ``key`` where it was recorded (finite values only)."""
        if key not in self.metrics:
            raise KeyError(f"metric {key!r} not in run {self.label}; available: {sorted(self.metrics)}")
        values = self.metrics[key]
        ok = np.isfinite(values)
        return self.generations[ok], values[ok]

    def final(self, key: str) -> float:
        """The last recorded value of ``key`` (NaN if never recorded)."""
        _, values = self.series(key)
        return float(values[-1]) if values.size else math.nan

    def best_certification(self, eps: float | None = None) -> dict | None:
        """The stored result for the newest generation (at radius ``eps`` when given; the richest
        and newest file among equals), or None."""
        cands = [
            r
            for r in self.certification
            if eps is None or r.get("eps") is None or math.isclose(r["eps"], eps, rel_tol=1e-9, abs_tol=1e-12)
        ]
        if not cands:
            return None

        def rank(r: dict) -> tuple:
            gen = r.get("generation")
            return (
                gen if isinstance(gen, int) else -1,
                r.get("verified") is not None,
                r.get("certified") is not None,
                r.get("mtime", 0.0),
            )

        return max(cands, key=rank)


def _fraction(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, list) and value and all(isinstance(v, (bool, int, float)) for v in value):
        return float(np.mean(np.asarray(value, dtype=np.float64)))
    if isinstance(value, dict):
        for key in ("accuracy", "fraction", "mean", "value"):
            if isinstance(value.get(key), (int, float)):
                return float(value[key])
    return None


def normalise_result(obj: Any, source: str | os.PathLike = "") -> dict | None:
    """A stored certification result as ``{natural, adversarial, certified, verified,
    certified/<method>..., eps, num_examples, generation, ...}`` (missing accuracies: None), or
    None when ``obj`` is not a certification result."""
    if not isinstance(obj, dict):
        return None
    schema = obj.get("schema")
    if isinstance(schema, str) and "certif" not in schema:
        return None  # another mpigls JSON (e.g. a tightness curve)
    base: dict = obj["summary"] if isinstance(obj.get("summary"), dict) else obj
    natural = _fraction(base.get("natural"))
    if natural is None:
        return None
    out: dict[str, Any] = {
        "natural": natural,
        "adversarial": _fraction(base.get("adversarial", base.get("pgd"))),
        "certified": None,
        "verified": _fraction(base.get("verified")),
    }
    for key, value in base.items():
        if key.startswith("certified/") and _fraction(value) is not None:
            out[key] = _fraction(value)
    cert = base.get("certified")
    if isinstance(cert, dict) and _fraction(cert) is None:  # {method: accuracy}
        out.update({f"certified/{m}": _fraction(v) for m, v in cert.items() if _fraction(v) is not None})
    else:
        out["certified"] = _fraction(cert)
    for key in ("eps", "num_examples", "generation", "theta_sha256", "checkpoint", "time_s", "methods"):
        value = base.get(key, obj.get(key))
        if value is not None:
            out[key] = value
    if isinstance(out.get("eps"), (int, float)):
        out["eps"] = float(out["eps"])
    out["source"] = str(source)
    return out


def read_certifications(directory: str | os.PathLike) -> list[dict]:
    """Every certification result stored in ``directory`` (and one level below), oldest first."""
    d = Path(directory)
    found: list[dict] = []
    seen = set()
    for pattern in CERT_FILE_GLOBS:
        for path in sorted(d.glob(pattern)):
            if (
                path in seen
                or path.name.startswith(".tmp-")
                or not path.is_file()
                or path.parent.name.startswith(ASIDE_PREFIX)
            ):  # an earlier run's files (train --restart)
                continue
            seen.add(path)
            try:
                obj = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # not ours, or being replaced right now
            res = normalise_result(obj, path)
            if res is not None:
                res["mtime"] = path.stat().st_mtime
                found.append(res)
    return sorted(found, key=lambda r: r["mtime"])


def _aligned(rows: dict[int, dict]) -> dict[str, np.ndarray]:
    gens = sorted(rows)
    keys = sorted({k for r in rows.values() for k in r} - {"generation"})
    out = {"generation": np.asarray(gens, dtype=np.float64)}
    for key in keys:
        out[key] = np.asarray([_as_float(rows[g].get(key)) for g in gens], dtype=np.float64)
    return out


def _as_float(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _checkpoint_rows(ckpt: checkpoint.Checkpoint) -> dict[int, dict]:
    gens = ckpt.metrics.get("generation")
    if gens is None:
        return {}
    rows: dict[int, dict] = {int(g): {} for g in gens}
    for key, values in ckpt.metrics.items():
        for i, v in enumerate(values[: len(gens)]):  # shorter series stopped being recorded
            rows[int(gens[i])][key] = float(v)
    return rows


def _dataframe(metrics: dict[str, np.ndarray]):
    try:
        import pandas as pd
    except ImportError as exc:
        raise ImportError(
            "Run.df needs pandas, which is not installed: pip install 'mpigls[analysis]' (or pandas); "
            "run.metrics holds the same history as numpy arrays without it"
        ) from exc
    frame = pd.DataFrame(metrics)
    frame["generation"] = frame["generation"].astype("int64")
    return frame


def load_run(path: str | os.PathLike, label: str | None = None) -> Run:
    """Read a run directory or a checkpoint file (see the module docstring)."""
    path = Path(path)
    ckpt_path: Path | None
    ckpt: checkpoint.Checkpoint | None
    config: dict | None
    if not path.exists():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist; pass a run directory (the --out of "
            "`mpigls train`) or a checkpoint file such as DIR/latest.h5"
        )
    if path.is_file():
        ckpt = checkpoint.load(path)
        rows, ckpt_path, directory = _checkpoint_rows(ckpt), path, path.parent
        config = ckpt.config
        certs = [r for r in read_certifications(directory) if r.get("generation") in (None, ckpt.generation)]
        default_label = f"{path.parent.name}/{path.name}"
    else:
        directory = path
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a run may be mid-write; older files serve
            ckpt_path = rundir.find_latest(path)
        ckpt = checkpoint.load(ckpt_path) if ckpt_path is not None else None
        rows = _checkpoint_rows(ckpt) if ckpt is not None else {}
        config = ckpt.config if ckpt is not None else None
        log = path / METRICS_FILE
        if log.exists():
            records, headers = read_metrics_log(log)
            rows.update({r["generation"]: {k: v for k, v in r.items()} for r in records})
            if config is None and headers:
                config = headers[-1].get("config")
        if config is None:
            raise FileNotFoundError(
                f"{str(path)!r} holds neither a loadable checkpoint nor {METRICS_FILE}; "
                "pass the --out directory of `mpigls train` or a checkpoint file"
            )
        certs = read_certifications(directory)
        default_label = path.resolve().name
    metrics = _aligned(rows)
    return Run(
        path=path,
        label=label or default_label,
        config=config or {},
        metrics=metrics,
        checkpoints=checkpoint.list_checkpoints(directory),
        certification=certs,
        checkpoint_path=ckpt_path,
    )


def load_runs(paths: list[str | os.PathLike]) -> list[Run]:
    """``load_run`` of each path, with labels made unique (the shortest distinguishing suffix)."""
    runs = [load_run(p) for p in paths]
    labels = [r.label for r in runs]
    if len(set(labels)) < len(labels):
        parts = [Path(p).resolve().parts[1:] for p in paths]  # without the root
        for depth in range(2, max(len(p) for p in parts) + 1):
            labels = ["/".join(p[-depth:]) for p in parts]
            if len(set(labels)) == len(labels):
                break
        else:  # the same path given twice: number the repeats
            base, labels = [r.label for r in runs], []
            for i, lab in enumerate(base):
                labels.append(f"{lab} #{base[: i + 1].count(lab)}" if base.count(lab) > 1 else lab)
        runs = [dataclasses.replace(r, label=lab) for r, lab in zip(runs, labels)]
    return runs
