"""Seconds per PGPE generation: the bound work of a whole population, and the generation ``train`` runs.

For every (device, model, dataset, method, population size P) it bounds P members (the PGPE
centre plus sigma-noise, as train.py evaluates them) on one batch of B examples and reports:

- ``bound_s``: margin_lower_bounds for all P members in one call (torch.no_grad, the strategy
  picked by ``population`` / ``rows``, default auto), and member·examples per second;
- ``generation_s``: one whole PGPE generation on one rank as ``mpigls train`` runs it
  (``train_generation``: the optimizer unit's ``evaluate`` over the rank's work blocks of
  ``--block-size`` pairs, ``exchange`` through a single-rank comm, ``tell``), its median and range
  over ``--repeats`` calls interleaved with the bound calls;
- ``peak_mb``: the peak memory growth of one bound call (``common.PeakMemory``);
- peers in the same run on the same networks and inputs: ``auto_lirpa_s``, auto_LiRPA 0.3 CROWN
  (patches) in a loop over the members (deeppoly rows; measured on ``--peer-members`` members
  and scaled to P, stated in the record), and with ``--evotorch`` EvoTorch's PGPE generation
  (one network per solution; needs ``pip install evotorch``), each with the paired ratio.

``--unstable fresh|trained`` bounds a freshly initialised network, or one with few unstable
neurons ("trained": the same network with its biases shifted up by ``--shift`` so most ReLUs are
stably active at the given eps; a synthetic stand-in for a certifiably trained checkpoint, or
``--checkpoint path.pt`` to load a real one; "ibp-trained": certifiably trained here, GRAD + IBP
on synthetic MNIST-shaped data for ``--train-steps``, and bounded on that data). ``--clock cpu``
times CPU seconds of the process (fairer on a shared machine, 1 thread).

Short CPU default (a minute or two); on a GPU:

  python -m benchmarks.bench_generation --device cuda --models cnn3,cnn5 --popsizes 256 --batch 512 \\
      --methods ibp,crown-ibp,deeppoly,alpha-crown
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math

import torch

from benchmarks import auto_lirpa_compat, common
from mpigls import data as mdata, parallel
from mpigls.bounds import margin_lower_bounds
from mpigls.nn import models
from mpigls.numerics import precision
from mpigls.objectives import losses
from mpigls.optim import pgpe, registry as optimizers, unit
from mpigls.run import hostmem

SHAPES = {"mnist": ((1, 28, 28), 0.1), "cifar": ((3, 32, 32), 2 / 255)}


class TrainGeneration:
    """One PGPE generation per call, on one rank, exactly as ``train.train``'s loop runs it.

    The registered optimizer unit (``optimizers.get("pgpe")``) with its noise source open
    (``open``), the numeric settings of a run (``precision.training`` with the config defaults)
    and the allocator setting of a run (``hostmem.keep_freed_memory``); each call evaluates this
    rank's work blocks (``pgpe_dist.evaluate``), exchanges through a ``parallel.SerialComm`` (the
    losses' all-gather, the exact fixed-point sums) and tells; the state advances as in training.
    ``close()`` (or ``with``) closes the noise source and restores the settings.
    """

    def __init__(self, model, x, y, eps, method, popsize, sigma, block_size, opts, device, seed=0, chunks=1):
        self.opt = optimizers.get("pgpe")
        self.params = pgpe.PGPEParams(popsize=popsize, sigma_init=sigma, lr=1e-3)
        self.comm = parallel.SerialComm()
        self.state = unit.to_device(self.opt.init(self.params, models.flat_params(model).detach().cpu()), device)
        num_blocks = unit.num_blocks(self.opt.num_items(self.params, x.shape[0]), block_size) * chunks
        self.blocks = parallel.my_blocks(num_blocks, self.comm.rank, self.comm.world_size)
        hostmem.keep_freed_memory()
        self._stack = contextlib.ExitStack()
        resource = self._stack.enter_context(self.opt.open(seed, device, self.params))
        self._stack.enter_context(precision.training(device=device))

        def loss(points: torch.Tensor, examples: slice = slice(None)) -> torch.Tensor:
            return losses.certified_loss(model, x[examples], y[examples], eps, method, weights=points, **opts)

        def no_grad(points: torch.Tensor, examples: slice):
            raise RuntimeError("PGPE evaluates losses only")

        self.work = unit.Work(seed, device, block_size, x.shape[0], loss, no_grad, resource, chunks)

    def __call__(self) -> torch.Tensor:
        local = self.opt.evaluate(self.work, self.state, self.params, self.blocks)
        all_losses, reduced, _ = self.opt.exchange(self.comm, self.work, self.state, self.params, local, unit.Control())
        self.state, _ = self.opt.tell(self.work, self.state, self.params, all_losses, reduced, 1e-3)
        return all_losses

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> TrainGeneration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


def parse_options(text: str, method: str, alpha_steps: int) -> dict:
    """Bound options from ``k=v,k=v`` (numbers where the option is numeric)."""
    opts = dict(kv.split("=", 1) for kv in text.split(",") if kv)
    opts = {
        k: (float(v) if k in ("memory_budget_mb", "alpha_lr") else int(v) if k == "alpha_steps" else v)
        for k, v in opts.items()
    }
    if method == "alpha-crown":
        opts.setdefault("alpha_steps", alpha_steps)
    return opts


def restoring(model, theta: torch.Tensor, fn):
    """``fn`` followed by putting ``theta`` back into ``model`` (peers that load members into it)."""

    def run():
        out = fn()
        models.load_flat_(model, theta)
        return out

    return run


def measure(args, device, model_name, data, method, popsize) -> dict:
    model, x, y, eps = make_case(args, device, model_name, data)
    theta = models.flat_params(model).detach()
    pp = pgpe.PGPEParams(popsize=popsize, sigma_init=args.sigma, lr=1e-3)
    points = pgpe.ask(pgpe.init(pp, theta), pp, 0, list(range(popsize // 2))).to(device)
    opts = parse_options(args.options, method, args.alpha_steps)

    def bound():
        with torch.no_grad():
            return margin_lower_bounds(model, x, y, eps, method, points, **opts)

    with torch.no_grad():  # warm-up: kernels, code pages
        margin_lower_bounds(model, x[:2], y[:2], eps, method, points[:2], **opts)
    with common.PeakMemory(device) as mem:
        lb = bound()
    peers = {"bound": bound}
    with contextlib.ExitStack() as stack:
        if args.step:
            gen = TrainGeneration(model, x, y, eps, method, popsize, args.sigma, args.block_size, opts, device)
            peers["generation"] = stack.enter_context(gen)
        n_peer = min(popsize, args.peer_members)
        lirpa = args.peers and method in ("deeppoly", "crown") and (device.type == "cpu" or args.peer_on_cuda)
        if lirpa:
            f = auto_lirpa_compat.bounder(model, x, "deeppoly", "patches")

            def peer_loop():
                with torch.no_grad():
                    for p in points[:n_peer]:
                        models.load_flat_(model, p)
                        out = f(x, y, eps)
                return out

            peers["auto_lirpa"] = restoring(model, theta, peer_loop)
        if args.evotorch and method == "ibp":
            evo = evotorch_step(model, x, y, eps, popsize, args.sigma)
            if evo is not None:
                peers["evotorch"] = restoring(model, theta, evo)
        times = common.time_peers(peers, args.repeats, clock=CLOCK, sync=common.sync_for(device))
    t_bound = common.spread(times["bound"])
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
        "bound_s": t_bound.median,
        "bound_s_range": [t_bound.low, t_bound.high],
        "member_examples_per_s": popsize * args.batch / t_bound.median,
        "generation_s": math.nan,
        "peak_mb": mem.mb,
        "mean_lb": float(lb.mean()),
        "repeats": args.repeats,
        "options": opts,
    }
    if "generation" in times:
        t_gen = common.spread(times["generation"])
        row.update(generation_s=t_gen.median, generation_s_range=[t_gen.low, t_gen.high])
    if "auto_lirpa" in times:
        scaled = [t / n_peer * popsize for t in times["auto_lirpa"]]
        with torch.no_grad():
            models.load_flat_(model, points[n_peer - 1])
            ref = f(x, y, eps)
            models.load_flat_(model, theta)
            mine = margin_lower_bounds(model, x, y, eps, "deeppoly", points[n_peer - 1], **opts)
        ratio = common.ratio_spread(scaled, times["bound"])
        row.update(
            auto_lirpa_s=common.spread(scaled).median,
            auto_lirpa_members_timed=n_peer,
            auto_lirpa_max_abs_diff=float((ref - mine).abs().max()),
            speedup_vs_auto_lirpa=ratio.median,
            speedup_vs_auto_lirpa_range=[ratio.low, ratio.high],
        )
    if "evotorch" in times and "generation" in times:
        ratio = common.ratio_spread(times["evotorch"], times["generation"])
        row.update(
            evotorch_s=common.spread(times["evotorch"]).median,
            speedup_vs_evotorch=ratio.median,
            speedup_vs_evotorch_range=[ratio.low, ratio.high],
        )
    return row


def evotorch_step(model, x, y, eps, popsize, sigma):
    """One EvoTorch PGPE generation per call (each solution's IBP loss by its own network, loaded into
    ``model``), or None when EvoTorch is not installed. Warmed up by one generation."""
    try:
        from evotorch import Problem
        from evotorch.algorithms import PGPE
    except ImportError:
        return None
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
    return algo.step


CLOCK = common.CLOCKS["wall"]


def main(argv=None) -> int:
    global CLOCK
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_record_args(ap)
    ap.add_argument("--device", default="cpu", help="comma list: cpu,cuda (cuda skipped when absent)")
    ap.add_argument("--models", default="cnn3")
    ap.add_argument("--datasets", default="mnist")
    ap.add_argument("--methods", default="ibp,crown-ibp,deeppoly")
    ap.add_argument("--popsizes", default="8")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=8, help="optimizer.block_size of the timed generation")
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
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds of every timed peer (median, range)")
    ap.add_argument(
        "--clock",
        choices=sorted(common.CLOCKS),
        default="wall",
        help="wall seconds, or cpu: this process's CPU seconds (fairer on a shared machine, 1 thread)",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-peers", dest="peers", action="store_false", help="skip the auto_LiRPA member loop")
    ap.add_argument("--peer-members", type=int, default=2, help="members the auto_LiRPA loop times (scaled to P)")
    ap.add_argument("--peer-on-cuda", action="store_true", help="also time auto_LiRPA on cuda")
    ap.add_argument("--no-step", dest="step", action="store_false", help="skip the training-generation timing")
    ap.add_argument("--evotorch", action="store_true", help="time EvoTorch PGPE next to ibp rows")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    CLOCK = common.CLOCKS[args.clock]
    rows = []
    head = (
        f"{'dev':4} {'model':5} {'data':5} {'method':11} {'P':>4} {'B':>4} {'unst':>5} {'bound s':>8} "
        f"{'m*ex/s':>8} {'gen s':>7} {'peak MB':>8} {'peer s':>8} {'x peer':>6}"
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
                            f"{r['generation_s']:7.3f} {r['peak_mb']:8.1f} {peer:8.3f} {ratio:6.2f}",
                            flush=True,
                        )
    common.write_record("bench_generation", args, {"rows": rows}, args.out, args.note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
