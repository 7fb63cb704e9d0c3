"""Turn benchmark records into dated markdown result files: benchmarks/results/YYYY-MM-DD-<name>.md.

    python -m benchmarks.make_results                       # every record under benchmarks/records/
    python -m benchmarks.make_results benchmarks/records/2026-12-06T0150*.json

Records are grouped by the day (UTC) they were written and their benchmark; each group becomes one
file with one section per record: a link to the record, its exact command, commit, machine, torch
version and date, then its tables (every list of rows under ``results``, e.g. ``rows``, ``strong``;
dicts of dicts become rows too). Every row of a table is thus traceable to the record it came from.
The files are regenerated from the records, never edited by hand; ``results/README.md`` lists them.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Iterable
from pathlib import Path

from benchmarks import common

RESULTS = Path(__file__).resolve().parent / "results"

# file name and title of each benchmark's results
NAMES = {
    "bench_bounds": ("bounds-speed", "Bound methods: seconds and peak memory per batch"),
    "bench_control_variate": (
        "control-variate",
        "PGPE generation with and without the control variate (grad, running) on the same network and batch",
    ),
    "bench_deeppoly_generation": (
        "deeppoly-generation",
        "PGPE + DeepPoly generation on one core: matrix mode, the row engines, the auto_LiRPA member loop",
    ),
    "bench_generation": (
        "generation-time",
        "Seconds per PGPE generation: the population's bounds and the training step",
    ),
    "bench_hostmem": ("hostmem", "Training with and without the host allocator setting"),
    "bench_ibp_evotorch": ("ibp-evotorch", "PGPE + IBP generation: chunked, unchunked and EvoTorch"),
    "bench_monitor": ("monitor", "Cost of live monitoring"),
    "bench_noise": ("noise", "PGPE noise generation options"),
    "bench_numerics": ("numerics", "Numeric settings: speed, bound gaps, certification margin"),
    "bench_pgpe_update": ("pgpe-update", "PGPE update per rank: the distributed update and the regenerating one"),
    "bench_rank_work": ("rank-work", "Per-rank work of one PGPE generation"),
    "bench_recipes": ("recipe-cost", "The paper's recipes: CPU core-seconds per generation, projected core-hours"),
    "scaling": ("scaling", "Strong and weak scaling of mpigls train"),
    "scaling_model": ("scaling-model", "Scaling model of one PGPE generation on N GPUs"),
}

# the columns shown per benchmark and table (all scalar columns where not listed); the record has every field
COLUMNS = {
    ("bench_bounds", "rows"): [
        "device",
        "model",
        "data",
        "method",
        "batch",
        "bound_nograd_s",
        "bound_nograd_s_range",
        "bound_grad_backward_s",
        "bound_grad_backward_s_range",
        "peak_mb",
        "mean_lb",
    ],
    ("bench_generation", "rows"): [
        "device",
        "model",
        "data",
        "method",
        "popsize",
        "batch",
        "network",
        "unstable_fraction",
        "bound_s",
        "bound_s_range",
        "member_examples_per_s",
        "generation_s",
        "generation_s_range",
        "peak_mb",
        "auto_lirpa_s",
        "speedup_vs_auto_lirpa",
        "speedup_vs_auto_lirpa_range",
        "evotorch_s",
        "speedup_vs_evotorch",
        "speedup_vs_evotorch_range",
    ],
}


def fmt(value) -> str:
    """A table cell: 4 significant digits, a [low, high] pair as low–high, missing values as –."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return f"{fmt(float(value[0]))}–{fmt(float(value[1]))}"
    if isinstance(value, (list, tuple, dict)):
        return f"`{value}`".replace("|", "\\|")
    return str(value).replace("|", "\\|")


def tables(results) -> dict[str, list[dict]]:
    """The tables of a record's results: lists of dicts, and dicts whose values are all dicts (keyed rows)."""
    if not isinstance(results, dict):
        return {}
    out = {}
    for key, value in results.items():
        if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            out[key] = value
        elif isinstance(value, dict) and value and all(isinstance(r, dict) for r in value.values()):
            out[key] = [{"key": k, **r} for k, r in value.items()]
    return out


