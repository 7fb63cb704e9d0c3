"""PGPE + IBP generation on CPU: mpigls with the IBP population chunked and unchunked, and EvoTorch's PGPE.

One process, rounds interleaved (EvoTorch, ours unchunked, ours chunked) so that a loaded machine
slows all three alike; reports the median seconds and the median (and range) of the per-round
ratios EvoTorch / ours and unchunked / chunked. Ours is the generation ``mpigls train`` runs
(``bench_generation.TrainGeneration``: evaluate, exchange on one rank, tell); "unchunked" sets
``bounds.ibp.CPU_CHUNK_BYTES`` huge, which is the bound path without chunking. EvoTorch is timed
when installed (``pip install evotorch``, the ``bench`` extra).

    OMP_NUM_THREADS=1 python -m benchmarks.bench_ibp_evotorch --rounds 5
"""

from __future__ import annotations

import argparse

import torch

from benchmarks import bench_generation as bg, common
from mpigls.bounds import ibp
from mpigls.nn import models
from mpigls.objectives import losses
from mpigls.optim import pgpe

UNCHUNKED = 1 << 62


def with_chunk_bytes(chunk_bytes: int, fn):
    """``fn`` run with ``ibp.CPU_CHUNK_BYTES`` set to ``chunk_bytes`` (restored after)."""

    def run():
        old, ibp.CPU_CHUNK_BYTES = ibp.CPU_CHUNK_BYTES, chunk_bytes
        try:
            return fn()
        finally:
            ibp.CPU_CHUNK_BYTES = old

    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_record_args(ap)
    ap.add_argument("--model", default="cnn3")
    ap.add_argument("--data", default="mnist")
    ap.add_argument("--popsize", type=int, default=64)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=8, help="optimizer.block_size of our generation")
    ap.add_argument("--sigma", type=float, default=0.01)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    ns = argparse.Namespace(batch=args.batch, checkpoint=None, unstable="fresh", shift=0.0, inputs="rand")
    model, x, y, eps = bg.make_case(ns, cpu, args.model, args.data)
    theta = models.flat_params(model).detach()
    pp = pgpe.PGPEParams(popsize=args.popsize, sigma_init=args.sigma, lr=1e-3)
    pts = pgpe.ask(pgpe.init(pp, theta), pp, 0, list(range(args.popsize // 2)))
    chunked = ibp.CPU_CHUNK_BYTES
    with torch.no_grad():  # the two paths give the same bounds (float rounding)
        ref = losses.certified_loss(model, x, y, eps, "ibp", weights=pts)
        old = with_chunk_bytes(UNCHUNKED, lambda: losses.certified_loss(model, x, y, eps, "ibp", weights=pts))()
    gen = bg.TrainGeneration(model, x, y, eps, "ibp", args.popsize, args.sigma, args.block_size, {}, cpu)
    peers = {}
    evo = bg.evotorch_step(model, x, y, eps, args.popsize, args.sigma)
    if evo is not None:
        peers["evotorch"] = bg.restoring(model, theta, evo)
    peers["unchunked"] = with_chunk_bytes(UNCHUNKED, gen)
    peers["chunked"] = with_chunk_bytes(chunked, gen)
    with gen:
        times = common.time_peers(peers, args.rounds)
    med = {k: common.spread(v).median for k, v in times.items()}
    rows = []
    for name in peers:
        s = common.spread(times[name])
        row = {"path": name, "median_s": s.median, "low_s": s.low, "high_s": s.high}
        if "evotorch" in times:
            r = common.ratio_spread(times["evotorch"], times[name])
            row.update(speedup_vs_evotorch=r.median, speedup_vs_evotorch_range=[r.low, r.high])
        r = common.ratio_spread(times["unchunked"], times[name])
        row.update(speedup_vs_unchunked=r.median, speedup_vs_unchunked_range=[r.low, r.high])
        rows.append(row)
    print(
        f"{args.model} {args.data} P={args.popsize} B={args.batch} threads={args.threads} "
        f"rounds={args.rounds} (median s; ratios = median of the per-round ratios)"
    )
    print(f"{'path':<12}{'seconds':>10}{'vs EvoTorch':>13}{'vs unchunked':>14}")
    for row in rows:
        print(
            f"{row['path']:<12}{row['median_s']:>10.3f}{row.get('speedup_vs_evotorch', float('nan')):>13.2f}"
            f"{row['speedup_vs_unchunked']:>14.2f}"
        )
    diff = float((ref - old).abs().max())
    print(f"max |loss chunked - unchunked| = {diff:.3g}" + ("" if evo else "; EvoTorch not installed, not timed"))
    results = {"rows": rows, "seconds": times, "median_s": med, "chunk_bytes": chunked, "max_abs_loss_diff": diff}
    common.write_record("bench_ibp_evotorch", args, results, args.out, args.note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
