"""Per-rank work of one PGPE generation for N ranks, measured in ONE process (robust to a loaded
machine, unlike wall-clock runs of several ranks that compete for cores with other jobs).

For every N and every rank r of N, times what rank r computes in a generation: evaluating its
blocks (noise, population, bound-based loss) plus its update share, for the new distributed update
(its own pairs' fixed-point sums + the step) and the previous one (every rank regenerated all
P/2 pairs and summed in float64: benchmarks/bench_pgpe_update.old_gradients). t_N = max over ranks;
the runs for different N are interleaved and the best of --repeat is kept. Communication is NOT
included (on one node: tens of microseconds for these sizes; see benchmarks/scaling_model.py).
Efficiency E(N) = t_1 / (N t_N).

    python -m benchmarks.bench_rank_work --model cnn7 --popsize 64 --batch 16 --bound ibp --ranks 1,2,4
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from benchmarks import common
from benchmarks.bench_pgpe_update import with_old_gradients
from mpigls import data, parallel
from mpigls.nn import models
from mpigls.objectives import losses
from mpigls.optim import pgpe
from mpigls.parallel import pgpe_unit


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_record_args(p)
    p.add_argument("--model", default="cnn7")
    p.add_argument("--popsize", type=int, default=64)
    p.add_argument("--block-size", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batch-chunks", type=int, default=1, help="optimizer.batch_chunks: example chunks per member")
    p.add_argument("--bound", default="ibp")
    p.add_argument("--eps", type=float, default=0.05)
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    ds = data.load("digits")
    torch.manual_seed(0)
    model = models.build(args.model, ds.in_shape, ds.num_classes, ds.mean, ds.std)
    theta = models.flat_params(model)
    params = pgpe.PGPEParams(popsize=args.popsize, sigma_init=0.02)
    state = pgpe.init(params, theta)
    x, y = ds.train_x[: args.batch], ds.train_y[: args.batch]
    loss_fn = lambda pts, ex: losses.certified_loss(model, x[ex], y[ex], args.eps, args.bound, weights=pts)  # noqa: E731
    split = pgpe_unit.split_of(params, args.block_size, args.batch, args.batch_chunks)
    num_items = split.num_items
    comm = parallel.SerialComm()
    # the full population's losses once (every rank sees them after the allgather)
    local, _ = pgpe_unit.evaluate(
        state, params, list(range(num_items)), split, pgpe_unit.NoiseSource(0), loss_fn, torch.device("cpu")
    )
    all_losses = pgpe_unit.gather_losses(comm, split, local)[0]
    ranks = [int(n) for n in args.ranks.split(",")]

    def rank_share(n: int, r: int):
        """Rank r of n's generation, timed in three parts: {"eval", "new", "old"} seconds."""
        items = parallel.my_blocks(num_items, r, n)

        def run() -> dict[str, float]:
            t0 = time.perf_counter()
            _, kept = pgpe_unit.evaluate(
                state, params, items, split, pgpe_unit.NoiseSource(0), loss_fn, torch.device("cpu")
            )
            t1 = time.perf_counter()
            summed = pgpe_unit.reduce_sums(comm, state, params, 0, all_losses, kept)
            pgpe.tell(state, params, 0, all_losses, summed=summed)
            t2 = time.perf_counter()
            with_old_gradients(lambda: pgpe.tell(state, params, 0, all_losses))()
            return {"eval": t1 - t0, "new": t2 - t1, "old": time.perf_counter() - t2}

        return run

    runs = common.interleave({(n, r): rank_share(n, r) for n in ranks for r in range(n)}, args.repeat)
    best = {(n, r, kind): min(t[kind] for t in runs[n, r]) for (n, r) in runs for kind in ("eval", "new", "old")}
    rows = []
    for n in ranks:
        new = max(best[n, r, "eval"] + best[n, r, "new"] for r in range(n))
        old = max(best[n, r, "eval"] + best[n, r, "old"] for r in range(n))
        rows.append(
            {
                "ranks": n,
                "t_new": new,
                "t_old": old,
                "eval": max(best[n, r, "eval"] for r in range(n)),
                "update_new": max(best[n, r, "new"] for r in range(n)),
                "update_old": max(best[n, r, "old"] for r in range(n)),
            }
        )
    for r in rows:
        r["eff_new"] = rows[0]["t_new"] * rows[0]["ranks"] / (r["t_new"] * r["ranks"])
        r["eff_old"] = rows[0]["t_old"] * rows[0]["ranks"] / (r["t_old"] * r["ranks"])
    print(
        f"{args.model} on digits (D={theta.numel()}), PGPE + {args.bound}, P={args.popsize}, batch {args.batch}, "
        f"block {args.block_size}, {args.batch_chunks} batch chunk(s) ({num_items} items), 1 thread; "
        f"per-rank work, max over ranks, best of {args.repeat}, no communication"
    )
    print(
        f"{'ranks':>5} {'eval s':>8} {'upd new':>8} {'upd old':>8} {'t new':>8} {'t old':>8} {'E new':>6} {'E old':>6}"
    )
    for r in rows:
        print(
            f"{r['ranks']:5d} {r['eval']:8.4f} {r['update_new']:8.4f} {r['update_old']:8.4f} {r['t_new']:8.4f} "
            f"{r['t_old']:8.4f} {r['eff_new']:6.2f} {r['eff_old']:6.2f}"
        )
    common.write_record("bench_rank_work", args, {"rows": rows, "D": theta.numel()}, args.out, args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
