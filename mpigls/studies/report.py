"""The results of a study: seeds aggregated (mean ± sample std, n), configurations chosen on the
validation split, a compact Markdown table and a figure in the manner of the paper's Fig. 1.

Input: the run records of ``mpigls.studies.runner`` (one JSON per finished run). Records are grouped by
(global axes group, row, configuration); each group of seeds gives, per metric, the mean, the
sample standard deviation (ddof = 1; none for a single seed) and n. Per (group, row), the
configuration with the best mean **validation** value of the study's ``select`` metric (default
``certified``, the union of the certificates; ties: higher validation natural accuracy, then the
first configuration) is the row's selected configuration; its **test** metrics are the table's
row. The test numbers of the other configurations are never looked at for the choice.
Accuracies are percentages.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Stat", "aggregate", "build", "format_markdown", "plot", "metric_columns"]

_TITLES = {"natural": "Nat.", "adversarial": "PGD", "certified": "Union", "verified": "Verified"}
_OPTIMIZER_COLORS = {"grad": "#4c72b0", "pgpe": "#dd8452", "rgs": "#55a868"}


@dataclasses.dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation (ddof = 1; None for n = 1) and count of some values."""

    mean: float
    std: float | None
    n: int

    def text(self, digits: int = 1) -> str:
        if self.std is None:
            return f"{self.mean:.{digits}f} (n={self.n})"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f} (n={self.n})"


