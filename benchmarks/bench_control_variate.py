"""Seconds per PGPE generation with and without the control variate (``optimizer.control_variate``).

One PGPE generation as ``mpigls train`` runs it on one rank (the registered unit's ``evaluate``,
``exchange`` through a single-rank comm, ``tell``), for the variants

- ``plain``: PGPE with centered ranks (the study's pgpe-deeppoly-pgd row);
- ``grad``: the control variate g = the backpropagated gradient at theta (one backward pass of the
  bound on the whole batch, every rank alike), raw losses;
- ``running``: the zeroth-order running average of past estimates, raw losses;

on the same network, batch, bound and noise, interleaved round by round (``common.time_peers``),
with the paired ratios to ``plain``. The network is a run's checkpoint (``--checkpoint``: an HDF5
checkpoint of ``mpigls train``, its config decides dataset, model, eps and bound) or a fresh one.

  python -m benchmarks.bench_control_variate --checkpoint runs/.../latest.h5 --popsize 64 --repeats 7
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from benchmarks import common
from mpigls import config as config_mod, parallel
from mpigls.nn import models
from mpigls.numerics import precision
from mpigls.optim import pgpe, registry as optimizers, unit
from mpigls.run import hostmem

VARIANTS = {
    "plain": {"fitness_shaping": "centered_ranks", "control_variate": "none"},
    "grad": {"fitness_shaping": "raw", "control_variate": "grad"},
    "running": {"fitness_shaping": "raw", "control_variate": "running"},
}


class Generation:
    """One PGPE generation per call with the given Params, as the training loop runs it: the work of
    ``run.train.generation_work`` for ``cfg`` (its bound, eps, seed and optimizer.block_size)."""

    def __init__(self, cfg, model, theta, x, y, params, stack: contextlib.ExitStack):
        from mpigls.run import train as train_mod

        self.opt = optimizers.get("pgpe")
        self.params = params
        self.comm = parallel.SerialComm()
        self.state = self.opt.init(params, theta)
        blocks = unit.num_blocks(self.opt.num_items(params, x.shape[0]), cfg.optimizer.block_size)
        self.blocks = parallel.my_blocks(blocks, 0, 1)
        cpu = torch.device("cpu")
        resource = stack.enter_context(self.opt.open(cfg.train.seed, cpu, params))
        opts = train_mod.bound_options(cfg, 0)
        self.work = train_mod.generation_work(cfg, model, x, y, cfg.bound.eps, opts, cpu, resource)

    def __call__(self) -> None:
        local = self.opt.evaluate(self.work, self.state, self.params, self.blocks)
        all_losses, reduced, _ = self.opt.exchange(self.comm, self.work, self.state, self.params, local, unit.Control())
        self.state, _ = self.opt.tell(self.work, self.state, self.params, all_losses, reduced, 1e-3)


def problem(args):
    """(cfg, model, theta, x, y, description): the checkpoint's config (or a fresh digits CNN3 at eps 0.2)
    with --method (default: the config's bound, DeepPoly after a PGD warm start) and --block-size."""
    from mpigls.run import checkpoint, train as train_mod

    if args.checkpoint:
        ckpt = checkpoint.load(args.checkpoint)
        values = config_mod.to_dict(config_mod.from_dict(ckpt.config))
        theta = torch.from_numpy(ckpt.theta.copy())
        what = f"checkpoint {args.checkpoint} (generation {ckpt.generation})"
    else:
        values = {"data": {"name": "digits"}, "model": {"name": "cnn3"}, "bound": {"eps": 0.2}}
        theta = None
        what = "a fresh digits CNN3"
    method = config_mod.from_dict(values).bound.method
    values["bound"]["method"] = args.method or (method if method != "pgd" else "deeppoly")
    values.setdefault("optimizer", {})["block_size"] = args.block_size
    cfg = config_mod.from_dict(values)
    dataset, model, _ = train_mod.build_problem(cfg)
    theta = models.flat_params(model).detach().clone() if theta is None else theta
    return cfg, model, theta, dataset.train_x[: args.batch], dataset.train_y[: args.batch], what


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_record_args(ap)
    ap.add_argument("--checkpoint", default=None, help="an mpigls HDF5 checkpoint (default: a fresh digits CNN3)")
    ap.add_argument("--method", default=None, help="bound method (default: the checkpoint's)")
    ap.add_argument("--popsize", type=int, default=64)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--sigma", type=float, default=1e-3)
    ap.add_argument("--repeats", type=int, default=7, help="interleaved rounds (median and range)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg, model, theta, x, y, what = problem(args)
    hostmem.keep_freed_memory()
    with contextlib.ExitStack() as stack:
        stack.enter_context(precision.training(device=torch.device("cpu")))
        peers = {}
        for name, keys in VARIANTS.items():
            params = pgpe.PGPEParams(popsize=args.popsize, sigma_init=args.sigma, lr=1e-3, **keys)
            peers[name] = Generation(cfg, model, theta, x, y, params, stack)
        times = common.time_peers(peers, args.repeats, clock=common.CLOCKS["cpu"], alternate=True)
    rows = []
    for name, t in times.items():
        row = {"variant": name, **{f"{k}_s": v for k, v in common.spread(t).as_dict().items() if k != "n"}}
        ratio = common.ratio_spread(t, times["plain"]).as_dict()
        row.update({f"over_plain_{k}": v for k, v in ratio.items() if k != "n"})
        row["repeats"] = len(t)
        rows.append(row)
        print(
            f"{name:8s} {row['median_s']:.3f} s/generation (CPU seconds, median of {len(t)}), "
            f"{row['over_plain_median']:.3f}x plain (range {row['over_plain_low']:.3f}-{row['over_plain_high']:.3f})"
        )
    problem_row = {"network": what, "method": cfg.bound.method, "eps": cfg.bound.eps, "dimension": int(theta.numel())}
    results = {"rows": rows, "problem": problem_row}
    common.write_record("bench_control_variate", args, results, args.out, args.note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
