"""``mpigls study run | status | verify | adopt | report``: the command line of ``mpigls.studies.runner`` and
``mpigls.studies.report`` (one process; each run trains in its own process with one thread).

    mpigls study run configs/studies/digits-pilot.yaml --jobs 2     # resumable: run it again to continue
    mpigls study status configs/studies/digits-pilot.yaml           # every run and its state
    mpigls study report configs/studies/digits-pilot.yaml           # table.md, table.json, figure.png
    mpigls study adopt NEW.yaml --from OLD.yaml   # copy OLD's finished runs with identical settings
    mpigls study verify STUDY --time-limit 2      # add the complete verifier to finished runs
    mpigls study run STUDY --stage 0 --index $SLURM_ARRAY_TASK_ID  # one run (a SLURM array task)

Exit codes of ``study run`` (those of ``mpigls train``): 0 when nothing failed, also when runs were
paused by ``--max-generations`` (a deliberate stop, as ``train --max-generations``: the next
``study run`` resumes them; a job script must not requeue) or when a run is trained by another
``study run`` at the same time (this one waits for it); 3 when a signal stopped runs at a
checkpoint (preempted: requeue, the next ``study run`` resumes them); 1 when a run failed or a run
could not start because its warm start failed or is missing; 2 for a user error (the study file, a
damaged record). ``study verify`` exits 1 when a record does not reproduce (it is moved aside).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mpigls.argtypes import count, number
from mpigls.studies import runner as study_mod

EXIT_FAILED = 1
EXIT_PREEMPTED = 3  # mpigls.parallel.EXIT_PREEMPTED: stopped by a signal at a checkpoint, requeue

__all__ = ["add_parser", "run", "report", "exit_code"]


def add_parser(sub) -> None:
    st = sub.add_parser("study", help="run, follow and report a grid of runs described in one YAML file")
    ssub = st.add_subparsers(dest="study_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("study", help="study YAML file (see docs/study.md)")
        p.add_argument("--runs", default=None, help="run directories (default: runs/studies/NAME)")
        p.add_argument("--results", default=None, help="run records (default: results/studies/NAME)")

    r = ssub.add_parser("run", help="train, evaluate and record every unfinished run (resumable)")
    common(r)
    r.add_argument("--jobs", type=count(1), default=1, help="runs trained at once, each one process with one thread")
    r.add_argument("--only", default=None, help="comma-separated run ids (default: every run)")
    r.add_argument("--stage", type=count(0), default=None, help="with --index: the stage of the run (SLURM arrays)")
    r.add_argument("--index", type=count(0), default=None, help="with --stage: run the INDEX-th run of that stage only")
    r.add_argument("--inline", action="store_true", help="train in this process, one run after the other")
    r.add_argument(
        "--max-generations",
        type=count(1),
        default=None,
        help="stop each run after this many generations (a smoke test)",
    )
    s = ssub.add_parser("status", help="every run of a study with its stage and state")
    common(s)
    v = ssub.add_parser("verify", help="add the complete verifier's test result to finished runs evaluated without it")
    common(v)
    v.add_argument(
        "--time-limit", type=number(0, what="0: none"), default=10.0, help="verifier seconds per test example (0: none)"
    )
    v.add_argument("--max-domains", type=count(1), default=None, help="verifier branch-and-bound domains per example")
    v.add_argument("--only", default=None, help="comma-separated run ids (default: every finished run)")
    a = ssub.add_parser(
        "adopt", help="copy the finished runs of another study whose settings are identical, instead of training them"
    )
    common(a)
    a.add_argument("--from", dest="source", required=True, help="the other study's YAML file")
    a.add_argument("--from-runs", default=None, help="its run directories (default: runs/studies/ITS_NAME)")
    a.add_argument("--from-results", default=None, help="its run records (default: results/studies/ITS_NAME)")
    p = ssub.add_parser("report", help="seed-aggregated tables (Markdown, JSON) and a figure of the finished runs")
    common(p)
    p.add_argument("--out", default=None, help="output folder (default: the results folder)")


def _select(runs: list, args) -> list[str] | None:
    if args.stage is not None or args.index is not None:
        if args.stage is None or args.index is None:
            raise ValueError("--stage and --index go together (a SLURM array task: --index $SLURM_ARRAY_TASK_ID)")
        stage = [r for r in runs if r.stage == args.stage]
        if not 0 <= args.index < len(stage):
            raise ValueError(
                f"--index {args.index} is out of range: stage {args.stage} has {len(stage)} runs (0..{len(stage) - 1})"
            )
        return [stage[args.index].id]
    return _ids(args.only)


def _ids(text: str | None) -> list[str] | None:
    """``--only ID,ID``: the run ids, None when not given."""
    return [x for x in text.split(",") if x] if text else None


def run(args) -> int:
    study = study_mod.load_study(args.study)
    paths = study_mod.Paths.default(study, args.runs, args.results)
    if args.study_command == "run":
        only = _select(study_mod.expand(study), args)
        inline = args.inline or (only is not None and len(only) == 1 and args.stage is not None)
        outcome = study_mod.run_study(
            study, paths, jobs=args.jobs, inline=inline, only=only, max_generations=args.max_generations
        )
        print(f"[study] {study.name}: " + _counts(outcome.values()), flush=True)
        return exit_code(outcome)
    if args.study_command == "verify":
        try:
            done = study_mod.verify_finished(
                study, paths, time_limit=args.time_limit or None, max_domains=args.max_domains, only=_ids(args.only)
            )
        except study_mod.RecordMismatch as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return EXIT_FAILED
        print(f"[study] {study.name}: complete verifier added to {len(done)} run(s)", flush=True)
        return 0
    if args.study_command == "adopt":
        from mpigls.studies import adopt as adopt_mod

        source = study_mod.load_study(args.source)
        source_paths = study_mod.Paths.default(source, args.from_runs, args.from_results)
        adopted = adopt_mod.adopt(study, paths, source, source_paths)
        print(f"[study] {study.name}: adopted {len(adopted)} run(s) from {source.name}", flush=True)
        return 0
    if args.study_command == "status":
        rows = study_mod.status(study, paths)
        width = max(len(r.id) for r, _ in rows)
        for r, state in rows:
            print(f"{r.stage}  {r.id:{width}s}  {state}")
        stages = sorted({r.stage for r, _ in rows})
        print(
            f"{study.name}: {len(rows)} runs in {len(stages)} stage(s) ("
            + ", ".join(f"stage {s}: {sum(r.stage == s for r, _ in rows)}" for s in stages)
            + "); "
            + _counts(state for _, state in rows)
        )
        unchecked = study_mod.records_mod.unchecked(
            [rec for r, s in rows if s == "finished" and (rec := study_mod.read_record(paths.record(r)))]
        )
        if unchecked:
            print(f"note: {unchecked} record(s) of format 1 carry no checksum: an edit to them cannot be detected")
        return 0
    return report(study, paths, args.out)


def _counts(states) -> str:
    counts: dict[str, int] = {}
    for state in states:
        key = state.split(" (")[0]
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))


def exit_code(outcome: dict[str, str]) -> int:
    """``study run``'s exit code from the state of each run (see the module docstring)."""
    states = list(outcome.values())
    if any(s.startswith(("failed", "blocked")) for s in states):
        return EXIT_FAILED
    if any(s == "interrupted" or s.startswith("not started (stopped)") for s in states):
        return EXIT_PREEMPTED
    return 0


