"""Command line: ``mpigls train | certify | inspect | landscape | plot | report | tightness | recipes | export | data``.

One process:      mpigls train configs/quickstart.yaml --out runs/quick
Built-in recipe:  mpigls train quickstart --out runs/quick       (``mpigls recipes`` lists them)
Two MPI ranks:    mpiexec -n 2 python -m mpi4py -m mpigls train configs/quickstart.yaml --out runs/quick
SLURM:            srun python -m mpi4py -m mpigls train configs/mnist-cnn3-deeppoly-pgpe.yaml --out $SCRATCH/run1

``python -m mpi4py`` makes an uncaught exception on any rank abort the whole job instead of
hanging it. ``main(argv)`` is the only place that reads argv or exits. Exit codes: 0 success,
1 runtime failure, 2 user error (bad config, bad input file), 3 stopped by SIGTERM/SIGUSR1 after a
checkpoint (requeue and run the same command to resume).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from mpigls import __version__, config as config_mod, parallel, recipes
from mpigls.numerics import precision

__all__ = ["main", "build_parser"]

USER_ERRORS = (ValueError, TypeError, FileNotFoundError, KeyError)


def _add_overrides(parser: argparse.ArgumentParser, text: str) -> None:
    """``--set SECTION.KEY=VALUE`` (repeatable) into ``args.overrides``."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpigls", description="MPI-parallel certified training with Gaussian Loss Smoothing."
    )
    parser.add_argument("--version", action="version", version=f"mpigls {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="train (or resume) from a YAML config")
    tr.add_argument(
        "config",
        nargs="?",
        help="YAML config file, or the name of a built-in recipe (`mpigls recipes`) when no such file "
        "exists (default: built-in defaults)",
    )
    tr.add_argument("--out", required=True, help="output directory: checkpoints, DIR/latest.h5, metrics")
    tr.add_argument(
        "--max-generations",
        type=int,
        default=None,
        help="stop cleanly after this many generations in total (with a checkpoint); a later call continues",
    )
    _add_overrides(tr, "override a config key (repeatable), e.g. --set optimizer.popsize=64")
    tr.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    tr.add_argument("--dry-run", action="store_true", help="validate config and data, print a summary, do not train")
    tr.add_argument("--no-eval", action="store_true", help="skip the final test-set certification")
    tr.add_argument(
        "--restart",
        action="store_true",
        help="start from generation 0 even if --out holds an earlier run: its files are moved into "
        "OUT/aside-<UTC time>/ (never deleted). Needed when --out holds checkpoints none of which "
        "loads",
    )

    ce = sub.add_parser("certify", help="natural, PGD, certified and complete-verifier accuracy of a checkpoint")
    ce.add_argument(
        "checkpoint",
        help="a checkpoint file, a run directory (its newest loadable checkpoint), or an ONNX / PyTorch network "
        "with --config",
    )
    ce.add_argument(
        "--pgd-restarts", type=int, default=1, help="PGD restarts per sample (a sample is robust if all fail)"
    )
    ce.add_argument(
        "--verify", action="store_true", help="run the complete verifier on every sample no bound certifies"
    )
    ce.add_argument("--time-limit", type=float, default=60.0, help="complete verifier: seconds per sample (0: none)")
    ce.add_argument(
        "--max-domains", type=int, default=None, help="complete verifier: branch-and-bound domains per sample"
    )
    ce.add_argument(
        "--results", default=None, help="per-sample results JSON (default: CKPT_DIR/<ckpt stem>.certify-eps<eps>.json)"
    )
    ce.add_argument(
        "--methods", default=None, help="comma-separated bound methods (default: the config's eval.methods)"
    )
    ce.add_argument("--eps", type=float, default=None, help="radius (default: the config's bound.eps)")
    ce.add_argument("--num-test", type=int, default=None, help="first N test examples")
    _add_overrides(ce, "override a key of the checkpoint's config, e.g. --set data.root=/data")
    ce.add_argument(
        "--config",
        default=None,
        help="for an ONNX (.onnx) or PyTorch state dict (.pt) network: the YAML config naming its model and data",
    )
    ce.add_argument("--json", action="store_true", help="print JSON")

    ins = sub.add_parser("inspect", help="summary of a checkpoint")
    ins.add_argument("checkpoint", help="a checkpoint file, or a run directory (its newest loadable checkpoint)")
    ins.add_argument("--json", action="store_true", help="print JSON (generation, theta_sha256, last metrics, ...)")

    la = sub.add_parser(
        "landscape", help="original vs Gaussian-smoothed loss along the DeepPoly gradient (paper Fig. 6)"
    )
    la.add_argument("checkpoint")
    la.add_argument("--out", default="landscape.png", help="PNG path")
    la.add_argument("--sigmas", default="1e-3,1e-2", help="comma-separated sigmas")
    la.add_argument("--methods", default="ibp,crown-ibp,deeppoly", help="comma-separated relaxations")
    la.add_argument("--num-samples", type=int, default=32, help="Gaussian samples per point")
    la.add_argument("--num-points", type=int, default=21, help="points along the direction")
    la.add_argument(
        "--radius", type=float, default=None, help="largest step along the direction (default: 5 * max sigma)"
    )
    la.add_argument("--batch-size", type=int, default=64, help="training examples used for the loss")

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
        "--smooth", type=int, default=None, help="moving-average window for noisy curves (default: auto; 1: off)"
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

    ti = sub.add_parser(
        "tightness", help="certified accuracy over radius per relaxation and its area (Jovanovic et al. 2022)"
    )
    ti.add_argument("checkpoint")
    ti.add_argument("--out", default="tightness.png", help="PNG path (the JSON goes beside it, .json)")
    ti.add_argument("--methods", default="ibp,hbox,crown-ibp,deeppoly", help="comma-separated relaxations")
    ti.add_argument("--max-eps", type=float, default=None, help="largest radius (default: 2 * the config's bound.eps)")
    ti.add_argument("--num-radii", type=int, default=11, help="radii from 0 to --max-eps")
    ti.add_argument(
        "--num-test", type=int, default=None, help="first N test examples (default: the config's eval.num_test)"
    )

    ex = sub.add_parser(
        "export", help="a checkpoint's network as ONNX, and VNN-LIB robustness properties for external verifiers"
    )
    ex.add_argument("checkpoint")
    ex.add_argument("--onnx", required=True, help="ONNX file to write (float32, opset 13, normalisation included)")
    ex.add_argument(
        "--vnnlib",
        default=None,
        metavar="DIR",
        help="also write one VNN-LIB property per test sample and instances.csv",
    )
    ex.add_argument(
        "--eps", type=float, default=None, help="radius of the properties (default: the config's bound.eps)"
    )
    ex.add_argument(
        "--num-test", type=int, default=None, help="first N test examples (default: the config's eval.num_test or all)"
    )
    ex.add_argument("--timeout", type=float, default=60.0, help="seconds per instance written into instances.csv")
    ex.add_argument(
        "--dynamic-batch",
        action="store_true",
        help="symbolic batch dimension (default: batch 1, as VNN-COMP tools expect)",
    )
    _add_overrides(ex, "override a key of the checkpoint's config, e.g. --set data.root=/data")

    da = sub.add_parser("data", help="dataset tools: `mpigls data fetch mnist --root DIR` downloads a dataset")
    dsub = da.add_subparsers(dest="data_command", required=True)
    fe = dsub.add_parser("fetch", help="download MNIST or CIFAR-10 with torchvision (md5 checked) into --root")
    fe.add_argument("name", choices=("mnist", "cifar10"))
    fe.add_argument("--root", required=True, help="the directory to use as data.root")
    fe.add_argument("--mirror", default=None, help="URL prefix of a server holding the same files (a site mirror)")

    cf = sub.add_parser("config", help="list every config key with its default and meaning")
    cf.add_argument("--markdown", action="store_true")

    rc = sub.add_parser(
        "recipes", help="the built-in configs (`mpigls train NAME` runs one) and job scripts: list, show, copy"
    )
    rc.add_argument(
        "action",
        nargs="?",
        choices=("list", "show", "copy", "path"),
        default="list",
        help="list (default); show NAME: print it; copy NAME [DIR]: write it into DIR to edit; path NAME: its file",
    )
    rc.add_argument("name", nargs="?", help="a name from the list, e.g. quickstart or paper/mnist-0.1-cnn3-ibp-grad")
    rc.add_argument("dir", nargs="?", default=".", help="copy: the directory to write into (default: .)")
    rc.add_argument("--jobs", action="store_true", help="the job scripts (SLURM, mpirun) instead of the configs")
    rc.add_argument("--force", action="store_true", help="copy: overwrite an existing file")
    from mpigls.studies import cli as study_cli, diagnose

    study_cli.add_parser(sub)
    diagnose.add_parser(sub)
    return parser


def _train_config(args) -> str | None:
    """The config file ``mpigls train`` reads: the argument when a file exists there, else the built-in recipe."""
    return None if args.config is None else recipes.resolve_config(args.config)


def _cmd_train(args, comm) -> int:
    cfg = config_mod.load_config(_train_config(args), args.overrides)
    if args.print_config:
        if comm.is_root:
            import yaml

            print(yaml.safe_dump(config_mod.to_dict(cfg), sort_keys=False), end="")
        return 0
    from mpigls.run import train as train_mod

    if args.dry_run:
        from mpigls.run import preflight, rundir

        if cfg.data.download:
            from mpigls.interop import fetch

            fetch.ensure(comm, cfg.data.name, cfg.data.root, say=print if comm.is_root else lambda m: None)
        dataset, model, arch = train_mod.build_problem(cfg)

        def plan_run() -> str:
            from mpigls.run import runlock

            if Path(args.out).is_dir():  # a directory in use: train would be refused
                runlock.check_free(args.out, cfg.train.lock_stale_s)
            return rundir.describe(args.out, restart=args.restart)

        plan = train_mod._root_load(comm, plan_run)
        preflight.validate(cfg, dataset, model, comm, arch=None if plan.startswith("resume") else arch)
        if comm.is_root:
            from mpigls.nn.models import num_params

            print(
                f"config ok: {cfg.optimizer.name} + {cfg.bound.method} on {cfg.data.name} "
                f"({len(dataset.train_y)} train / {len(dataset.test_y)} test, shape {dataset.in_shape}); "
                f"{cfg.model.name} with D={num_params(model)} parameters; {comm.world_size} rank(s); "
                f"would {plan}"
            )
        return 0
    result = train_mod.train(cfg, args.out, comm, max_generations=args.max_generations, restart=args.restart)
    if result.stopped_by_signal:
        return parallel.EXIT_PREEMPTED
    if not args.no_eval and result.finished:
        res = _final_eval(cfg, result, comm)
        if comm.is_root:
            from mpigls.run import checkpoint, rundir

            rundir.write_json(
                Path(args.out) / EVAL_FILE,
                {
                    "generation": result.generation,
                    "theta_sha256": checkpoint.theta_sha256(result.theta.numpy()),
                    "checkpoint": result.checkpoint_path,
                    "methods": list(cfg.eval.methods),
                    **res,
                },
            )
    return 0


EVAL_FILE = "eval.json"  # the final test evaluation of a finished run, next to its checkpoints


@precision.strict_fp32()  # eval.json is a certificate: true fp32 (certify.evaluate also enters it)
def _final_eval(cfg, result, comm) -> dict:
    from mpigls.evaluation import certify
    from mpigls.run import train as train_mod

    dataset, model, _ = train_mod.build_problem(cfg)
    model.to(result.device)  # the device training used (a GPU when the rank has one)
    n = cfg.eval.num_test or len(dataset.test_y)
    res = certify.evaluate_configured(cfg, model, result.theta, dataset.test_x[:n], dataset.test_y[:n], comm=comm)
    if comm.is_root:
        parts = [f"{k} {100 * v:.2f}%" for k, v in res.items() if k not in ("num_examples", "eps")]
        print(
            f"final test accuracy (eps={cfg.bound.eps}, {res['num_examples']} examples): " + ", ".join(parts),
            flush=True,
        )
    return res


def _cmd_certify(args, comm) -> int:
    import torch

    from mpigls.evaluation import certify
    from mpigls.run import checkpoint, rundir, train as train_mod
    from mpigls.run.rundir import json_safe

    args.checkpoint = _checkpoint_file(args.checkpoint)
    ckpt, cfg = _network_and_config(args)
    dataset, model, arch = train_mod.build_problem(cfg)
    checkpoint.check_compatible(ckpt, arch, advice=_CERTIFY_ARCH_ADVICE)
    model.to(parallel.bind_device(comm, cfg.train.device, cfg.train.threads))
    methods = args.methods.split(",") if args.methods else list(cfg.eval.methods)
    eps = cfg.bound.eps if args.eps is None else args.eps
    if not (math.isfinite(eps) and 0 <= eps <= 1):
        raise ValueError(f"--eps must lie in [0, 1] (an l_inf radius in pixel space), got {eps}")
    if args.num_test is not None and args.num_test < 1:
        raise ValueError(f"--num-test must be >= 1, got {args.num_test}; leave it out to use eval.num_test or all")
    n = args.num_test or cfg.eval.num_test or len(dataset.test_y)
    if args.pgd_restarts < 0 or (args.time_limit is not None and args.time_limit < 0):
        raise ValueError(f"--pgd-restarts and --time-limit must be >= 0, got {args.pgd_restarts} and {args.time_limit}")
    res, samples = certify.certify(
        model,
        torch.from_numpy(ckpt.theta.copy()),
        dataset.test_x[:n],
        dataset.test_y[:n],
        eps,
        methods,
        comm=comm,
        batch_size=cfg.eval.batch_size,
        pgd_steps=cfg.eval.pgd_steps,
        pgd_restarts=args.pgd_restarts,
        seed=cfg.train.seed,
        verify=args.verify,
        verify_time_limit=args.time_limit or None,
        verify_max_domains=args.max_domains,
    )
    if not comm.is_root:
        return 0
    path = Path(args.results) if args.results else certify.results_path(args.checkpoint, eps)
    # the accuracies first: a results file that cannot be written must not cost the answer
    if args.json:
        print(json.dumps(json_safe(res), indent=2, allow_nan=False))
    else:
        print(
            "\n".join(
                f"{k:24s} {100 * v:6.2f}%"
                for k, v in res.items()
                if k in ("natural", "adversarial", "certified", "verified") or k.startswith("certified/")
            )
        )
        if args.verify:
            print(f"{'unknown':24s} {res['unknown']:6d}\n{'falsified':24s} {res['falsified']:6d}")
    try:
        rundir.write_json(
            path,
            {
                "schema": certify.RESULTS_SCHEMA,
                "format_version": certify.RESULTS_VERSION,
                "checkpoint": str(args.checkpoint),
                "generation": ckpt.generation,
                "theta_sha256": checkpoint.theta_sha256(ckpt.theta),
                "eps": float(eps),
                "methods": methods,
                "pgd_steps": cfg.eval.pgd_steps,
                "pgd_restarts": args.pgd_restarts,
                "verify": args.verify,
                "time_limit": args.time_limit,
                "max_domains": args.max_domains,
                "summary": json_safe(res),
                "samples": json_safe(samples),
            },
        )
    except OSError as exc:
        where = "--results" if args.results else "the default place beside the checkpoint"
        print(
            f"{'error' if args.results else 'warning'}: the per-sample results could not be saved to {path} "
            f"({where}: {exc.strerror or exc}); the accuracies above are complete. Pass --results FILE in a "
            "writable directory to keep them",
            file=sys.stderr,
        )
        return parallel.EXIT_USER_ERROR if args.results else 0
    if not args.json:
        print(f"({n} test examples, eps={eps}, {res['time_s']:.1f} s; per-sample results in {path})")
    return 0


def _cmd_inspect(args, comm) -> int:
    from mpigls.run import checkpoint
    from mpigls.run.rundir import json_safe

    summary = checkpoint.summary(_checkpoint_file(args.checkpoint))
    if comm.is_root:
        if args.json:
            print(json.dumps(json_safe(summary), indent=2, default=str, allow_nan=False))
        else:
            for key, value in summary.items():
                if key != "config":
                    print(f"{key:20s} {value}")
    return 0


def _cmd_landscape(args, comm) -> int:
    import torch

    from mpigls.evaluation import landscape
    from mpigls.run import checkpoint, train as train_mod

    ckpt = _load_usable(args.checkpoint)
    cfg = config_mod.from_dict(ckpt.config)
    dataset, model, arch = train_mod.build_problem(cfg)
    checkpoint.check_compatible(ckpt, arch, advice=_CERTIFY_ARCH_ADVICE)
    device = parallel.bind_device(comm, cfg.train.device, cfg.train.threads)
    if comm.is_root:
        path = landscape.run_from_checkpoint(
            model.to(device),
            torch.from_numpy(ckpt.theta.copy()),
            dataset.train_x[: args.batch_size].to(device),
            dataset.train_y[: args.batch_size].to(device),
            cfg.bound.eps,
            sigmas=[float(s) for s in args.sigmas.split(",")],
            methods=args.methods.split(","),
            num_samples=args.num_samples,
            num_points=args.num_points,
            radius=args.radius,
            seed=cfg.train.seed,
            out=str(_png_path(args.out, "landscape.png")),
        )
        print(f"wrote {path}")
    return 0


def _cmd_plot(args, comm) -> int:
    from mpigls import analysis
    from mpigls.analysis import plotting

    out = _png_path(args.out, "metrics.png")
    runs = analysis.load_runs(args.paths)
    if comm.is_root:
        keys = [k for k in args.keys.split(",") if k] if args.keys else None
        path = plotting.plot_runs(runs, out, keys=keys, window=args.smooth)
        print(f"wrote {path}")
    return 0


def _cmd_report(args, comm) -> int:
    from mpigls import analysis
    from mpigls.analysis import report as analysis_report

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
        runs = [_certify_run(run, comm) if miss else run for run, miss in zip(runs, missing)]
    if comm.is_root:
        text = analysis_report.format_table(analysis_report.build_table(runs), args.format)
        if args.out:
            Path(args.out).write_text(text)
        print(text, end="")
    return 0


def _certify_run(run, comm):
    """Certify the run's newest checkpoint as configured; store DIR/certify_GENERATION.json."""
    import time

    import torch

    from mpigls import analysis
    from mpigls.evaluation import certify
    from mpigls.run import checkpoint, rundir, train as train_mod

    if run.checkpoint_path is None:
        raise FileNotFoundError(f"run {run.label} has no checkpoint to certify yet")
    ckpt = _load_usable(str(run.checkpoint_path))
    cfg = config_mod.from_dict(ckpt.config)
    dataset, model, arch = train_mod.build_problem(cfg)
    checkpoint.check_compatible(ckpt, arch)
    model.to(parallel.bind_device(comm, cfg.train.device, cfg.train.threads))
    n = cfg.eval.num_test or len(dataset.test_y)
    t0 = time.perf_counter()
    theta = torch.from_numpy(ckpt.theta.copy())
    res = certify.evaluate_configured(cfg, model, theta, dataset.test_x[:n], dataset.test_y[:n], comm=comm)
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


def _cmd_tightness(args, comm) -> int:
    import torch

    from mpigls.analysis import plotting, tightness as analysis_tightness
    from mpigls.run import checkpoint, rundir, train as train_mod

    out = _png_path(args.out, "tightness.png")
    ckpt = _load_usable(args.checkpoint)
    cfg = config_mod.from_dict(ckpt.config)
    radii = analysis_tightness.radii_grid(2 * cfg.bound.eps if args.max_eps is None else args.max_eps, args.num_radii)
    methods = [m for m in args.methods.split(",") if m]
    from mpigls.bounds import SOUND_METHODS

    bad = [m for m in methods if m not in SOUND_METHODS]
    if bad:
        raise ValueError(f"--methods {bad} are not sound relaxations; choose among {list(SOUND_METHODS)}")
    dataset, model, arch = train_mod.build_problem(cfg)
    checkpoint.check_compatible(ckpt, arch)
    model.to(parallel.bind_device(comm, cfg.train.device, cfg.train.threads))
    n = args.num_test or cfg.eval.num_test or len(dataset.test_y)
    res = analysis_tightness.tightness(
        model,
        torch.from_numpy(ckpt.theta.copy()),
        dataset.test_x[:n],
        dataset.test_y[:n],
        radii,
        methods,
        comm=comm,
        batch_size=cfg.eval.batch_size,
    )
    res.update(
        {
            "checkpoint": str(args.checkpoint),
            "generation": ckpt.generation,
            "theta_sha256": checkpoint.theta_sha256(ckpt.theta),
            "training_eps": cfg.bound.eps,
            "training_method": cfg.bound.method,
        }
    )
    if comm.is_root:
        png = plotting.plot_tightness(res, out, eps=cfg.bound.eps)
        js = rundir.write_json(png.with_suffix(".json"), res)
        print(
            f"{'relaxation':12s} {'AUC':>9s} {'mean cert.':>10s}   (radii 0..{radii[-1]:g}, {len(radii)} points, "
            f"{res['num_examples']} examples, natural {100 * res['natural_accuracy']:.2f}%)"
        )
        for m, c in res["methods"].items():
            print(f"{m:12s} {c['auc']:9.5f} {100 * c['auc_normalized']:9.2f}%")
        print(f"wrote {png} and {js}")
    return 0


def _cmd_export(args, comm) -> int:
    from mpigls.interop import export

    ckpt = _load_usable(args.checkpoint)
    cfg = config_mod.from_dict(config_mod.apply_overrides(ckpt.config, args.overrides))
    from mpigls.run.train import _root_load

    res = _root_load(  # rank 0 writes the files; its error, if any, is raised on every rank
        comm,
        lambda: export.export(
            ckpt,
            cfg,
            args.onnx,
            vnnlib_dir=args.vnnlib,
            eps=args.eps,
            num_test=args.num_test,
            timeout=args.timeout,
            batch=None if args.dynamic_batch else 1,
            source=Path(args.checkpoint).name,
        ),
    )
    if comm.is_root:
        print(
            f"wrote {res.onnx_path} (opset {export.onnx_io.OPSET}); onnxruntime vs mpigls on {res.checked} test "
            f"samples: max |logit difference| {res.max_abs_diff:.3g}"
        )
        if args.vnnlib:
            print(
                f"wrote {len(res.property_paths)} VNN-LIB properties (eps={res.eps}) and "
                f"{Path(args.vnnlib) / 'instances.csv'}"
            )
    return 0


def _cmd_data(args, comm) -> int:
    from mpigls.interop import fetch

    say = print if comm.is_root else (lambda m: None)
    fetch.ensure(comm, args.name, args.root, mirror=args.mirror, say=say)
    say(f"{args.name} ready in {args.root}: use --set data.name={args.name} --set data.root={args.root}")
    return 0


def _cmd_config(args, comm) -> int:
    if comm.is_root:
        rows = config_mod.describe()
        if args.markdown:
            print("| key | default | meaning |\n|---|---|---|")
            print("\n".join(f"| `{k}` | `{d}` | {h} |" for k, d, h in rows))
        else:
            print("\n".join(f"{k:28s} {d:18s} {h}" for k, d, h in rows))
    return 0


def _cmd_recipes(args, comm) -> int:
    kind = recipes.JOBS if args.jobs else recipes.RECIPES
    if args.action != "list" and not args.name:
        raise ValueError(f"mpigls recipes {args.action} needs a NAME; `{kind.list_command}` lists them")
    if args.action == "copy":  # every rank checks the name (one error everywhere), rank 0 writes
        recipes.path(args.name, kind)
        if comm.is_root:
            print(f"wrote {recipes.copy(args.name, args.dir, kind, force=args.force)}")
        return 0
    if not comm.is_root:
        return 0
    if args.action == "show":
        print(recipes.path(args.name, kind).read_text(encoding="utf-8"), end="")
    elif args.action == "path":
        print(recipes.path(args.name, kind))
    else:
        print(recipes.listing(kind))
    return 0


def _diagnose(args, comm) -> int:
    from mpigls.studies import diagnose

    return diagnose.run(args, comm, _load_usable)


def _cmd_study(args, comm) -> int:
    from mpigls.studies import cli as study_cli

    if comm.world_size > 1:
        raise ValueError("mpigls study runs in one process (each run is its own process); start it without mpiexec")
    return study_cli.run(args)


_CERTIFY_ARCH_ADVICE = (
    "the checkpoint's own config describes its model and data: drop the --set overrides that "
    "change model.* or data.* (data.root may change), or pass the checkpoint of that model"
)


def _network_and_config(args):
    """(checkpoint, config) for ``certify``: an mpigls checkpoint with its own config (plus --set), or
    an ONNX file / PyTorch state dict with the config given by --config (model.name and data.*),
    imported as a generation-0 checkpoint (``preflight.check_init_from``: shapes checked)."""
    from mpigls.interop import onnx_io
    from mpigls.run import preflight, train as train_mod

    if onnx_io.foreign_kind(args.checkpoint) is None:
        if args.config:
            raise ValueError(
                f"--config is for ONNX and PyTorch files; {args.checkpoint} carries its own config "
                "(change keys with --set)"
            )
        ckpt = _load_usable(args.checkpoint)
        return ckpt, config_mod.from_dict(config_mod.apply_overrides(ckpt.config, args.overrides))
    if not args.config:
        raise ValueError(
            f"{args.checkpoint} is an ONNX/PyTorch network without an mpigls config: pass --config CONFIG.yaml "
            "naming its model.name, data.* and bound.eps (e.g. the config it would be trained with)"
        )
    cfg = config_mod.load_config(args.config, [*args.overrides, f"model.init_from={args.checkpoint}"])
    _, _, arch = train_mod.build_problem(cfg)
    ckpt = preflight.check_init_from(cfg, arch)
    assert ckpt is not None  # model.init_from is set above
    ckpt.config = config_mod.to_dict(cfg)
    return ckpt, cfg


def _checkpoint_file(path: str) -> str:
    """A checkpoint file as given, or for a run directory its newest loadable checkpoint (as ``plot`` and
    ``report`` take run directories)."""
    from mpigls.run import checkpoint, rundir

    p = Path(path)
    if not p.is_dir():
        return path
    found = rundir.find_latest(p)
    if found is None:
        raise FileNotFoundError(
            f"{path} is a directory without a loadable checkpoint ({checkpoint.LATEST} or ckpt_*.h5); give a "
            "checkpoint file or the --out directory of a run that has written one"
        )
    return str(found)


def _load_usable(path: str):
    """A checkpoint whose stored config is a mapping (trimmed by ``config.stored_config``) and whose
    parameters are finite."""
    import numpy as np

    from mpigls.run import checkpoint

    ckpt = checkpoint.load(path)
    if not isinstance(ckpt.config, dict):
        raise ValueError(
            f"{path} stores a config that is a {type(ckpt.config).__name__}, not a mapping of "
            "sections; it was not written by `mpigls train` or was edited; use a checkpoint from a run"
        )
    ckpt.config = config_mod.stored_config(ckpt.config)  # older files hold every optimizer's keys
    bad = int((~np.isfinite(ckpt.theta)).sum())
    if bad:
        raise ValueError(
            f"{path} holds {bad} non-finite parameter(s) (NaN/inf) out of {ckpt.theta.size}; its "
            "accuracies would be meaningless; use an earlier checkpoint of the run"
        )
    return ckpt


def _png_path(out: str, default_name: str) -> Path:
    """Where a figure goes: into a directory as default_name, else the path (``.png`` added if it has
    no suffix, as matplotlib does), so that the "wrote" line names the real file."""
    path = Path(out)
    if str(out).strip() == "":
        raise ValueError(f"--out is empty; name a PNG file, e.g. --out {default_name}")
    if path.is_dir():
        return path / default_name
    if not path.suffix:
        path = path.with_suffix(".png")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--out {out!r}: the directory {str(path.parent)!r} does not exist; create it first")
    return path


_COMMANDS = {
    "train": _cmd_train,
    "certify": _cmd_certify,
    "inspect": _cmd_inspect,
    "landscape": _cmd_landscape,
    "plot": _cmd_plot,
    "report": _cmd_report,
    "tightness": _cmd_tightness,
    "config": _cmd_config,
    "recipes": _cmd_recipes,
    "export": _cmd_export,
    "data": _cmd_data,
    "study": _cmd_study,
    "diagnose": _diagnose,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fake_nodes = None
    if args.command == "train":
        try:
            fake_nodes = config_mod.load_config(_train_config(args), args.overrides).train.fake_nodes
        except (*USER_ERRORS, config_mod.ConfigError):
            fake_nodes = None  # reported below, on every rank, by the command itself
    comm = parallel.init_comm(fake_nodes=fake_nodes)
    # Every rank validates the same input, so user errors fail alike everywhere; run_guarded makes
    # all ranks leave with one exit code (2 user error, 3 preempted) or aborts the job on a crash.
    return parallel.run_guarded(
        lambda: _COMMANDS[args.command](args, comm),
        comm,
        user_errors=(*USER_ERRORS, config_mod.ConfigError),
        label=f"mpigls {args.command}",
    )
