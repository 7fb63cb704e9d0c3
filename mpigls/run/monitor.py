"""Live monitoring during training: validation accuracy every ``eval.every`` generations, and the
append-only metrics log ``DIR/metrics.jsonl`` that can be read while the run goes.

Validation: natural, PGD and certified accuracy (``certify.evaluate``, at the target radius
``bound.eps``) of the current θ on a fixed subset: the first ``eval.num_val`` examples of the
validation split carved from the training set (``data.val_size`` > 0), else of the test set. The
subset is cut into blocks of ``eval.batch_size`` spread over the ranks and the per-block counts
are gathered, so the numbers are identical for any rank count. It runs on a private copy of the
network and draws its PGD start from its own counter-based stream, so the training trajectory is
bitwise the same with and without it. Results join the metrics history as ``val/natural``,
``val/pgd``, ``val/certified/<method>`` (and ``time/val_s``) at generations that are multiples of
``eval.every`` and at the run's last generation.

Metrics log: rank 0 appends one JSON object per generation (``{"generation": g, "unix_time": t,
<metric>: value, ...}``, non-finite values as null) and flushes it, so ``tail -f`` and
``mpigls plot DIR`` see every generation without waiting for a checkpoint; writing one short line
costs microseconds. Header lines (``{"schema": "mpigls-metrics", ...}``, one per start or resume)
carry the config. A kill can leave a truncated last line: readers skip it. On resume from
generation G the log is first cut back to the records with generation <= G (the checkpoint's
history), so re-run generations never appear twice; readers also keep only the last record of any
generation.

Trackers: the same records go to TensorBoard / Weights & Biases when ``track.*`` enables them
(``mpigls.interop.trackers``, rank 0).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from mpigls import files
from mpigls.evaluation import certify
from mpigls.interop import trackers

__all__ = ["METRICS_FILE", "SCHEMA", "Monitor", "Validator", "MetricsLog", "read_metrics_log", "truncate_log"]

METRICS_FILE = "metrics.jsonl"
SCHEMA = "mpigls-metrics"
VERSION = 1


def _finite_or_none(value):
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value if math.isfinite(value) else None
    return value


def _parse_lines(raw: bytes) -> list[tuple[int, dict | None]]:
    """(end offset, object or None when unparsable) for every newline-terminated line of ``raw``;
    a last line without its newline is a write in progress or cut by a kill and is left out."""
    out: list[tuple[int, dict | None]] = []
    start = 0
    while True:
        end = raw.find(b"\n", start)
        if end < 0:
            return out
        line = raw[start:end].strip()
        obj = None
        if line:
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
        out.append((end + 1, obj if isinstance(obj, dict) else None))
        start = end + 1


def _not_a_pipe(path: str | os.PathLike) -> None:
    """Refuse a FIFO, device or socket as the metrics log before it is opened (opening one would block);
    a directory fails at once on opening and is reported as an OSError there."""
    if not Path(path).is_dir():
        files.input_file(
            path, "the metrics log", advice="a run's metrics.jsonl is a regular file written by mpigls train"
        )


def read_metrics_log(path: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """(records sorted by generation, last record per generation kept; header lines) of a metrics
    log. A truncated last line is skipped silently, any other unreadable line with a warning;
    null values become NaN."""
    _not_a_pipe(path)
    raw = Path(path).read_bytes()
    records: dict[int, dict] = {}
    headers = []
    for _, obj in _parse_lines(raw):
        if obj is None:
            warnings.warn(f"{path}: skipping an unreadable line", RuntimeWarning, stacklevel=2)
        elif "schema" in obj:
            headers.append(obj)
        elif isinstance(obj.get("generation"), int):
            records[obj["generation"]] = {k: (math.nan if v is None else v) for k, v in obj.items()}
    return [records[g] for g in sorted(records)], headers


def truncate_log(path: str | os.PathLike, generation: int) -> int:
    """Cut the log back to header lines and records with generation <= ``generation`` (dropping a
    truncated last line too); atomic (temp file + replace). Returns the number of lines removed."""
    path = Path(path)
    if not path.exists():
        return 0
    _not_a_pipe(path)
    raw = path.read_bytes()
    kept, removed, start = [], 0, 0
    for end, obj in _parse_lines(raw):
        line, start = raw[start:end], end
        if obj is not None and (
            "schema" in obj or (isinstance(obj.get("generation"), int) and obj["generation"] <= generation)
        ):
            kept.append(line)
        else:
            removed += 1
    removed += start != len(raw)  # a cut last line
    if removed:
        tmp = path.with_name(f".tmp-{path.name}")
        try:
            tmp.write_bytes(b"".join(kept))
            os.replace(tmp, path)
        finally:  # a full disk fails the write: no partial temp file is left behind
            tmp.unlink(missing_ok=True)
    return removed


class MetricsLog:
    """Rank 0's append-only writer of ``DIR/metrics.jsonl``; a failing disk disables it with one
    warning instead of stopping training (the checkpoints keep the full history)."""

    def __init__(
        self,
        path: str | os.PathLike,
        start_generation: int,
        config: dict | None = None,
        say: Callable[[str], None] = print,
    ):
        self.path, self._say = Path(path), say
        self._file = None
        try:
            truncate_log(self.path, start_generation)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held open for the whole run
            self._write(
                {
                    "schema": SCHEMA,
                    "version": VERSION,
                    "start_generation": start_generation,
                    "unix_time": time.time(),
                    "config": config,
                }
            )
        except OSError as exc:
            self._disable(exc)

    def _disable(self, exc: OSError) -> None:
        self._say(f"warning: metrics log {self.path} disabled ({exc}); checkpoints still keep the metrics")
        self.close()

    def _write(self, obj: dict) -> None:
        assert self._file is not None
        self._file.write(json.dumps(obj, allow_nan=False, default=str) + "\n")
        self._file.flush()

    def append(self, generation: int, metrics: dict) -> None:
        if self._file is None:
            return
        try:
            self._write(
                {
                    "generation": int(generation),
                    "unix_time": time.time(),
                    **{k: _finite_or_none(v) for k, v in metrics.items()},
                }
            )
        except OSError as exc:
            self._disable(exc)

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None


class Validator:
    """Accuracy of θ on the fixed validation subset (collective: every rank calls it)."""

    def __init__(self, cfg, dataset, model: torch.nn.Sequential, comm):
        x, y = (dataset.val_x, dataset.val_y) if dataset.val_x is not None else (dataset.test_x, dataset.test_y)
        n = min(cfg.eval.num_val, len(y))
        self.x, self.y = x[:n], y[:n]
        self.model = copy.deepcopy(model)  # never touch the network the training loop uses
        self.cfg, self.comm = cfg, comm

    def __call__(self, theta: torch.Tensor) -> dict[str, float]:
        t0 = time.perf_counter()
        res = certify.evaluate_configured(self.cfg, self.model, theta, self.x, self.y, comm=self.comm)
        out = {
            f"val/{k}": float(v)
            for k, v in res.items()
            if k not in ("num_examples", "eps", "time_s") and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        return out | {"time/val_s": time.perf_counter() - t0}


class Monitor:
    """What the training loop calls once per generation: validation when due, then the log line."""

    def __init__(
        self,
        cfg,
        comm,
        out_dir: str | os.PathLike,
        dataset,
        model,
        start_generation: int,
        total_generations: int,
        say: Callable[[str], None] = print,
    ):
        from mpigls.config import to_dict

        self.every, self.total, self._say = cfg.eval.every, total_generations, say
        self.validator = Validator(cfg, dataset, model, comm) if self.every else None
        self.log = (
            MetricsLog(Path(out_dir) / METRICS_FILE, start_generation, to_dict(cfg), say) if comm.is_root else None
        )
        # TensorBoard / W&B (track.*): fed the same records as the metrics log, on rank 0
        self.trackers = trackers.open_trackers(cfg, out_dir, start_generation, say) if comm.is_root else None

    def due(self, generation: int) -> bool:
        return bool(self.every) and (generation % self.every == 0 or generation == self.total)

    def update(self, generation: int, theta: torch.Tensor, metrics: dict) -> dict:
        """``metrics`` plus the validation results when due; appends the generation's log line."""
        if self.due(generation):
            assert self.validator is not None  # due() is False without eval.every
            val = self.validator(theta.detach().cpu())
            metrics = {**metrics, **val}
            self._say(
                f"val gen {generation:6d}  "
                + "  ".join(f"{k[4:]} {100 * v:.2f}%" for k, v in val.items() if k.startswith("val/"))
            )
        if self.log is not None:
            self.log.append(generation, metrics)
        if self.trackers is not None:
            self.trackers.log(generation, metrics)
        return metrics

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        if self.trackers is not None:
            self.trackers.close()