def report(study: study_mod.Study, paths: study_mod.Paths, out_dir: str | None = None) -> int:
    """Write table.md, table.json and figure.png of a study's finished runs into ``out_dir``
    (default: the results folder) and print the Markdown table. Each file is written whole or not at
    all (a temporary file renamed over it: a link there is replaced, never written through), after
    the checks that it may be written."""
    from mpigls.studies import report as study_report

    out = Path(out_dir) if out_dir else paths.results
    targets = _report_targets(out)
    records, notes = study_mod.current_records(study, paths)
    for note in notes:
        print(f"note: {note}", file=sys.stderr, flush=True)
    if not records:
        raise FileNotFoundError(f"no finished runs in {paths.results}; run `mpigls study run {study.path}` first")
    result = study_report.build(records, study.select, [r.name for r in study.rows])
    out.mkdir(parents=True, exist_ok=True)
    md = study_report.format_markdown(result)
    _replace(targets[0], lambda tmp: tmp.write_text(md))
    _replace(targets[1], lambda tmp: tmp.write_text(study_report.to_json(result)))
    _replace(targets[2], lambda tmp: study_report.plot(result, tmp, title=study.name))
    print(md, end="")
    print(f"wrote {targets[0]}, {targets[1]}, {targets[2]} ({len(records)} runs)")
    return 0


def _report_targets(out: Path) -> list[Path]:
    """The report's three files in ``out``, refused before any work when ``out`` is not a folder or a
    file there may not be replaced (a FIFO, a device, a checkpoint: ``rundir.refuse_output``)."""
    from mpigls.run import rundir

    if out.exists() and not out.is_dir():
        raise study_mod.StudyError(
            f"--out {str(out)!r} exists and is not a folder; the report writes table.md, table.json and figure.png "
            "into a folder: name a folder (a new one is made)"
        )
    return [rundir.refuse_output(out / name, "--out") for name in ("table.md", "table.json", "figure.png")]


def _replace(path: Path, write) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it over ``path``."""
    import os

    tmp = path.with_name(f".{path.stem}-{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
