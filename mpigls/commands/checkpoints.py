"""The commands on one checkpoint: ``certify``, ``tightness``, ``landscape``, ``inspect``, ``export``.

Each reads the checkpoint (a file, a run directory's newest loadable one, or for ``certify`` an ONNX or
PyTorch network with ``--config``) and builds its network and data once (``common.checkpoint_problem``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from mpigls.argtypes import count, number, numbers
from mpigls.commands.common import (
    CERTIFY_ARCH_ADVICE,
    add_overrides,
    checkpoint_file,
    checkpoint_problem,
    load_usable,
    png_path,
    stored_problem,
)

__all__ = ["COMMANDS", "add_parser", "run"]

COMMANDS = ("certify", "inspect", "landscape", "tightness", "export")


def add_parser(sub) -> None:
    _add_certify(sub)
    ins = sub.add_parser("inspect", help="summary of a checkpoint")
    ins.add_argument("checkpoint", help="a checkpoint file, or a run directory (its newest loadable checkpoint)")
    ins.add_argument("--json", action="store_true", help="print JSON (generation, theta_sha256, last metrics, ...)")
    _add_landscape(sub)
    _add_tightness(sub)
    _add_export(sub)


def _add_certify(sub) -> None:
    ce = sub.add_parser("certify", help="natural, PGD, certified and complete-verifier accuracy of a checkpoint")
    ce.add_argument(
        "checkpoint",
        help="a checkpoint file, a run directory (its newest loadable checkpoint), or an ONNX / PyTorch network "
        "with --config",
    )
    ce.add_argument(
        "--pgd-restarts",
        type=count(1, "skip the attack with --set eval.pgd_steps=0"),
        default=1,
        help="PGD restarts per sample (a sample is robust if all fail)",
    )
    ce.add_argument(
        "--verify", action="store_true", help="run the complete verifier on every sample no bound certifies"
    )
    ce.add_argument(
        "--time-limit",
        type=number(0, what="0: none"),
        default=60.0,
        help="complete verifier: seconds per sample (0: none)",
    )
    ce.add_argument(
        "--max-domains", type=count(1), default=None, help="complete verifier: branch-and-bound domains per sample"
    )
    ce.add_argument(
        "--results", default=None, help="per-sample results JSON (default: CKPT_DIR/<ckpt stem>.certify-eps<eps>.json)"
    )
    ce.add_argument(
        "--no-resume",
        action="store_true",
        help="complete verifier: start afresh instead of reusing the examples an interrupted run of the same "
        "evaluation kept beside the results file (RESULTS.part<rank>)",
    )
    ce.add_argument(
        "--methods", default=None, help="comma-separated bound methods (default: the config's eval.methods)"
    )
    ce.add_argument("--eps", type=number(0, 1), default=None, help="radius (default: the config's bound.eps)")
    ce.add_argument("--num-test", type=count(1), default=None, help="first N test examples")
    add_overrides(ce, "override a key of the checkpoint's config, e.g. --set data.root=/data")
    ce.add_argument(
        "--config",
        default=None,
        help="for an ONNX (.onnx) or PyTorch state dict (.pt) network: the YAML config naming its model and data",
    )
    ce.add_argument("--json", action="store_true", help="print JSON")


def _add_landscape(sub) -> None:
    la = sub.add_parser(
        "landscape", help="original vs Gaussian-smoothed loss along the DeepPoly gradient (paper Fig. 6)"
    )
    la.add_argument("checkpoint")
    la.add_argument("--out", default="landscape.png", help="PNG path")
    la.add_argument("--sigmas", type=numbers(0, low_open=True), default="1e-3,1e-2", help="comma-separated sigmas")
    la.add_argument("--methods", default="ibp,crown-ibp,deeppoly", help="comma-separated relaxations")
    la.add_argument("--num-samples", type=count(2), default=32, help="Gaussian samples per point")
    la.add_argument("--num-points", type=count(2), default=21, help="points along the direction")
    la.add_argument(
        "--radius",
        type=number(0, low_open=True),
        default=None,
        help="largest step along the direction (default: 5 * max sigma)",
    )
    la.add_argument("--batch-size", type=count(1), default=64, help="training examples used for the loss")


def _add_tightness(sub) -> None:
    ti = sub.add_parser(
        "tightness", help="certified accuracy over radius per relaxation and its area (Jovanovic et al. 2022)"
    )
    ti.add_argument("checkpoint")
    ti.add_argument("--out", default="tightness.png", help="PNG path (the JSON goes beside it, .json)")
    ti.add_argument("--methods", default="ibp,hbox,crown-ibp,deeppoly", help="comma-separated relaxations")
    ti.add_argument(
        "--max-eps",
        type=number(0, 1, low_open=True),
        default=None,
        help="largest radius (default: 2 * the config's bound.eps)",
    )
    ti.add_argument("--num-radii", type=count(2), default=11, help="radii from 0 to --max-eps")
    ti.add_argument(
        "--num-test", type=count(1), default=None, help="first N test examples (default: the config's eval.num_test)"
    )


def _add_export(sub) -> None:
    ex = sub.add_parser(
        "export",
        help="a checkpoint's network as ONNX or a PyTorch state dict, and VNN-LIB robustness properties for "
        "external verifiers",
    )
    ex.add_argument("checkpoint")
    ex.add_argument("--onnx", default=None, help="ONNX file to write (float32, opset 13, normalisation included)")
    ex.add_argument(
        "--pt",
        default=None,
        help="PyTorch state dict to write (.pt: model.state_dict() of the network, normalisation included; "
        "mpigls.analysis.load_network gives the module itself)",
    )
    ex.add_argument(
        "--vnnlib",
        default=None,
        metavar="DIR",
        help="also write one VNN-LIB property per test sample and instances.csv",
    )
    ex.add_argument(
        "--eps", type=number(0, 1), default=None, help="radius of the properties (default: the config's bound.eps)"
    )
    ex.add_argument(
        "--num-test",
        type=count(1),
        default=None,
        help="first N test examples (default: the config's eval.num_test or all)",
    )
    ex.add_argument(
        "--timeout", type=number(0, low_open=True), default=60.0, help="seconds per instance written into instances.csv"
    )
    ex.add_argument(
        "--dynamic-batch",
        action="store_true",
        help="symbolic batch dimension (default: batch 1, as VNN-COMP tools expect)",
    )
    add_overrides(ex, "override a key of the checkpoint's config, e.g. --set data.root=/data")


def run(args: argparse.Namespace, comm) -> int:
    return {
        "certify": certify,
        "inspect": inspect,
        "landscape": landscape,
        "tightness": tightness,
        "export": export,
    }[args.command](args, comm)


# ----------------------------------------------------------------------------- certify


def certify(args: argparse.Namespace, comm) -> int:
    from mpigls.evaluation import certify as certify_mod
    from mpigls.run import rundir

    args.checkpoint = checkpoint_file(args.checkpoint)
    if args.results:  # before any work: never a checkpoint, a run's own file or this command's input
        rundir.refuse_output(args.results, "certify --results", inputs=[args.checkpoint, args.config])
    ckpt, cfg = _network_and_config(args)
    prob = checkpoint_problem(ckpt, cfg, comm, advice=CERTIFY_ARCH_ADVICE)
    methods = args.methods.split(",") if args.methods else list(cfg.eval.methods)
    eps = cfg.bound.eps if args.eps is None else args.eps
    if not (math.isfinite(eps) and 0 <= eps <= 1):
        raise ValueError(f"--eps must lie in [0, 1] (an l_inf radius in pixel space), got {eps}")
    x, y = prob.test_examples(args.num_test)
    path = Path(args.results) if args.results else certify_mod.results_path(args.checkpoint, eps)
    settings = dict(
        batch_size=cfg.eval.batch_size,
        pgd_steps=cfg.eval.pgd_steps,
        pgd_restarts=args.pgd_restarts,
        seed=cfg.train.seed,
        verify_time_limit=args.time_limit or None,
        verify_max_domains=args.max_domains,
    )
    store = _kept_examples(args, comm, prob, x, y, eps, methods, settings, path) if args.verify else None
    try:
        res, samples = certify_mod.certify(
            prob.model,
            prob.theta,
            x,
            y,
            eps,
            methods,
            comm=comm,
            verify=args.verify,
            progress=True,
            partial=store,
            **settings,
        )
    except KeyboardInterrupt:
        if store is not None and comm.is_root:
            print(
                f"interrupted: the examples the complete verifier finished are kept in {path}.part*; the same "
                "command resumes them",
                file=sys.stderr,
                flush=True,
            )
        raise
    finally:
        if store is not None:
            store.close()
    if not comm.is_root:
        return 0
    _print_certify(args, res)  # the accuracies first: a results file that cannot be written must not cost them
    code = _write_certify(args, path, ckpt, cfg, eps, methods, res, samples)
    if code is None and store is not None:
        store.remove_all()  # the complete results are written: the kept examples are in them
    if code is None and not args.json:
        print(f"({len(y)} test examples, eps={eps}, {res['time_s']:.1f} s; per-sample results in {path})")
    return code or 0


def _kept_examples(args, comm, prob, x, y, eps: float, methods: list, settings: dict, path: Path):
    """This rank's ``evaluation.partial.PartialResults`` beside the results file: the complete verifier's
    finished examples of this very evaluation (θ, network, examples, settings) are reused, new ones kept."""
    from mpigls.evaluation import certify as certify_mod, partial

    key = certify_mod.partial_key(prob.model, prob.theta, x, y, eps, methods, **settings)
    store = partial.PartialResults(
        path, key, rank=comm.rank, num_examples=len(y), what=str(args.checkpoint), resume=not args.no_resume
    )
    if comm.is_root and store.rows:
        print(
            f"resuming: {len(store.rows)} example(s) the complete verifier finished earlier ({path}.part*)",
            file=sys.stderr,
            flush=True,
        )
    return store


def _print_certify(args: argparse.Namespace, res: dict) -> None:
    from mpigls.run.rundir import json_safe

    if args.json:
        print(json.dumps(json_safe(res), indent=2, allow_nan=False))
        return
    print(
        "\n".join(
            f"{k:24s} {100 * v:6.2f}%"
            for k, v in res.items()
            if k in ("natural", "adversarial", "certified", "verified") or k.startswith("certified/")
        )
    )
    if args.verify:
        print(f"{'unknown':24s} {res['unknown']:6d}\n{'falsified':24s} {res['falsified']:6d}")


def _write_certify(args, path: Path, ckpt, cfg, eps: float, methods: list, res: dict, samples: dict) -> int | None:
    """The per-sample results file; on failure a message and the exit code (2 when --results named it)."""
    from mpigls import parallel
    from mpigls.evaluation import certify as certify_mod
    from mpigls.run import checkpoint, rundir
    from mpigls.run.rundir import json_safe

    try:
        rundir.write_json(
            path,
            {
                "schema": certify_mod.RESULTS_SCHEMA,
                "format_version": certify_mod.RESULTS_VERSION,
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
    return None


def _network_and_config(args: argparse.Namespace):
    """(checkpoint, config) for ``certify``: an mpigls checkpoint with its own config (plus --set), or
    an ONNX file / PyTorch state dict with the config given by --config (model.name and data.*),
    imported as a generation-0 checkpoint (``preflight.check_init_from``: shapes checked)."""
    from mpigls import config as config_mod
    from mpigls.interop import onnx_io
    from mpigls.run import preflight, train as train_mod

    if onnx_io.foreign_kind(args.checkpoint) is None:
        if args.config:
            raise ValueError(
                f"--config is for ONNX and PyTorch files; {args.checkpoint} carries its own config "
                "(change keys with --set)"
            )
        ckpt = load_usable(args.checkpoint)
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


# ----------------------------------------------------------------------------- inspect, landscape, tightness


def inspect(args: argparse.Namespace, comm) -> int:
    from mpigls.run import checkpoint
    from mpigls.run.rundir import json_safe

    summary = checkpoint.summary(checkpoint_file(args.checkpoint))
    if comm.is_root:
        if args.json:
            print(json.dumps(json_safe(summary), indent=2, default=str, allow_nan=False))
        else:
            for key, value in summary.items():
                if key != "config":
                    print(f"{key:20s} {value}")
    return 0


def landscape(args: argparse.Namespace, comm) -> int:
    from mpigls.evaluation import landscape as landscape_mod

    prob = stored_problem(args.checkpoint, comm, advice=CERTIFY_ARCH_ADVICE)
    if comm.is_root:
        n, device = args.batch_size, prob.device
        path = landscape_mod.run_from_checkpoint(
            prob.model,
            prob.theta,
            prob.dataset.train_x[:n].to(device),
            prob.dataset.train_y[:n].to(device),
            prob.cfg.bound.eps,
            sigmas=list(args.sigmas),
            methods=args.methods.split(","),
            num_samples=args.num_samples,
            num_points=args.num_points,
            radius=args.radius,
            seed=prob.cfg.train.seed,
            out=str(png_path(args.out, "landscape.png", inputs=[args.checkpoint])),
            progress=True,
        )
        print(f"wrote {path}")
    return 0


def tightness(args: argparse.Namespace, comm) -> int:
    from mpigls import config as config_mod
    from mpigls.analysis import plotting, tightness as tightness_mod
    from mpigls.bounds import SOUND_METHODS
    from mpigls.run import checkpoint, rundir

    out = png_path(args.out, "tightness.png", inputs=[args.checkpoint])
    rundir.refuse_output(out.with_suffix(".json"), "--out (its .json beside the figure)", inputs=[args.checkpoint])
    ckpt = load_usable(args.checkpoint)
    cfg = config_mod.from_dict(ckpt.config)
    radii = tightness_mod.radii_grid(2 * cfg.bound.eps if args.max_eps is None else args.max_eps, args.num_radii)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in SOUND_METHODS]
    if bad:
        raise ValueError(f"--methods {bad} are not sound relaxations; choose among {list(SOUND_METHODS)}")
    prob = checkpoint_problem(ckpt, cfg, comm)
    x, y = prob.test_examples(args.num_test)
    res = tightness_mod.tightness(
        prob.model, prob.theta, x, y, radii, methods, comm=comm, batch_size=cfg.eval.batch_size, progress=True
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


# ----------------------------------------------------------------------------- export


def export(args: argparse.Namespace, comm) -> int:
    from mpigls import config as config_mod, parallel
    from mpigls.interop import export as export_mod

    if not (args.onnx or args.pt):
        raise ValueError("mpigls export needs --onnx FILE.onnx, --pt FILE.pt or both: the files to write")
    if args.vnnlib and not args.onnx:
        raise ValueError("--vnnlib writes properties for the ONNX network: pass --onnx FILE.onnx with it")
    ckpt = load_usable(args.checkpoint)
    cfg = config_mod.from_dict(config_mod.apply_overrides(ckpt.config, args.overrides))
    if args.pt:
        pt = parallel.on_root(comm, lambda: _export_pt(args, ckpt))
        if comm.is_root:
            print(f"wrote {pt} (PyTorch state dict: model.init_from, or mpigls certify {pt} --config CONFIG)")
    if not args.onnx:
        return 0
    res = parallel.on_root(comm, lambda: _export_files(args, ckpt, cfg))  # rank 0 writes; its error is everyone's
    if comm.is_root:
        print(
            f"wrote {res.onnx_path} (opset {export_mod.onnx_io.OPSET}); onnxruntime vs mpigls on {res.checked} test "
            f"samples: max |logit difference| {res.max_abs_diff:.3g}"
        )
        if args.vnnlib:
            print(
                f"wrote {len(res.property_paths)} VNN-LIB properties (eps={res.eps}) and "
                f"{Path(args.vnnlib) / 'instances.csv'}"
            )
    return 0


def _export_pt(args: argparse.Namespace, ckpt):
    """The checkpoint's network (``analysis.networks.network_of``) as a state dict at ``--pt``."""
    from mpigls.analysis import networks
    from mpigls.run import rundir

    rundir.refuse_output(args.pt, "export --pt", inputs=[args.checkpoint])
    return networks.save_state_dict(networks.network_of(ckpt), args.pt)


