"""What the numeric settings (train.deterministic, train.tf32, the certification margin) cost and change.

Everything on one device, in one run:

1. Training speed: seconds per generation of in-process ``train.train`` with ``train.deterministic``
   true vs false and (on a GPU) ``train.tf32`` false vs true, for each optimizer; the median of the
   generations after ``--skip`` warm-up ones; the settings run interleaved, every other round
   backwards (``common.interleave``), so machine load hits them alike; ratios are the median of the
   per-round ratios against deterministic=true, tf32=false (the defaults).
   Also whether two runs of the same settings gave the same theta bits.
2. Bound gaps (GPU only): max |bound on the device - bound on the CPU| per method with TF32 off
   (strict_fp32, what certificates use) and on (torch's cuDNN default), and the bound magnitude.
3. Cost of the certification margin: examples whose smallest margin lower bound lies in
   (0, CERTIFY_MARGIN], i.e. certified by "> 0" but not by "> CERTIFY_MARGIN", for a model trained
   a few generations with GRAD.

    python -m benchmarks.bench_numerics                  # CPU
    python -m benchmarks.bench_numerics --device cuda    # GPU (also: bash tools/test.sh --gpu --bench)

Prints tables and writes a record (``benchmarks.common``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import common
from mpigls import bounds, config
from mpigls.nn import models
from mpigls.numerics import precision
from mpigls.run import checkpoint, train

OPTIMIZERS = {
    "pgpe": {"optimizer.popsize": 64, "optimizer.block_size": 16, "optimizer.sigma_init": 0.01},
    "rgs": {"optimizer.num_samples": 8, "optimizer.block_size": 4, "optimizer.sigma_init": 0.01},
    "grad": {"optimizer.block_size": 32},
}


def _cfg(device: str, optimizer: str, det: bool, tf32: bool, generations: int, batch: int, model: str):
    per_epoch = min(generations, 1400 // batch)  # digits has 1437 training images
    sets = {
        "data.name": "digits",
        "data.num_train": batch * per_epoch,
        "data.num_test": 200,
        "model.name": model,
        "bound.method": "crown-ibp",
        "bound.eps": 0.02,
        "optimizer.name": optimizer,
        "optimizer.lr": 0.01,
        "train.epochs": generations / per_epoch,
        "train.batch_size": batch,
        "train.device": device,
        "train.threads": 1 if device == "cpu" else None,
        "train.progress": False,
        "train.checkpoint_every": 10_000,
        "train.deterministic": det,
        "train.tf32": tf32,
        **OPTIMIZERS[optimizer],
    }
    return config.load_config(None, [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in sets.items()])


def one_run(args, opt: str, mode: tuple[bool, bool]):
    """A callable training once with (deterministic, tf32) = ``mode``: (median s/gen, theta's sha256)."""

    def run() -> tuple[float, str]:
        cfg = _cfg(args.device, opt, *mode, args.generations, args.batch, args.model)
        with tempfile.TemporaryDirectory() as tmp:
            res = train.train(cfg, tmp, log=lambda m: None)
            per_gen = checkpoint.load(Path(tmp) / "latest.h5").metrics["time/generation_s"][args.skip :]
        return statistics.median(per_gen.tolist()), checkpoint.theta_sha256(res.theta.numpy())

    return run


def speed(args) -> list[dict]:
    default = (True, False)
    modes = [default, (False, False)] + ([(True, True), (False, True)] if args.device == "cuda" else [])
    rows = []
    for opt in args.optimizers:
        runs = common.interleave({m: one_run(args, opt, m) for m in modes}, args.repeats, alternate=True)
        times = {m: [t for t, _ in runs[m]] for m in modes}
        for mode in modes:
            ratio = common.ratio_spread(times[mode], times[default])
            rows.append(
                {
                    "optimizer": opt,
                    "deterministic": mode[0],
                    "tf32": mode[1],
                    "s_per_gen": statistics.median(times[mode]),
                    "ratio_vs_default": ratio.median,
                    "ratio_vs_default_range": [ratio.low, ratio.high],
                    "same_bits_every_repeat": len({sha for _, sha in runs[mode]}) == 1,
                }
            )
    return rows


def bound_gaps(args) -> list[dict]:
    if args.device != "cuda":
        return []
    rows = []
    for name, shape in (("cnn3", (1, 28, 28)), ("cnn5", (3, 32, 32))):
        torch.manual_seed(0)
        model = models.build(name, shape, 10, mean=[0.4] * shape[0], std=[0.3] * shape[0])
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(16, *shape, generator=g), torch.randint(0, 10, (16,), generator=g)
        for method in ("ibp", "hbox", "crown-ibp", "deeppoly", "alpha-crown"):
            with precision.strict_fp32():
                cpu = bounds.margin_lower_bounds(model.cpu(), x, y, 2 / 255, method).detach()
                strict = bounds.margin_lower_bounds(model.cuda(), x.cuda(), y.cuda(), 2 / 255, method).detach().cpu()
            with precision.training(tf32=True, deterministic=True):
                tf32 = bounds.margin_lower_bounds(model.cuda(), x.cuda(), y.cuda(), 2 / 255, method).detach().cpu()
            rows.append(
                {
                    "net": name,
                    "method": method,
                    "max_abs_bound": float(cpu.abs().max()),
                    "gap_fp32": float((strict - cpu).abs().max()),
                    "gap_tf32": float((tf32 - cpu).abs().max()),
                    "share_tf32_above_cpu": float((tf32 > cpu).float().mean()),
                }
            )
    return rows


def margin_cost(args) -> dict:
    cfg = _cfg(args.device, "grad", True, False, 40, 64, args.model)
    with tempfile.TemporaryDirectory() as tmp:
        res = train.train(cfg, tmp, log=lambda m: None)
    _, model, _ = train.build_problem(cfg)
    ds = train.build_problem(cfg)[0]
    model = models.load_flat_(model, res.theta).to(args.device)
    out = {}
    for method in ("ibp", "crown-ibp", "deeppoly"):
        with precision.strict_fp32(), torch.no_grad():
            lb = bounds.margin_lower_bounds(model, ds.test_x.to(args.device), ds.test_y.to(args.device), 0.01, method)
        low = lb.min(-1).values.cpu()
        out[method] = {
            "num_examples": int(low.numel()),
            "certified_gt_0": int((low > 0).sum()),
            "certified_gt_margin": int(precision.certified(lb).sum()),
            "in_(0,margin]": int(((low > 0) & (low <= precision.CERTIFY_MARGIN)).sum()),
            "smallest_positive_lb": float(low[low > 0].min()) if bool((low > 0).any()) else None,
        }
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_record_args(p)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--optimizers", default="pgpe,rgs,grad", type=lambda s: s.split(","))
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--skip", type=int, default=2, help="warm-up generations left out of the median")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--model", default="cnn3")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA GPU")
    t0 = time.time()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    rows = speed(args)
    print(
        f"\n[1] training speed on {device_name} ({args.model}, crown-ibp, batch {args.batch}, median of "
        f"generations {args.skip}..{args.generations}, {args.repeats} repeats; ratio vs deterministic, no TF32)"
    )
    print(f"{'optimizer':10s} {'determ.':8s} {'tf32':6s} {'s/gen':>9s} {'ratio':>7s}  same bits")
    for r in rows:
        print(
            f"{r['optimizer']:10s} {str(r['deterministic']):8s} {str(r['tf32']):6s} {r['s_per_gen']:9.4f} "
            f"{r['ratio_vs_default']:7.3f}  {r['same_bits_every_repeat']}"
        )
    gaps = bound_gaps(args)
    if gaps:
        print("\n[2] max |GPU - CPU| of margin lower bounds (16 random inputs, eps 2/255)")
        print(f"{'net':6s} {'method':12s} {'max|lb|':>9s} {'fp32 gap':>10s} {'TF32 gap':>10s} {'TF32 above':>10s}")
        for r in gaps:
            print(
                f"{r['net']:6s} {r['method']:12s} {r['max_abs_bound']:9.3g} {r['gap_fp32']:10.3g} "
                f"{r['gap_tf32']:10.3g} {r['share_tf32_above_cpu']:10.1%}"
            )
    else:
        print("\n[2] bound gaps: GPU only (run with --device cuda)")
    cost = margin_cost(args)
    print(
        f"\n[3] examples certified by lb > 0 but not by lb > {precision.CERTIFY_MARGIN:g} (GRAD, 40 generations, eps 0.01)"
    )
    for method, c in cost.items():
        print(f"{method:10s} {c}")
    results = {"rows": rows, "bound_gaps": gaps, "margin_cost": cost, "device_name": device_name}
    common.write_record("bench_numerics", args, results, args.out, args.note)
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