def _shown(value) -> bool:
    return not isinstance(value, (dict, list)) or (
        isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
    )


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A markdown table of ``rows`` with ``columns`` (default: every scalar or range column, first-seen order)."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k, v in r.items() if _shown(v)))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def machine_line(m: dict) -> str:
    parts = [f"{m.get('cpu')}, {m.get('cpus')} CPUs ({m.get('cpus_usable')} usable)"]
    if m.get("load_average"):
        parts.append("load average (1/5/15 min) " + " / ".join(str(x) for x in m["load_average"]))
    parts.append(f"GPU: {m.get('gpu') or 'none'}")
    parts.append(f"{m.get('system')}, {m.get('arch')}, node `{m.get('node')}`")
    if m.get("note"):
        parts.append(f"note: {m['note']}")
    return "; ".join(parts)


def section(record: dict, path: Path, out_dir: Path, index: int) -> str:
    """The markdown of one record: where it lies, how it was made, its tables and scalar results."""
    link = Path(os.path.relpath(path.resolve(), out_dir.resolve())).as_posix()
    commit = record.get("commit") or "unknown"
    dirty = " (with uncommitted changes)" if record.get("dirty") else ""
    lines = [
        f"## Record {index}: [`{path.name}`]({link})",
        "",
        f"- command: `{record.get('command')}`",
        f"- commit: `{commit[:12]}`{dirty}",
        f"- machine: {machine_line(record.get('machine') or {})}",
        f"- torch {record.get('torch')}, Python {record.get('python')}, {record.get('threads')} torch thread(s)",
        f"- date: {record.get('date')} ({record.get('duration_s')} s)",
    ]
    results = record.get("results")
    for name, rows in tables(results).items():
        lines += ["", f"### {name}", "", table(rows, COLUMNS.get((record["benchmark"], name)))]
    scalars = {k: v for k, v in (results or {}).items() if not isinstance(v, (dict, list))}
    if scalars:
        lines += [""] + [f"- {k}: {fmt(v)}" for k, v in scalars.items()]
    return "\n".join(lines)


def result_name(record: dict) -> tuple[str, str]:
    """(YYYY-MM-DD-<name>, title) of the result file a record belongs to."""
    name, title = NAMES.get(record["benchmark"], (record["benchmark"], record["benchmark"]))
    return f"{record['date'][:10]}-{name}", title


def write_results(paths: Iterable[Path], out_dir: Path = RESULTS) -> list[Path]:
    """Write one result file per (day, benchmark) of the records at ``paths`` and the index; their paths."""
    groups: dict[str, list[tuple[dict, Path]]] = {}
    titles = {}
    for path in sorted(Path(p) for p in paths):
        record = common.load_record(path)
        stem, titles[stem] = result_name(record)
        groups.setdefault(stem, []).append((record, path))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, members in sorted(groups.items()):
        members.sort(key=lambda rp: rp[0]["date"])
        body = [
            f"# {titles[stem]} ({stem[:10]})",
            "",
            "Generated by `python -m benchmarks.make_results` from the records linked below (do not edit by "
            "hand); what each column means: [docs/benchmarks.md](../../docs/benchmarks.md).",
        ]
        body += ["", *(section(r, p, out_dir, i + 1) + "\n" for i, (r, p) in enumerate(members))]
        target = out_dir / f"{stem}.md"
        target.write_text("\n".join(body).rstrip() + "\n")
        written.append(target)
    write_index(out_dir)
    return written


def write_index(out_dir: Path) -> Path:
    """results/README.md: every result file, newest first."""
    files = sorted((p for p in out_dir.glob("*.md") if p.name != "README.md"), reverse=True)
    lines = [
        "# Benchmark results",
        "",
        "Dated tables generated from the records in [../records/](../records/) by "
        "`python -m benchmarks.make_results`; how to run each benchmark: "
        "[docs/benchmarks.md](../../docs/benchmarks.md).",
        "",
        *(f"- [{p.stem}]({p.name})" for p in files),
    ]
    index = out_dir / "README.md"
    index.write_text("\n".join(lines) + "\n")
    return index


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("records", nargs="*", help="record files (default: every *.json under benchmarks/records/)")
    ap.add_argument("--out-dir", default=str(RESULTS), help="where the result files go (default: benchmarks/results)")
    args = ap.parse_args(argv)
    paths = [Path(p) for p in args.records] or sorted(common.RECORDS.rglob("*.json"))
    if not paths:
        raise SystemExit(f"no records given and none under {common.RECORDS}: run a benchmark first")
    for path in write_results(paths, Path(args.out_dir)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