def _export_files(args: argparse.Namespace, ckpt, cfg):
    """Check the values and outputs first, then build the network with the checkpoint's θ and write the
    ONNX file (and the VNN-LIB properties): ``interop.export.write``."""
    import torch

    from mpigls.interop import export as export_mod
    from mpigls.nn import models
    from mpigls.run import checkpoint, rundir, train as train_mod

    eps = cfg.bound.eps if args.eps is None else float(args.eps)
    export_mod.check_values(eps, args.num_test, args.timeout)
    rundir.refuse_output(args.onnx, "export --onnx", inputs=[args.checkpoint])
    if args.vnnlib:
        rundir.refuse_output(args.vnnlib, "export --vnnlib", inputs=[args.checkpoint])
    export_mod.check_outputs(args.onnx, args.vnnlib)
    dataset, model, arch = train_mod.build_problem(cfg)
    checkpoint.check_compatible(ckpt, arch, advice="export with the checkpoint's own model.* and data.* settings")
    models.load_flat_(model, torch.from_numpy(ckpt.theta.copy()))
    n = min(args.num_test or cfg.eval.num_test or len(dataset.test_y), len(dataset.test_y))
    header = [
        f"robustness property written by mpigls export from {Path(args.checkpoint).name or 'a checkpoint'}",
        f"network {Path(args.onnx).name}: {cfg.model.name} on {cfg.data.name}, generation {ckpt.generation}",
    ]
    return export_mod.write(
        model,
        dataset.in_shape,
        dataset.test_x[:n],
        dataset.test_y[:n],
        dataset.num_classes,
        args.onnx,
        vnnlib_dir=args.vnnlib,
        eps=eps,
        timeout=args.timeout,
        batch=None if args.dynamic_batch else 1,
        header=header,
    )
