"""PGPE + IBP generation on CPU: mpigls unchunked (the old path) and chunked vs EvoTorch PGPE.

One process, rounds interleaved (EvoTorch, ours unchunked, ours chunked) so that a loaded machine
slows all three alike; reports the median seconds and the median of the per-round ratios
EvoTorch / ours. Ours is the generation as ``tools/bench_generation.py`` times it (``pgpe.ask``
+ ``losses.certified_loss(..., "ibp")`` + ``pgpe.tell``); "unchunked" sets
``bounds.ibp.CPU_CHUNK_BYTES`` huge, which is the bound path before chunking.

    OMP_NUM_THREADS=1 python tools/bench_ibp_evotorch.py --rounds 5 --out ibp_evotorch.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_generation as bg
from mpigls import losses, models
from mpigls.bounds import ibp
from mpigls.optim import pgpe


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cnn3")
    ap.add_argument("--data", default="mnist")
    ap.add_argument("--popsize", type=int, default=64)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--sigma", type=float, default=0.01)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ns = argparse.Namespace(batch=args.batch, checkpoint=None, unstable="fresh", shift=0.0)
    model, x, y, eps = bg.make_case(ns, torch.device("cpu"), args.model, args.data)
    theta = models.flat_params(model).detach()
    pp = pgpe.PGPEParams(popsize=args.popsize, sigma_init=args.sigma, lr=1e-3)
    state = pgpe.init(pp, theta)
    pairs = list(range(args.popsize // 2))

    def ours(chunk_bytes: int) -> float:
        old = ibp.CPU_CHUNK_BYTES
        ibp.CPU_CHUNK_BYTES = chunk_bytes
        try:
            t0 = time.perf_counter()
            pts = pgpe.ask(state, pp, 0, pairs)
            with torch.no_grad():
                r = losses.certified_loss(model, x, y, eps, "ibp", weights=pts)
            pgpe.tell(state, pp, 0, r.detach().to(torch.float64))
            return time.perf_counter() - t0
        finally:
            ibp.CPU_CHUNK_BYTES = old

    chunked = ibp.CPU_CHUNK_BYTES
    unchunked = 1 << 62
    with torch.no_grad():  # the two paths give the same bounds (float rounding)
        ref = losses.certified_loss(model, x, y, eps, "ibp", weights=pgpe.ask(state, pp, 0, pairs))
        ibp.CPU_CHUNK_BYTES = unchunked
        old = losses.certified_loss(model, x, y, eps, "ibp", weights=pgpe.ask(state, pp, 0, pairs))
        ibp.CPU_CHUNK_BYTES = chunked
    ours(chunked), ours(unchunked)  # warm-up
    rows: dict[str, list[float]] = {"evotorch": [], "unchunked": [], "chunked": []}
    for _ in range(args.rounds):
        rows["evotorch"].append(bg.evotorch_generation(model, x, y, eps, args.popsize, args.sigma))
        models.load_flat_(model, theta)
        rows["unchunked"].append(ours(unchunked))
        rows["chunked"].append(ours(chunked))
    med = {k: statistics.median(v) for k, v in rows.items()}
    ratio = {k: statistics.median(e / o for e, o in zip(rows["evotorch"], rows[k])) for k in ("unchunked", "chunked")}
    out = {
        "model": args.model,
        "data": args.data,
        "popsize": args.popsize,
        "batch": args.batch,
        "threads": args.threads,
        "rounds": args.rounds,
        "chunk_bytes": chunked,
        "seconds": rows,
        "median_s": med,
        "speedup_vs_evotorch": ratio,
        "max_abs_loss_diff": float((ref - old).abs().max()),
    }
    print(
        f"{args.model} {args.data} P={args.popsize} B={args.batch} threads={args.threads} "
        f"rounds={args.rounds} (median s; ratio = median of per-round EvoTorch/ours)"
    )
    print(f"{'path':<22}{'seconds':>10}{'vs EvoTorch':>13}")
    print(f"{'EvoTorch 0.6 PGPE':<22}{med['evotorch']:>10.3f}{1.0:>13.2f}")
    print(f"{'mpigls unchunked (old)':<22}{med['unchunked']:>10.3f}{ratio['unchunked']:>13.2f}")
    print(f"{'mpigls chunked (new)':<22}{med['chunked']:>10.3f}{ratio['chunked']:>13.2f}")
    print(f"max |loss chunked - unchunked| = {out['max_abs_loss_diff']:.3g}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
        print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
