"""Performance model of one PGPE generation on N GPUs, extrapolated to 8 ... 1024 GPUs.

    t_gen(N) = compute(P/N) + noise(P/N) + h2d(P/N) + update(D, P/N) + allgather(P) + allreduce(D)
               + checkpoint(D) / K

Per rank (pairs_N = ceil(P/2 / N) pairs, 2 members each; ranks beyond P/2 get no pair and idle):
  compute   2 pairs_N * c_member: GPU bound evaluation. NOT measurable here (no GPU): a parameter,
            c_member = t_1gpu / P with the issue's H100 targets as defaults (CNN3 DeepPoly P=256,
            B=512: 1 s per generation; CNN5: 10 s; CNN7: 100 s, our assumption, 10x CNN5). Assumes
            the GPU stays as efficient with fewer members per call (optimistic for tiny P/N).
  noise     pairs_N * D * t_noise: host counter-based normal numbers (numpy Philox), MEASURED here.
            With prefetching (default on GPU) it overlaps the bounds; the model counts it anyway.
  h2d       pairs_N * D * 4 B / PCIe (25 GB/s, PCIe 4 x16 effective): the noise goes to the GPU.
  update    pairs_N * D * t_sum + D * t_apply: fixed-point partial sums (MEASURED here on the CPU,
            the GPU is faster) + applying the step (Adam + sigma, MEASURED).
  allgather P float64 losses, recursive doubling: log2(N) a + (N-1)/N * 8 P / b, plus the
            scalar max |z| allreduce: 2 log2(N) a.
  allreduce one int64 vector of 2 D (D with fixed sigma), the better of ring
            2 (N-1) a + 2 (N-1)/N * 16 D / b and Rabenseifner 2 log2(N) a + 2 (N-1)/N * 16 D / b.
  checkpoint rank 0 writes 4 D float32 (theta, sigma, Adam m, v) every K generations (MEASURED).
Network (assumption, a typical HPC fabric): 200 Gb/s InfiniBand HDR: b = 25 GB/s per rank, a = 2 us.

Compared with, for the same compute and noise costs:
  OpenAI-ES (Salimans et al. 2017): workers exchange scalars only (allgather of P losses + seeds),
            but every worker then forms the full update sum_j w_j eps_j from a shared noise table:
            P/2 * D * t_sum on every rank, a serial term (what mpigls did before this change).
  EvoTorch + Ray: each actor returns 4 D float32 (centre and sigma gradients as EvoTorch's
            distributed PGPE does, with its sample count) to the main process, which averages and
            sends the new centre and sigma (2 D) back: N * 16 D / b + log2(N) * 8 D / b + N a.

Efficiency E(N) = t_gen(1) / (N t_gen(N)) for a fixed P (strong scaling).

    python tools/scaling_model.py --out bench-out/scaling_model      # .json and .png
    python tools/scaling_model.py --compute cnn3=1.0,cnn5=10 --popsizes 256,4096 --ranks 1,8,64,256,1024
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mpigls import checkpoint, models  # noqa: E402
from mpigls.optim import pgpe  # noqa: E402

# (name, dataset, input shape): the paper's MNIST and CIFAR-10 shapes
MODELS = [("cnn3", "mnist", (1, 28, 28)), ("cnn3", "cifar10", (3, 32, 32)),
          ("cnn5", "mnist", (1, 28, 28)), ("cnn5", "cifar10", (3, 32, 32)),
          ("cnn7", "mnist", (1, 28, 28)), ("cnn7", "cifar10", (3, 32, 32))]
DEFAULT_COMPUTE_S = {"cnn3": 1.0, "cnn5": 10.0, "cnn7": 100.0}  # 1-GPU generation at P=256 (H100)


@dataclass(frozen=True)
class Network:
    latency_s: float = 2e-6          # InfiniBand HDR, one hop, MPI small message
    bandwidth_Bps: float = 25e9      # 200 Gb/s per rank
    pcie_Bps: float = 25e9           # host -> GPU copy of the noise


@dataclass(frozen=True)
class Terms:
    """Host costs measured on this machine (seconds)."""

    t_noise: float      # per normal number
    t_sum: float        # per pair-element of the fixed-point partial sums (with the sigma term)
    t_apply: float      # per parameter for applying the step
    t_ckpt: float       # per parameter for a checkpoint write


def _best(fn, repeat=3):
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_terms(D: int, pairs: int = 4, repeat: int = 3) -> Terms:
    """Time noise, partial sums, the step and a checkpoint for a D-parameter vector (1 thread)."""
    params = pgpe.PGPEParams(popsize=2 * pairs, sigma_init=1e-3)
    state = pgpe.init(params, torch.zeros(D))
    losses = torch.randn(2 * pairs, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w = pgpe.weights(params, losses)
    t_noise = _best(lambda: pgpe.pair_noise(0, 0, range(pairs), D), repeat) / (pairs * D)
    z = pgpe.pair_noise(0, 0, range(pairs), D)
    exps = pgpe.exponents(w, pgpe.max_abs_noise(z))
    t_sum = _best(lambda: pgpe.partial_sums(w, range(pairs), z, exps), repeat) / (pairs * D)
    summed = (pgpe.partial_sums(w, range(pairs), z, exps), exps)
    t_apply = _best(lambda: pgpe.tell(state, params, 0, losses, summed=summed), repeat) / D
    theta = np.zeros(D, np.float32)
    ck = checkpoint.Checkpoint(generation=1, epoch=0, batch_in_epoch=1, theta=theta, sigma=theta.copy(),
                               opt_state={"step/m": theta.copy(), "step/v": theta.copy()}, config={}, arch={})
    with tempfile.TemporaryDirectory() as tmp:
        t_ckpt = _best(lambda: checkpoint.save(tmp, ck, keep_last=1), 2) / D
    return Terms(t_noise, t_sum, t_apply, t_ckpt)


def allgather_s(n: int, P: int, net: Network) -> float:
    if n == 1:
        return 0.0
    lg = math.ceil(math.log2(n))
    return lg * net.latency_s + (n - 1) / n * 8 * P / net.bandwidth_Bps + 2 * lg * net.latency_s


def allreduce_s(n: int, nbytes: float, net: Network) -> float:
    if n == 1:
        return 0.0
    bw = 2 * (n - 1) / n * nbytes / net.bandwidth_Bps
    return min(2 * (n - 1) * net.latency_s, 2 * math.ceil(math.log2(n)) * net.latency_s) + bw


def t_gen(n: int, P: int, D: int, c_member: float, terms: Terms, net: Network, K: int = 100,
          fixed_sigma: bool = False) -> dict:
    """The model's terms (seconds) for N = n ranks, population P, D parameters."""
    pairs = math.ceil(P / 2 / min(n, P // 2))
    out = {"compute": 2 * pairs * c_member, "noise": pairs * D * terms.t_noise,
           "h2d": pairs * D * 4 / net.pcie_Bps, "update": pairs * D * terms.t_sum + D * terms.t_apply,
           "allgather": allgather_s(n, P, net),
           "allreduce": allreduce_s(n, (1 if fixed_sigma else 2) * 8 * D, net),
           "checkpoint": D * terms.t_ckpt / K}
    out["total"] = sum(out.values())
    return out


def t_openai_es(n: int, P: int, D: int, c_member: float, terms: Terms, net: Network, K: int = 100) -> float:
    pairs = math.ceil(P / 2 / min(n, P // 2))
    return (2 * pairs * c_member + pairs * D * terms.t_noise + pairs * D * 4 / net.pcie_Bps
            + (P // 2) * D * terms.t_sum + D * terms.t_apply + allgather_s(n, P, net) + D * terms.t_ckpt / K)


def t_evotorch(n: int, P: int, D: int, c_member: float, terms: Terms, net: Network, K: int = 100) -> float:
    pairs = math.ceil(P / 2 / min(n, P // 2))
    comm = 0.0 if n == 1 else (n * 16 * D / net.bandwidth_Bps + math.ceil(math.log2(n)) * 8 * D / net.bandwidth_Bps
                               + n * net.latency_s)
    return (2 * pairs * c_member + pairs * D * terms.t_noise + pairs * D * 4 / net.pcie_Bps
            + pairs * D * terms.t_sum + D * terms.t_apply + comm + D * terms.t_ckpt / K)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compute", default="", help="1-GPU seconds per generation at P=256, e.g. cnn3=1,cnn5=10")
    p.add_argument("--popsizes", default="256,4096")
    p.add_argument("--ranks", default="1,8,64,256,1024")
    p.add_argument("--latency-us", type=float, default=2.0)
    p.add_argument("--bandwidth-gbit", type=float, default=200.0)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--models", default=",".join(f"{m}/{d}" for m, d, _ in MODELS))
    p.add_argument("--pairs", type=int, default=4, help="pairs timed per host term (scaled linearly)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench-out/scaling_model", help="writes OUT.json and OUT.png")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    compute = dict(DEFAULT_COMPUTE_S)
    for kv in filter(None, args.compute.split(",")):
        k, v = kv.split("=")
        compute[k] = float(v)
    net = Network(latency_s=args.latency_us * 1e-6, bandwidth_Bps=args.bandwidth_gbit / 8 * 1e9)
    ranks = [int(r) for r in args.ranks.split(",")]
    popsizes = [int(x) for x in args.popsizes.split(",")]
    wanted = set(args.models.split(","))
    results = []
    for name, ds, shape in MODELS:
        if f"{name}/{ds}" not in wanted:
            continue
        D = models.num_params(models.build(name, shape, 10, [0.0] * shape[0], [1.0] * shape[0]))
        terms = measure_terms(D, pairs=args.pairs)
        for P in popsizes:
            c_member = compute[name] / 256   # per member: the 1-GPU time scales with P
            base = t_gen(1, P, D, c_member, terms, net, args.checkpoint_every)["total"]
            for n in ranks:
                tg = t_gen(n, P, D, c_member, terms, net, args.checkpoint_every)
                oe = t_openai_es(n, P, D, c_member, terms, net, args.checkpoint_every)
                ev = t_evotorch(n, P, D, c_member, terms, net, args.checkpoint_every)
                results.append({"model": name, "dataset": ds, "D": D, "P": P, "ranks": n, "terms": tg,
                                "t_gen": tg["total"], "efficiency": base / (n * tg["total"]),
                                "openai_es_t": oe, "openai_es_eff": t_openai_es(1, P, D, c_member, terms, net,
                                                                                args.checkpoint_every) / (n * oe),
                                "evotorch_t": ev, "evotorch_eff": t_evotorch(1, P, D, c_member, terms, net,
                                                                             args.checkpoint_every) / (n * ev),
                                "measured_terms": asdict(terms), "compute_1gpu_P256_s": compute[name]})
    hdr = (f"{'model':12} {'D':>9} {'P':>5} {'N':>5} {'t_gen s':>9} {'E':>6} {'compute':>8} {'noise':>8} "
           f"{'update':>8} {'gather':>8} {'reduce':>8} {'ckpt/K':>8} {'E OpenAI-ES':>11} {'E EvoTorch':>10}")
    print(f"network: {args.bandwidth_gbit:g} Gb/s, {args.latency_us:g} us; compute (1 GPU, P=256) = "
          f"{compute} s [assumed, not measured here]; host terms measured here with {args.threads} thread(s)")
    print(hdr)
    for r in results:
        t = r["terms"]
        print(f"{r['model'] + '/' + r['dataset'][:5]:12} {r['D']:9d} {r['P']:5d} {r['ranks']:5d} {r['t_gen']:9.4f} "
              f"{r['efficiency']:6.2f} {t['compute']:8.4f} {t['noise'] + t['h2d']:8.4f} {t['update']:8.4f} "
              f"{t['allgather']:8.2e} {t['allreduce']:8.2e} {t['checkpoint']:8.2e} {r['openai_es_eff']:11.2f} "
              f"{r['evotorch_eff']:10.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"network": asdict(net), "compute_1gpu_P256_s": compute, "checkpoint_every": args.checkpoint_every,
            "threads": args.threads, "note": "compute is an assumed parameter (no GPU measured); host terms "
                                             "measured on this machine"}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": results}, indent=2))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = sorted({(r["model"], r["dataset"], r["P"]) for r in results})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.get_cmap("tab20").colors
    for i, key in enumerate(keys):
        rows = [r for r in results if (r["model"], r["dataset"], r["P"]) == key]
        n = [r["ranks"] for r in rows]
        label = f"{key[0]}/{key[1]} P={key[2]}"
        line, = axes[0].loglog(n, [r["t_gen"] for r in rows], "o-", label=label, color=colors[i % len(colors)])
        axes[1].semilogx(n, [r["efficiency"] for r in rows], "o-", color=line.get_color(), label=label)
        axes[1].semilogx(n, [r["openai_es_eff"] for r in rows], ":", color=line.get_color())
        axes[1].semilogx(n, [r["evotorch_eff"] for r in rows], "--", color=line.get_color())
    n_all = sorted({r["ranks"] for r in results})
    axes[1].semilogx(n_all, [1.0] * len(n_all), "k-", lw=0.8, label="ideal")
    axes[0].set(xlabel="GPUs (ranks)", ylabel="modelled s / generation", title="t_gen(N)")
    axes[1].set(xlabel="GPUs (ranks)", ylabel="parallel efficiency", ylim=(0, 1.05),
                title="mpigls (solid), OpenAI-ES (dotted), EvoTorch/Ray (dashed)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
