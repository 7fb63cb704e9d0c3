"""The commands on finished or running runs: ``plot`` (training curves) and ``report`` (the results
table; with ``--certify`` it certifies runs without a stored result; study files give the study's
seed-aggregated tables)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mpigls.argtypes import count
from mpigls.commands.common import png_path, stored_problem

__all__ = ["COMMANDS", "add_parser", "run"]

COMMANDS = ("plot", "report")


def add_parser(sub) -> None:
    pl = sub.add_parser(
        "plot", help="training curves of run directories or checkpoints, overlaid (works while training)"
    )
    pl.add_argument(
        "paths", nargs="+", metavar="RUN_OR_CKPT", help="run directories (--out of train) or checkpoint files"
    )
    pl.add_argument("--out", default="metrics.png", help="PNG/PDF/SVG file, or a directory (writes DIR/metrics.png)")
    pl.add_argument(
        "--keys",
        default=None,
        help="comma-separated metric keys, one panel each (default: loss, "
        "validation accuracy, sigma, eps, lr, time panels)",
    )
    pl.add_argument(
        "--smooth", type=count(1), default=None, help="moving-average window for noisy curves (default: auto; 1: off)"
    )

    rp = sub.add_parser(
        "report", help="results table in the layout of the paper's Table 1 from stored certification results"
    )
    rp.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="run directories (or checkpoint files), or study files (mpigls study report: --out is then a folder)",
    )
    rp.add_argument("--format", choices=("md", "csv", "json"), default="md")
    rp.add_argument(
        "--certify",
        action="store_true",
        help="certify the latest checkpoint of runs without a stored result (writes DIR/certify_GENERATION.json)",
    )
    rp.add_argument("--out", default=None, help="also write the table to this file")


def run(args: argparse.Namespace, comm) -> int:
    return plot(args, comm) if args.command == "plot" else report(args, comm)


def plot(args: argparse.Namespace, comm) -> int:
    from mpigls import analysis
    from mpigls.analysis import plotting

    out = png_path(args.out, "metrics.png", inputs=args.paths)
    runs = analysis.load_runs(args.paths)
    if comm.is_root:
        keys = [k for k in args.keys.split(",") if k] if args.keys else None
        path = plotting.plot_runs(runs, out, keys=keys, window=args.smooth)
        print(f"wrote {path}")
    return 0


def report(args: argparse.Namespace, comm) -> int:
    from mpigls import analysis
    from mpigls.analysis import report as analysis_report
    from mpigls.run import rundir

    if args.out:  # before any work: never a checkpoint, a run's own file or one of the runs read
        rundir.refuse_output(args.out, "report --out", inputs=args.runs)
    if all(Path(r).suffix in (".yaml", ".yml") and Path(r).is_file() for r in args.runs):
        from mpigls.studies import (  # study files: seed-aggregated tables and figure
            cli as study_cli,
            runner as study_mod,
        )

        for path in args.runs:
            study = study_mod.load_study(path)
            if comm.is_root:
                study_cli.report(study, study_mod.Paths.default(study), args.out)
        return 0

    runs = analysis.load_runs(args.runs)
    if args.certify:  # rank 0 decides what is missing, so every rank certifies the same runs
        missing = comm.bcast_obj([analysis_report.run_result(run)[0] is None for run in runs])
        runs = [certify_run(run, comm) if miss else run for run, miss in zip(runs, missing)]
    if comm.is_root:
        text = analysis_report.format_table(analysis_report.build_table(runs), args.format)
        if args.out:
            Path(args.out).write_text(text)
        print(text, end="")
    return 0


def certify_run(run, comm):
    """Certify the run's newest checkpoint as configured; store DIR/certify_GENERATION.json."""
    import time

    from mpigls import analysis
    from mpigls.evaluation import certify
    from mpigls.run import checkpoint, rundir

    if run.checkpoint_path is None:
        raise FileNotFoundError(f"run {run.label} has no checkpoint to certify yet")
    prob = stored_problem(str(run.checkpoint_path), comm)
    cfg, ckpt = prob.cfg, prob.ckpt
    t0 = time.perf_counter()
    x, y = prob.test_examples()
    res = certify.evaluate_configured(cfg, prob.model, prob.theta, x, y, comm=comm)
    if comm.is_root:
        rundir.write_json(
            run.directory / f"certify_{ckpt.generation:08d}.json",
            {
                "generation": ckpt.generation,
                "theta_sha256": checkpoint.theta_sha256(ckpt.theta),
                "checkpoint": str(run.checkpoint_path),
                "methods": list(cfg.eval.methods),
                "time_s": time.perf_counter() - t0,
                **res,
            },
        )
    comm.barrier()
    return analysis.load_run(run.path, label=run.label)
