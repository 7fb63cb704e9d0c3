"""Seconds per PGPE generation: the bound work of a whole population, and the full training step.

For every (device, model, dataset, method, population size P) it bounds P members (the PGPE
centre plus sigma-noise, as train.py evaluates them) on one batch of B examples and reports:

- ``bound_s``: margin_lower_bounds for all P members (torch.no_grad, the strategy picked by
  ``population`` / ``rows``, default auto), and member·examples per second;
- ``step_s``: the full PGPE generation as the training loop does it (``pgpe.ask`` the
  antithetic points, certified loss per member, update);
- ``peak_mb``: CUDA max allocated, or on CPU the growth of the peak resident set over the state
  before the call (reset through /proc/self/clear_refs);
- peers in the same run on the same networks and inputs: ``auto_lirpa_s``, auto_LiRPA 0.3 CROWN
  (patches) in a loop over the members (deeppoly rows; measured on ``--peer-members`` members
  and scaled to P, stated in the JSON), and with ``--evotorch`` EvoTorch's PGPE generation
  (one network per solution; needs ``pip install evotorch``).

``--unstable fresh|trained`` bounds a freshly initialised network, or one with few unstable
neurons ("trained": the same network with its biases shifted up by ``--shift`` so most ReLUs are
stably active at the given eps; a synthetic stand-in for a certifiably trained checkpoint, or
``--checkpoint path.pt`` to load a real one; "ibp-trained": certifiably trained here, GRAD + IBP
on synthetic MNIST-shaped data for ``--train-steps``, and bounded on that data). ``--clock cpu``
times CPU seconds of the process (fair on a shared machine, 1 thread); ``--repeats`` takes medians.

Short CPU default (a minute or two); the GPU case of the issue is one command:

  python tools/bench_generation.py --device cuda --models cnn3,cnn5 --popsizes 256 --batch 512 \\
      --methods ibp,crown-ibp,deeppoly,alpha-crown --out gpu.json
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from mpigls import data as mdata, losses, models
from mpigls.bounds import margin_lower_bounds
from mpigls.optim import pgpe

sys.path.insert(0, str(Path(__file__).resolve().parent))
import auto_lirpa_compat

SHAPES = {"mnist": ((1, 28, 28), 0.1), "cifar": ((3, 32, 32), 2 / 255)}


def _rss_mb(key: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def _reset_peak(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _rss_mb("VmRSS:")


def _peak(device: torch.device, base: float) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20 - base
    return _rss_mb("VmHWM:") - base


# "wall": time.perf_counter; "cpu": time.process_time, the CPU seconds of this process, which on a
# shared machine (other jobs on the cores) is the fairer measure of 1-thread work. cuda: wall.
CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


def _timed(fn, device, repeats: int):
    """Median seconds of ``repeats`` calls (and the last result)."""
    times, out = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = _clock()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(_clock() - t0)
    return statistics.median(times), out


def make_case(args, device, model_name, data):
    shape, eps = SHAPES[data]
    torch.manual_seed(0)
    model = models.build(model_name, shape, 10, [0.0] * shape[0], [1.0] * shape[0]).to(device)
    if args.checkpoint:
        state = torch.load(args.checkpoint, map_location=device)
        models.load_flat_(model, state["params"] if isinstance(state, dict) and "params" in state else state)
    elif args.unstable == "ibp-trained":
        models.load_flat_(model, ibp_trained(model_name, data, args.train_steps, args.batch, str(device)))
    elif args.unstable == "trained":
        with torch.no_grad():
            for m in model:
                if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                    m.bias.add_(args.shift)
    if args.inputs == "synthetic" or args.unstable == "ibp-trained":
        ds = mdata.load("synthetic", shape=shape, num_classes=10, n=args.batch, seed=1)
        x, y = ds.test_x.to(device), ds.test_y.to(device)
    else:
        x = torch.rand(args.batch, *shape, device=device)
        y = torch.randint(0, 10, (args.batch,), device=device)
    return model, x, y, eps


@functools.cache
def ibp_trained(model_name: str, data: str, steps: int, batch: int, device: str) -> torch.Tensor:
    """Flat parameters of the network certifiably trained here: GRAD + IBP loss (Adam, eps ramped
    over the first half) on synthetic data of the dataset's shape (class prototypes + noise), a
    real stand-in for a trained checkpoint: few unstable neurons at eps. Deterministic (seeded)."""
    shape, eps = SHAPES[data]
    torch.manual_seed(0)
    model = models.build(model_name, shape, 10, [0.0] * shape[0], [1.0] * shape[0]).to(device)
    ds = mdata.load("synthetic", shape=shape, num_classes=10, n=max(1024, batch), seed=0)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    device = next(model.parameters()).device
    for t in range(steps):
        idx = torch.randint(0, ds.train_x.shape[0], (batch,), generator=gen)
        e = eps * min(1.0, 2 * (t + 1) / steps)
        loss = losses.certified_loss(model, ds.train_x[idx].to(device), ds.train_y[idx].to(device), e, "ibp")
        opt.zero_grad()
        loss.backward()
        opt.step()
    return models.flat_params(model).detach()


def unstable_fraction(model, x, y, eps) -> float:
    from mpigls.bounds import crown, make_problem

    with torch.no_grad():
        bounds = crown.intermediate_bounds(make_problem(model, x, y, eps), refine=False)
    n = sum(lo[0, 0].numel() for lo, _ in bounds)
    return float(sum(((lo < 0) & (hi > 0)).sum() for lo, hi in bounds)) / (n * x.shape[0])


def measure(args, device, model_name, data, method, popsize) -> dict:
    model, x, y, eps = make_case(args, device, model_name, data)
    theta = models.flat_params(model).detach()
    pp = pgpe.PGPEParams(popsize=popsize, sigma_init=args.sigma, lr=1e-3)
    state = pgpe.init(pp, theta)
    points = pgpe.ask(state, pp, 0, list(range(popsize // 2))).to(device)
    opts = dict(kv.split("=", 1) for kv in args.options.split(",") if kv)
    opts = {
        k: (float(v) if k in ("memory_budget_mb", "alpha_lr") else int(v) if k == "alpha_steps" else v)
        for k, v in opts.items()
    }
    if method == "alpha-crown":
        opts.setdefault("alpha_steps", args.alpha_steps)

    def bound():
        with torch.no_grad():
            return margin_lower_bounds(model, x, y, eps, method, points, **opts)

    def step():
        pts = pgpe.ask(state, pp, 0, list(range(popsize // 2))).to(device)
        with torch.no_grad():
            r = losses.certified_loss(model, x, y, eps, method, weights=pts, **opts)
        return pgpe.tell(state, pp, 0, r.detach().to("cpu", torch.float64))

    with torch.no_grad():  # warm-up: kernels, code pages
        margin_lower_bounds(model, x[:2], y[:2], eps, method, points[:2], **opts)
    base = _reset_peak(device)
    t_bound, lb = _timed(bound, device, args.repeats)
    peak = _peak(device, base)
    t_step = _timed(step, device, 1)[0] if args.step else math.nan
    row = {
        "device": device.type,
        "model": model_name,
        "data": data,
        "method": method,
        "popsize": popsize,
        "batch": args.batch,
        "eps": eps,
        "network": args.checkpoint or args.unstable,
        "unstable_fraction": unstable_fraction(model, x, y, eps),
        "bound_s": t_bound,
        "member_examples_per_s": popsize * args.batch / t_bound,
        "step_s": t_step,
        "peak_mb": peak,
        "mean_lb": float(lb.mean()),
        "options": opts,
    }
    if (
        args.peers
        and method in ("deeppoly", "crown")
        and device.type == "cpu"
        or args.peers
        and method in ("deeppoly", "crown")
        and args.peer_on_cuda
    ):
        f = auto_lirpa_compat.bounder(model, x, "deeppoly", "patches")
        n = min(popsize, args.peer_members)
        with torch.no_grad():
            f(x[:2], y[:2], eps)

            def peer_loop():
                for p in points[:n]:
                    models.load_flat_(model, p)
                    out = f(x, y, eps)
                return out

            t_ref, ref = _timed(peer_loop, device, args.peer_repeats)
            t_ref /= n
            mine = margin_lower_bounds(model, x, y, eps, "deeppoly", points[n - 1], **opts)
        models.load_flat_(model, theta)
        row.update(
            auto_lirpa_s=t_ref * popsize,
            auto_lirpa_members_timed=n,
            auto_lirpa_max_abs_diff=float((ref - mine).abs().max()),
            speedup_vs_auto_lirpa=t_ref * popsize / t_bound,
        )
    if args.evotorch and method == "ibp":
        row.update(evotorch_s=evotorch_generation(model, x, y, eps, popsize, args.sigma))
        row["speedup_vs_evotorch"] = row["evotorch_s"] / t_step
    return row


def evotorch_generation(model, x, y, eps, popsize, sigma) -> float:
    """Seconds of one EvoTorch PGPE generation, each solution's IBP loss by its own network."""
    try:
        from evotorch import Problem
        from evotorch.algorithms import PGPE
    except ImportError:
        return math.nan
    theta = models.flat_params(model).detach()

    def fitness(xs: torch.Tensor) -> torch.Tensor:  # (N, D): one network per solution
        out = []
        for row in xs:
            models.load_flat_(model, row)
            with torch.no_grad():
                out.append(losses.certified_loss(model, x, y, eps, "ibp").mean())
        return torch.stack(out)

    prob = Problem("min", fitness, solution_length=theta.numel(), initial_bounds=(-0.01, 0.01), vectorized=True)
    algo = PGPE(
        prob,
        popsize=popsize,
        center_learning_rate=1e-3,
        stdev_learning_rate=0.1,
        stdev_init=sigma,
        center_init=theta.cpu(),
    )
    algo.step()
    t0 = time.perf_counter()
    algo.step()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_generation.json")
    ap.add_argument("--device", default="cpu", help="comma list: cpu,cuda (cuda skipped when absent)")
    ap.add_argument("--models", default="cnn3")
    ap.add_argument("--datasets", default="mnist")
    ap.add_argument("--methods", default="ibp,crown-ibp,deeppoly")
    ap.add_argument("--popsizes", default="8")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--options", default="", help="bound options k=v,k=v (e.g. rows=padded,memory_budget_mb=1024)")
    ap.add_argument("--alpha-steps", type=int, default=5)
    ap.add_argument("--sigma", type=float, default=1e-3)
    ap.add_argument(
        "--unstable",
        choices=["fresh", "trained", "ibp-trained"],
        default="fresh",
        help="ibp-trained: the network certifiably trained here (GRAD + IBP, --train-steps) on "
        "synthetic MNIST-shaped data, bounded on that data",
    )
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument(
        "--inputs",
        choices=["rand", "synthetic"],
        default="rand",
        help="uniform random pixels, or synthetic class prototypes + noise",
    )
    ap.add_argument("--shift", type=float, default=2.0, help="bias shift of the --unstable trained stand-in")
    ap.add_argument("--checkpoint", default=None, help="flat parameter tensor (torch.save) to bound instead")
    ap.add_argument("--repeats", type=int, default=1, help="median of this many timed calls")
    ap.add_argument("--peer-repeats", type=int, default=1, help="median of this many timed peer loops")
    ap.add_argument(
        "--clock",
        choices=sorted(CLOCK),
        default="wall",
        help="wall seconds, or cpu: this process's CPU seconds (fairer on a shared machine, 1 thread)",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-peers", dest="peers", action="store_false", help="skip the auto_LiRPA member loop")
    ap.add_argument("--peer-members", type=int, default=2, help="members the auto_LiRPA loop times (scaled to P)")
    ap.add_argument("--peer-on-cuda", action="store_true", help="also time auto_LiRPA on cuda")
    ap.add_argument("--no-step", dest="step", action="store_false", help="skip the full-step timing")
    ap.add_argument("--evotorch", action="store_true", help="time EvoTorch PGPE next to ibp rows")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    global _clock
    _clock = CLOCK[args.clock]
    rows = []
    head = (
        f"{'dev':4} {'model':5} {'data':5} {'method':11} {'P':>4} {'B':>4} {'unst':>5} {'bound s':>8} "
        f"{'m*ex/s':>8} {'step s':>7} {'peak MB':>8} {'peer s':>8} {'x peer':>6}"
    )
    print(head)
    for dev in args.device.split(","):
        if dev == "cuda" and not torch.cuda.is_available():
            print("cuda: not available, skipped")
            continue
        device = torch.device(dev)
        for model_name in args.models.split(","):
            for data in args.datasets.split(","):
                for method in args.methods.split(","):
                    for popsize in (int(p) for p in args.popsizes.split(",")):
                        r = measure(args, device, model_name, data, method, popsize)
                        rows.append(r)
                        peer = r.get("auto_lirpa_s", r.get("evotorch_s", math.nan))
                        ratio = r.get("speedup_vs_auto_lirpa", r.get("speedup_vs_evotorch", math.nan))
                        print(
                            f"{dev:4} {model_name:5} {data:5} {method:11} {popsize:4d} {args.batch:4d} "
                            f"{r['unstable_fraction']:5.2f} {r['bound_s']:8.3f} {r['member_examples_per_s']:8.0f} "
                            f"{r['step_s']:7.3f} {r['peak_mb']:8.1f} {peer:8.3f} {ratio:6.2f}",
                            flush=True,
                        )
    meta = {
        "clock": args.clock,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "argv": sys.argv[1:],
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
