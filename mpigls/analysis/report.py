"""Results tables in the layout of the paper's Table 1 (arXiv 2403.07095): one row per dataset,
radius and training relaxation; per accuracy (natural, adversarial, certified, verified) one
column per optimizer (GRAD, PGPE, RGS).

Each run contributes its stored certification result (``Run.best_certification`` at the run's
training radius ``bound.eps``); several runs in one cell (seeds) give mean ± std and their count.
``certified`` is the per-sample union of all bound certificates when the result stores it (the
``mpigls certify`` results), otherwise the best single method (a lower bound of the union), marked
with ``*``. Accuracies are percentages. Formats: Markdown, CSV (the same wide table, numbers only)
and JSON (every cell with mean, std, n and the runs behind it).
"""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np

from mpigls.analysis.runs import Run
from mpigls.run.rundir import json_safe

__all__ = ["METRICS", "build_table", "format_table", "run_result"]

METRICS = ("natural", "adversarial", "certified", "verified")
_METRIC_TITLES = {"natural": "Nat.", "adversarial": "Adv.", "certified": "Cert.", "verified": "Ver."}
_OPTIMIZERS = ("grad", "pgpe", "rgs")
_RELAXATION_ORDER = ("natural", "pgd", "ibp", "sabr", "staps", "hbox", "crown-ibp", "deeppoly", "alpha-crown")
_RELAXATION_NAMES = {
    "ibp": "IBP",
    "hbox": "HBox",
    "crown-ibp": "CROWN-IBP",
    "deeppoly": "DeepPoly",
    "alpha-crown": "alpha-CROWN",
    "sabr": "SABR",
    "staps": "STAPS",
    "pgd": "PGD",
    "natural": "standard",
}
_DATASET_NAMES = {
    "mnist": "MNIST",
    "cifar10": "CIFAR-10",
    "tinyimagenet": "TinyImageNet",
    "digits": "digits",
    "synthetic": "synthetic",
}


def run_result(run: Run) -> tuple[dict | None, bool]:
    """(accuracies of the run at its training radius, whether ``certified`` is the best single
    method instead of the union); (None, False) when nothing is stored."""
    eps = run.config.get("bound", {}).get("eps")
    res = run.best_certification(eps)
    if res is None:
        return None, False
    out = {m: res.get(m) for m in METRICS}
    single = False
    if out["certified"] is None:
        per_method = [v for k, v in res.items() if k.startswith("certified/") and v is not None]
        if per_method:
            out["certified"], single = max(per_method), True
    out["eps"] = res.get("eps", eps)
    return out, single


def _relaxation(run: Run) -> str:
    method = run.config.get("bound", {}).get("method", "?")
    return "deeppoly" if method == "crown" else method


def build_table(runs: list[Run]) -> dict:
    """The table as data: ``{"rows": [...], "optimizers": [...], "metrics": [...], "missing": [...]}``;
    each row has dataset, eps, relaxation and ``cells[metric][optimizer] = {mean, std, n, runs}``."""
    groups: dict[tuple, dict] = {}
    missing, optimizers = [], set()
    for run in runs:
        res, single = run_result(run)
        if res is None:
            missing.append(run.label)
            continue
        opt = run.config.get("optimizer", {}).get("name", "?")
        optimizers.add(opt)
        key = (run.config.get("data", {}).get("name", "?"), float(res["eps"]), _relaxation(run))
        cells = groups.setdefault(key, {})
        for metric in METRICS:
            if res[metric] is not None:
                cell = cells.setdefault(metric, {}).setdefault(opt, {"values": [], "runs": [], "single_method": False})
                cell["values"].append(100.0 * res[metric])
                cell["runs"].append(run.label)
                cell["single_method"] |= single and metric == "certified"
    order = {m: i for i, m in enumerate(_RELAXATION_ORDER)}
    rows = []
    for dataset, eps, relax in sorted(groups, key=lambda k: (k[0], k[1], order.get(k[2], 99), k[2])):
        cells = {}
        for metric, by_opt in groups[(dataset, eps, relax)].items():
            cells[metric] = {
                opt: {
                    "mean": float(np.mean(c["values"])),
                    "std": float(np.std(c["values"], ddof=1)) if len(c["values"]) > 1 else 0.0,
                    "n": len(c["values"]),
                    "runs": c["runs"],
                    "single_method": c["single_method"],
                }
                for opt, c in by_opt.items()
            }
        rows.append({"dataset": dataset, "eps": eps, "relaxation": relax, "cells": cells})
    used_metrics = [m for m in METRICS if any(m in r["cells"] for r in rows)]
    used_opts = [o for o in _OPTIMIZERS if o in optimizers] + sorted(optimizers - set(_OPTIMIZERS))
    return {"rows": rows, "optimizers": used_opts, "metrics": used_metrics, "missing": missing, "unit": "percent"}


def _header(table: dict) -> list[str]:
    return ["Dataset", "eps", "Relaxation"] + [
        f"{_METRIC_TITLES[m]} {o.upper()}" for m in table["metrics"] for o in table["optimizers"]
    ]


def _cell_text(cell: dict | None) -> str:
    if cell is None:
        return "–"
    text = f"{cell['mean']:.2f}" + ("*" if cell["single_method"] else "")
    return text + (f" ± {cell['std']:.2f} (n={cell['n']})" if cell["n"] > 1 else "")


def _eps_text(eps: float) -> str:
    """0.1 -> "0.1"; 2/255 -> "2/255" (the paper's notation for CIFAR radii)."""
    short = f"{eps:g}"
    num = round(eps * 255)
    if len(short) > 5 and num > 0 and math.isclose(eps, num / 255, rel_tol=1e-6):
        return f"{num}/255"
    return short


def format_table(table: dict, fmt: str = "md") -> str:
    """The table as Markdown, CSV or JSON text."""
    if fmt == "json":
        return json.dumps(json_safe(table), indent=2, allow_nan=False)  # strict JSON: a missing value is null
    header = _header(table)
    keys = [(m, o) for m in table["metrics"] for o in table["optimizers"]]
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        for row in table["rows"]:
            cells = [row["cells"].get(m, {}).get(o) for m, o in keys]
            writer.writerow(
                [row["dataset"], f"{row['eps']:g}", row["relaxation"]]
                + ["" if c is None else f"{c['mean']:.4f}" for c in cells]
            )
        return buf.getvalue()
    if fmt != "md":
        raise ValueError(f"report format must be md, csv or json, got {fmt!r}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * len(keys)]
    for row in table["rows"]:
        cells = [_cell_text(row["cells"].get(m, {}).get(o)) for m, o in keys]
        lines.append(
            "| "
            + " | ".join(
                [
                    _DATASET_NAMES.get(row["dataset"], row["dataset"]),
                    _eps_text(row["eps"]),
                    _RELAXATION_NAMES.get(row["relaxation"], row["relaxation"]),
                ]
                + cells
            )
            + " |"
        )
    notes = ["Accuracies in %; Nat. natural, Adv. PGD, Cert. certified by sound bounds, Ver. complete verifier."]
    if any(c.get("single_method") for r in table["rows"] for by in r["cells"].values() for c in by.values()):
        notes.append("* best single bound method (the per-sample union was not stored).")
    if table["missing"]:
        notes.append(
            "No stored certification result (left out): "
            + ", ".join(table["missing"])
            + "; run `mpigls certify` or `mpigls report --certify`."
        )
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"