def aggregate(values: list[float | None]) -> Stat:
    """Mean, sample std and n of finite values (NaN/None left out); n = 0 gives a NaN mean."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return Stat(math.nan, None, 0)
    return Stat(float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else None, int(v.size))


def metric_columns(records: list[dict]) -> list[str]:
    """natural, adversarial, certified/<method> (in record order), certified (union), verified."""
    methods: list[str] = []
    for rec in records:
        for k in rec.get("test", {}):
            if k.startswith("certified/") and k not in methods:
                methods.append(k)
    cols = ["natural", "adversarial", *methods, "certified"]
    if any("verified" in rec.get("test", {}) for rec in records):
        cols.append("verified")
    return cols


def _title(col: str) -> str:
    if col.startswith("certified/"):
        return "Cert. " + {"ibp": "IBP", "deeppoly": "DeepPoly", "crown": "CROWN"}.get(col[10:], col[10:])
    return _TITLES.get(col, col)


def _stats(recs: list[dict], split: str, cols: list[str]) -> dict[str, Stat]:
    return {c: aggregate([100.0 * r[split][c] if r[split].get(c) is not None else None for r in recs]) for c in cols}


def build(records: list[dict], select: str = "certified", row_order: list[str] | None = None) -> dict:
    """The study's results as data: ``configurations`` (every configuration tried, with its
    validation and test statistics and cost) and ``rows`` (per group and row, the configuration
    chosen on validation), rows in ``row_order`` (the study's) when given."""
    cols = metric_columns(records)
    if row_order:
        rank = {name: i for i, name in enumerate(row_order)}
        records = sorted(records, key=lambda r: (r.get("group", ""), rank.get(r["row"], len(rank))))
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for rec in records:
        groups.setdefault((rec.get("group", ""), rec["row"], rec.get("configuration", "")), []).append(rec)
    order: list[tuple[str, str]] = []
    for group, row, _ in groups:
        if (group, row) not in order:
            order.append((group, row))
    configurations = []
    for (group, row, conf), recs in groups.items():
        cfg = recs[0].get("config", {})
        configurations.append(
            {
                "group": group,
                "row": row,
                "configuration": conf,
                "optimizer": cfg.get("optimizer", {}).get("name", "?"),
                "bound": cfg.get("bound", {}).get("method", "?"),
                "seeds": sorted(r["seed"] for r in recs),
                "validation": _stats(recs, "validation", cols),
                "test": _stats(recs, "test", cols),
                "cost_s": float(sum(sum(v for v in r.get("cost_s", {}).values() if v) for r in recs)),
            }
        )
    rows = []
    for group, row in order:
        cands = [c for c in configurations if (c["group"], c["row"]) == (group, row)]

        def score(c: dict) -> tuple[float, float]:
            val = c["validation"]
            sel = val.get(select, Stat(math.nan, None, 0)).mean
            nat = val["natural"].mean
            return (sel if math.isfinite(sel) else -math.inf, nat if math.isfinite(nat) else -math.inf)

        best = max(cands, key=score)  # max keeps the first of equals
        rows.append({**best, "num_configurations": len(cands)})
    return {"columns": cols, "select": select, "configurations": configurations, "rows": rows}


def format_markdown(result: dict) -> str:
    """The selected rows (test, mean ± std (n)) per group, then every configuration tried
    (validation, cost)."""
    cols, sel = result["columns"], result["select"]
    out = []
    groups = list(dict.fromkeys(r["group"] for r in result["rows"]))
    for group in groups:
        out.append(
            f"**Test set{', ' + group if group else ''}** (configuration chosen on validation {_title(sel)}; "
            "accuracies in %, mean ± sample std over seeds)\n"
        )
        out.append("| Row | Configuration | " + " | ".join(_title(c) for c in cols) + " |")
        out.append("|---|---|" + "---:|" * len(cols))
        for r in (r for r in result["rows"] if r["group"] == group):
            conf = r["configuration"] or "–"
            if r["num_configurations"] > 1:
                conf += f" (best of {r['num_configurations']})"
            out.append(f"| {r['row']} | {conf} | " + " | ".join(r["test"][c].text() for c in cols) + " |")
        out.append("")
    out.append(
        "**Every configuration tried** (validation split, mean over seeds; cost: training and evaluation, "
        "all seeds, core-hours at one thread per run)\n"
    )
    out.append("| Group | Row | Configuration | Seeds | Val. Nat. | Val. " + _title(sel) + " | Cost (h) |")
    out.append("|---|---|---|---|---:|---:|---:|")
    for c in result["configurations"]:
        out.append(
            f"| {c['group'] or '–'} | {c['row']} | {c['configuration'] or '–'} | {len(c['seeds'])} | "
            f"{c['validation']['natural'].text()} | {c['validation'][sel].text()} | {c['cost_s'] / 3600:.2f} |"
        )
    return "\n".join(out) + "\n"


def to_json(result: dict) -> str:
    def conv(obj: Any) -> Any:
        if isinstance(obj, Stat):
            return {"mean": conv(obj.mean), "std": conv(obj.std), "n": obj.n}
        if isinstance(obj, dict):
            return {k: conv(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [conv(v) for v in obj]
        if isinstance(obj, float) and not math.isfinite(obj):
            return None  # strict JSON: no bare NaN
        return obj

    return json.dumps(conv(result), indent=2, allow_nan=False) + "\n"


def plot(result: dict, out: str | Path, metric: str = "certified", title: str = "") -> Path:
    """Bars of the selected rows' test ``metric`` (mean, error bar: sample std), one panel per
    group, coloured by optimizer (the layout of the paper's Fig. 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(r["group"] for r in result["rows"])) or [""]
    fig, axes = plt.subplots(1, len(groups), figsize=(max(4.0, 1.1 * len(result["rows"]) + 1.5), 3.6), squeeze=False)
    for ax, group in zip(axes[0], groups):
        rows = [r for r in result["rows"] if r["group"] == group]
        stats = [r["test"][metric] for r in rows]
        x = np.arange(len(rows))
        ax.bar(
            x,
            [s.mean for s in stats],
            yerr=[s.std or 0.0 for s in stats],
            capsize=4,
            color=[_OPTIMIZER_COLORS.get(r["optimizer"], "#8c8c8c") for r in rows],
        )
        for xi, s in zip(x, stats):
            ax.text(xi, s.mean + (s.std or 0.0) + 0.5, f"n={s.n}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, [r["row"] for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_title(" ".join(t for t in (title, group) if t), fontsize=9)
        ax.set_ylabel(f"test {_title(metric)} accuracy (%)" if metric != "certified" else "certified accuracy (%)")
        ax.grid(axis="y", alpha=0.3)
        top = max((s.mean + (s.std or 0.0) for s in stats if math.isfinite(s.mean)), default=1.0)
        ax.set_ylim(0, max(1.0, 1.15 * top + 1.0))  # accuracies: the error bar is clipped at 0
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _OPTIMIZER_COLORS.values()]
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    fig.legend(handles, [k.upper() for k in _OPTIMIZER_COLORS], loc="center right", fontsize=8)
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
