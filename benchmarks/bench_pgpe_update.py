"""PGPE update cost per rank: the previous `tell` (every rank regenerates the noise of all P/2
pairs and accumulates in float64) against the distributed update (each rank sums its own pairs with
the noise kept from evaluation, then one exact int64 allreduce), measured in the same process.

For N ranks the new path times rank 0's share (blocks of rank 0 of N) on a SerialComm, so the
network term (one allreduce of 2 D int64, one scalar allreduce) is NOT included: see
benchmarks/scaling_model.py for it. The old path is the same for every N (it did not shrink).
Also measures the overlap option: one generation's evaluate+update with noise prefetching on a
background thread on and off (on CPU with one thread per rank it competes with the bounds).
Every timed call runs interleaved with the others, --repeat rounds (median; speedups are the
median of the per-round ratios).

    python -m benchmarks.bench_pgpe_update --model cnn5 --shape 1,28,28 --popsize 256 --ranks 1,2,8,64

Prints a table and writes a record.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from benchmarks import common
from mpigls import parallel
from mpigls.nn import models
from mpigls.numerics import noise
from mpigls.objectives import losses
from mpigls.optim import pgpe, unit
from mpigls.parallel import pgpe_unit


def old_gradients(state, params, seed, losses_, with_sigma=True, summed=None):
    """The implementation before the distributed update (verbatim logic): regenerate the noise of ALL
    pairs in chunks of 64 and accumulate sequentially in float64."""
    w = pgpe.weights(params, losses_)
    if w.num_valid == 0:
        return None, None, 0
    num_pairs, D = params.popsize // 2, state.center.numel()
    acc_c = torch.zeros(D, dtype=torch.float64)
    acc_s = torch.zeros(D, dtype=torch.float64)
    for start in range(0, num_pairs, 64):
        members = range(start, min(num_pairs, start + 64))
        block = noise.noise_block(seed, state.generation, members, D, noise.STREAM_PGPE)
        for row, j in enumerate(members):
            z = block[row].to(torch.float64)
            acc_c += float(w.center[j]) * z
            if with_sigma:
                acc_s += float(w.sigma[j]) * z.mul_(z).sub_(1.0)
    sigma = state.sigma.detach().to("cpu", torch.float64)
    return acc_c / (w.num_valid * sigma), acc_s / (w.num_valid * sigma) if with_sigma else None, w.num_valid


OVERLAP = {"no_prefetch": False, "prefetch": True}


def with_old_gradients(fn):
    """``fn`` run with ``pgpe.gradients`` replaced by ``old_gradients`` (restored after)."""

    def run():
        orig, pgpe.gradients = pgpe.gradients, old_gradients
        try:
            return fn()
        finally:
            pgpe.gradients = orig

    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_record_args(p)
    p.add_argument("--model", default="cnn5")
    p.add_argument("--shape", default="1,28,28", help="C,H,W of the input (MNIST 1,28,28; CIFAR 3,32,32)")
    p.add_argument("--popsize", type=int, default=256)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--ranks", default="1,2,8,64")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fixed-sigma", action="store_true")
    p.add_argument("--overlap-batch", type=int, default=16, help="batch for the prefetch on/off generation (0: skip)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.shape.split(","))
    torch.manual_seed(0)
    model = models.build(args.model, shape, 10, [0.0] * shape[0], [1.0] * shape[0])
    theta = models.flat_params(model)
    D = theta.numel()
    params = pgpe.PGPEParams(popsize=args.popsize, fixed_sigma=args.fixed_sigma, sigma_init=1e-3)
    state = pgpe.init(params, theta)
    seed, num_pairs, bs = 0, args.popsize // 2, args.block_size
    num_blocks = math.ceil(num_pairs / bs)
    fake_losses = torch.randn(args.popsize, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    comm = parallel.SerialComm()

    old_tell = with_old_gradients(lambda: pgpe.tell(state, params, seed, fake_losses))
    old_state, _ = old_tell()
    new_state, _ = pgpe.tell(state, params, seed, fake_losses)  # serial new path (regenerates): for the check
    max_diff = float((new_state.center - old_state.center).abs().max())

    peers = {"old": old_tell}
    pairs_of = {}
    for n in (int(r) for r in args.ranks.split(",")):
        blocks = parallel.my_blocks(num_blocks, 0, n) if n <= num_blocks else [0]
        pairs = pairs_of[n] = [list(unit.block_items(b, bs, num_pairs)) for b in blocks]
        zs = [pgpe.pair_noise(seed, 0, q, D) for q in pairs]
        local = pgpe_unit.LocalNoise(pairs, zs, max(pgpe.max_abs_noise(z) for z in zs))

        def new_tell(local=local):
            summed = pgpe_unit.reduce_sums(comm, state, params, seed, fake_losses, local)
            return pgpe.tell(state, params, seed, fake_losses, summed=summed)

        peers[f"noise{n}"] = lambda pairs=pairs: [pgpe.pair_noise(seed, 0, q, D) for q in pairs]
        peers[f"new{n}"] = new_tell
    times = common.time_peers(peers, args.repeat)
    med = {k: common.spread(v).median for k, v in times.items()}
    rows = []
    for n, pairs in pairs_of.items():
        rows.append(
            {
                "ranks": n,
                "pairs_per_rank": sum(map(len, pairs)),
                "old_tell_s": med["old"],
                "new_tell_s": med[f"new{n}"],
                "tell_speedup": common.ratio_spread(times["old"], times[f"new{n}"]).median,
                "eval_noise_s": med[f"noise{n}"],
                "old_total_s": med["old"] + med[f"noise{n}"],
                "new_total_s": med[f"new{n}"] + med[f"noise{n}"],
            }
        )
    print(
        f"{args.model} {shape} D={D} P={args.popsize} block={bs} threads={args.threads} "
        f"(per rank; old tell = regenerate all {num_pairs} pairs + float64 loop)"
    )
    print(
        f"{'ranks':>5} {'pairs/rank':>10} {'old tell s':>10} {'new tell s':>10} {'speedup':>8} "
        f"{'eval noise s':>12} {'old+noise':>10} {'new+noise':>10}"
    )
    for r in rows:
        print(
            f"{r['ranks']:5d} {r['pairs_per_rank']:10d} {r['old_tell_s']:10.4f} {r['new_tell_s']:10.4f} "
            f"{r['tell_speedup']:8.1f} {r['eval_noise_s']:12.4f} {r['old_total_s']:10.4f} {r['new_total_s']:10.4f}"
        )
    print(f"max |theta_new - theta_old| after one tell: {max_diff:.3g} (float rounding of the sums)")

    overlap = None
    if args.overlap_batch:
        x = torch.rand((args.overlap_batch, *shape))
        y = torch.randint(0, 10, (args.overlap_batch,))
        loss_fn = lambda pts, ex: losses.certified_loss(model, x[ex], y[ex], 0.01, "ibp", weights=pts)  # noqa: E731
        blocks = parallel.my_blocks(num_blocks, 0, 1)
        split = pgpe_unit.split_of(params, bs, args.overlap_batch)
        sources = {name: pgpe_unit.NoiseSource(seed, prefetch) for name, prefetch in OVERLAP.items()}

        def generation(src):
            st = state

            def run():
                nonlocal st
                local_losses, kept = pgpe_unit.evaluate(st, params, blocks, split, src, loss_fn, torch.device("cpu"))
                summed = pgpe_unit.reduce_sums(comm, st, params, seed, local_losses, kept)
                st, _ = pgpe.tell(st, params, seed, local_losses, summed=summed)

            return run

        times = common.time_peers({name: generation(src) for name, src in sources.items()}, args.repeat)
        for src in sources.values():
            src.close()
        overlap = {name: common.spread(t).median for name, t in times.items()}
        overlap["speedup"] = common.ratio_spread(times["no_prefetch"], times["prefetch"]).median
        print(
            f"one generation on CPU (IBP, batch {args.overlap_batch}, 1 rank): no prefetch "
            f"{overlap['no_prefetch']:.3f} s, prefetch {overlap['prefetch']:.3f} s, ratio {overlap['speedup']:.2f}"
        )
    results = {"rows": rows, "D": D, "max_theta_diff_old_new": max_diff, "overlap": overlap}
    common.write_record("bench_pgpe_update", args, results, args.out, args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
