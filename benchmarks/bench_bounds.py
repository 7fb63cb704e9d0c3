"""Time every bound method on CNN3 / CNN5 with MNIST (1x28x28) and CIFAR (3x32x32) shapes.

For each (device, model, dataset, method) it runs margin_lower_bounds on a batch of random
pixels with a randomly initialised network, once under torch.no_grad (as PGPE evaluates) and
once with autograd followed by backward when the method is differentiable (as RGS / GRAD), and
reports the seconds of both, the peak memory
(CUDA: torch.cuda.max_memory_allocated; CPU: growth of the max RSS over the state after
warm-up, ``common.PeakMemory``; CPU rows each in a fresh subprocess unless --no-isolate) and
the mean number of IBP-unstable ReLUs per example; times are the median (and range) of
``--repeats`` calls. Prints a table and writes a record (``benchmarks.common``). Method
``auto_lirpa`` times the reference, auto_LiRPA 0.3's CROWN in patches mode (bounds + backward as
for the others), when it is installed (see benchmarks/auto_lirpa_compat.py).

  python -m benchmarks.bench_bounds [--methods ibp,deeppoly] [--batch 64] [--devices cpu,cuda] [--out rec.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from benchmarks import auto_lirpa_compat, common
from mpigls.bounds import crown, make_problem, margin_lower_bounds
from mpigls.nn import models

REFERENCE = "auto_lirpa"
DIFFERENTIABLE = {"ibp", "hbox", "crown-ibp", "deeppoly", "sabr", REFERENCE}
SHAPES = {
    "mnist": ((1, 28, 28), 0.1, [0.1307], [0.3081]),
    "cifar": ((3, 32, 32), 2 / 255, [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
}


def bound_fn(model, x, method, budget):
    """f(x, y, eps) -> margin lower bounds; method "auto_lirpa" is auto_LiRPA 0.3's CROWN in
    patches mode (benchmarks/auto_lirpa_compat.py), the reference implementation."""
    if method == REFERENCE:
        return auto_lirpa_compat.bounder(model, x, "deeppoly", "patches")
    return lambda xb, yb, eps: margin_lower_bounds(model, xb, yb, eps, method, memory_budget_mb=budget)


def run_one(model, x, y, eps, method, device, budget):
    """(seconds of the no-grad bound, seconds of bound + backward, peak MiB of the latter, mean bound)."""
    f = bound_fn(model, x, method, budget)
    sync = common.sync_for(device)
    t_start = time.perf_counter()  # after tracing (auto_LiRPA)
    with torch.no_grad():
        f(x, y, eps)
    sync()
    t0 = time.perf_counter()
    with common.PeakMemory(device) as mem:
        lb = f(x, y, eps)
        if method in DIFFERENTIABLE:
            lb.sum().backward()
            model.zero_grad(set_to_none=True)
    t2 = time.perf_counter()
    return t0 - t_start, t2 - t0, mem.mb, float(lb.detach().mean())


def measure(args, device, model_name, data, method) -> dict:
    shape, eps, mean, std = SHAPES[data]
    torch.manual_seed(0)
    if method == REFERENCE or args.identity_normalize:  # auto_LiRPA 0.3 can't trace Normalize in patches mode
        mean, std = [0.0] * shape[0], [1.0] * shape[0]
    model = models.build(model_name, shape, 10, mean, std).to(device)
    x = torch.rand(args.batch, *shape, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    with torch.no_grad():
        bounds = crown.intermediate_bounds(make_problem(model, x, y, eps), refine=False)
    unstable = [float(((lo < 0) & (hi > 0)).flatten(2).sum(-1).float().mean()) for lo, hi in bounds]
    bound_fn(model, x[:2], method, args.budget)(x[:2], y[:2], eps)  # warm-up
    runs = [run_one(model, x, y, eps, method, device, args.budget) for _ in range(args.repeats)]
    t_bound, t_total = common.spread([r[0] for r in runs]), common.spread([r[1] for r in runs])
    peak, mean_lb = max(r[2] for r in runs), runs[-1][3]
    return {
        "device": device.type,
        "model": model_name,
        "data": data,
        "shape": shape,
        "eps": eps,
        "batch": args.batch,
        "method": method,
        "bound_nograd_s": t_bound.median,
        "bound_nograd_s_range": [t_bound.low, t_bound.high],
        "bound_grad_backward_s": t_total.median,
        "bound_grad_backward_s_range": [t_total.low, t_total.high],
        "repeats": args.repeats,
        "peak_mb": peak,
        "mean_lb": mean_lb,
        "ibp_unstable_per_layer": unstable,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_record_args(ap)
    ap.add_argument("--methods", default="ibp,crown-ibp,sabr,hbox,deeppoly,alpha-crown")
    ap.add_argument("--models", default="cnn3,cnn5")
    ap.add_argument("--datasets", default="mnist,cifar")
    ap.add_argument("--devices", default="cpu,cuda")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--budget", type=float, default=1024.0, help="memory_budget_mb")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per row (median, range)")
    ap.add_argument(
        "--identity-normalize",
        action="store_true",
        help="mean 0 / std 1 for every model, as the auto_lirpa rows use (same networks, same bounds)",
    )
    ap.add_argument("--no-isolate", action="store_true", help="measure CPU rows in this process")
    ap.add_argument("--single", default=None, help=argparse.SUPPRESS)  # device,model,data,method
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.single:
        dev_name, model_name, data, method = args.single.split(",")
        print(json.dumps(measure(args, torch.device(dev_name), model_name, data, method)))
        return 0
    rows = []
    # the subprocesses import benchmarks and mpigls from this checkout
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(common.REPO), os.environ.get("PYTHONPATH")])))
    devices = [d for d in args.devices.split(",") if d != "cuda" or torch.cuda.is_available()]
    print(
        f"{'device':6} {'model':5} {'data':6} {'method':12} {'nograd s':>8} {'grad+bwd':>8} {'peak MB':>8} "
        f"{'unstable':>9} {'mean lb':>10}"
    )
    for dev_name in devices:
        device = torch.device(dev_name)
        for model_name in args.models.split(","):
            for data in args.datasets.split(","):
                for method in args.methods.split(","):
                    if dev_name == "cpu" and not args.no_isolate:
                        cmd = [
                            sys.executable,
                            "-m",
                            "benchmarks.bench_bounds",
                            "--single",
                            f"{dev_name},{model_name},{data},{method}",
                            "--batch",
                            str(args.batch),
                            "--budget",
                            str(args.budget),
                            "--repeats",
                            str(args.repeats),
                        ]
                        cmd += ["--identity-normalize"] if args.identity_normalize else []
                        cmd += ["--threads", str(args.threads)] if args.threads else []
                        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=common.REPO, env=env)
                        row = json.loads(out.stdout.splitlines()[-1])
                    else:
                        row = measure(args, device, model_name, data, method)
                    rows.append(row)
                    print(
                        f"{dev_name:6} {model_name:5} {data:6} {method:12} {row['bound_nograd_s']:8.3f} "
                        f"{row['bound_grad_backward_s']:8.3f} {row['peak_mb']:8.0f} "
                        f"{sum(row['ibp_unstable_per_layer']):9.0f} {row['mean_lb']:10.3f}",
                        flush=True,
                    )
    params = {k: v for k, v in vars(args).items() if k != "single"}
    common.write_record("bench_bounds", params, {"rows": rows}, args.out, args.note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
