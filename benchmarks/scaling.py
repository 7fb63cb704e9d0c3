"""Strong and weak scaling of `mpigls train` through any launcher; JSON plus a PNG.

Strong scaling: a fixed population on 1..N ranks; every rank count must end with the same theta
(checked with ``mpigls inspect --json``'s theta_sha256: world-size invariance).
Weak scaling: popsize = --weak-popsize-per-rank * ranks (a different problem per rank count, so
theta is not compared). Seconds per generation of a run are the median of the checkpoint's
``time/generation_s`` after --skip warm-up generations (the minimum is reported too: on a shared,
loaded machine it is closer to the uncontended time). Every rank count runs --repeats times,
interleaved (1, 2, ..., 1, 2, ...); a point's s/gen is the median over its repeats, and its
efficiency the median over repeats k of the PAIRED ratio of repeat k (strong t1 / (n t_n), weak
t1 / t_n), with the range of those ratios: the runs of a pair ran next to each other, so a drift
of a shared machine's speed cancels. Every repeat must give the same theta (strong). Next to
every measured point the model of benchmarks/scaling_model.py predicts t_n from the 1-rank run
(compute per member = t1 minus the measured host terms, shared-memory network: --latency-us /
--bandwidth-gbit).

    python -m benchmarks.scaling --ranks 1,2 --mode both \
        --set model.name=cnn3 --set bound.method=ibp --set optimizer.popsize=64 --set train.batch_size=16
    # on a cluster (one GPU per rank):
    python -m benchmarks.scaling --launcher "srun -n {n} --gpus-per-task=1" --ranks 1,2,4,8 --set train.device=cuda ...
    # merge the records written by jobs/scaling.sbatch array tasks:
    python -m benchmarks.scaling --merge sweep/*.json --out sweep/all.json

--ceiling (strong and weak, one node): in every repeat also run the per-rank population as N
independent 1-rank processes at once and alone; their ratio is the machine's ceiling for N ranks
(no communication at all), and eff/ceil the efficiency relative to it.

Writes the record (``--out``, default under benchmarks/records/) and a PNG next to it (time per
generation and parallel efficiency vs ranks, ideal lines).
Exit status 1 if strong scaling gave different theta for different rank counts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks import common, scaling_model as sm
from mpigls.run import checkpoint

REPO = common.REPO


def run_point(n: int, popsize: int | None, args, workdir: Path, tag: str) -> dict:
    out = workdir / f"{tag}-n{n}"
    launcher = shlex.split(args.launcher.format(n=n))
    cmd = [
        *launcher,
        sys.executable,
        "-m",
        "mpi4py",
        "-m",
        "mpigls",
        "train",
        args.config,
        "--out",
        str(out),
        "--max-generations",
        str(args.generations),
        "--no-eval",
        "--set",
        "train.progress=false",
        "--set",
        f"train.threads={args.threads}",
    ]
    for kv in args.set:
        cmd += ["--set", kv]
    if popsize is not None:
        cmd += ["--set", f"optimizer.popsize={popsize}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    info = json.loads(
        subprocess.run(
            [sys.executable, "-m", "mpigls", "inspect", "--json", str(out / "latest.h5")],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            check=True,
        ).stdout
    )
    ck = checkpoint.load(out / "latest.h5")
    per_gen = np.asarray(ck.metrics["time/generation_s"])[args.skip :]
    return {
        "ranks": n,
        "popsize": int(ck.config["optimizer"]["popsize"]),
        "D": int(ck.theta.size),
        "median_s_per_gen": float(np.median(per_gen)),
        "min_s_per_gen": float(per_gen.min()),
        "max_s_per_gen": float(per_gen.max()),
        "wall_s": wall,
        "generations": int(info["generation"]),
        "theta_sha256": info["theta_sha256"],
        "block_size": int(ck.config["optimizer"]["block_size"]),
        "batch_size": int(ck.config["train"]["batch_size"]),
        "batch_chunks": int(ck.config["optimizer"].get("batch_chunks", 1)),
        "fixed_sigma": bool(ck.config["optimizer"].get("fixed_sigma", False)),
    }


def predict(rows: list[dict], args) -> None:
    """Fill 'model_s_per_gen' from the 1-rank row with the scaling model (host terms measured here)."""
    base = next((r for r in rows if r["ranks"] == 1), None)
    if base is None:
        return
    D, P1 = base["D"], base["popsize"]

    def work(r: dict):  # the run's work items (pair blocks x example chunks)
        return sm.Work(r.get("batch_size", 1), r["block_size"], r.get("batch_chunks", 1))

    terms = sm.measure_terms(D, pairs=min(4, P1 // 2), fixed_sigma=base["fixed_sigma"])
    net = sm.Network(latency_s=args.latency_us * 1e-6, bandwidth_Bps=args.bandwidth_gbit / 8 * 1e9, pcie_Bps=math.inf)
    host1 = sm.t_gen(1, P1, D, 0.0, terms, net, K=10**9, fixed_sigma=base["fixed_sigma"], work=work(base))["total"]
    c_member = max(0.0, base["median_s_per_gen"] - host1) / P1
    for r in rows:
        r["model_s_per_gen"] = sm.t_gen(
            r["ranks"], r["popsize"], D, c_member, terms, net, K=10**9, fixed_sigma=r["fixed_sigma"], work=work(r)
        )["total"]


def machine_ceiling(n: int, popsize: int, args, workdir: Path, tag: str) -> float:
    """What n ranks on this machine could reach with NO communication: t(one 1-rank run of the
    per-rank population, alone) / t(n such runs at once, independent processes). Below 1 when the
    ranks slow each other down through the machine (shared caches, memory bandwidth, a VM's
    neighbours), whatever the code does."""
    if popsize < 2 or popsize % 2:
        raise SystemExit(f"--ceiling needs an even per-rank population, got P/{n} = {popsize}")
    alone = run_point(1, popsize, args, workdir, f"{tag}-alone{n}")["median_s_per_gen"]
    together: list[float] = [0.0] * n

    def one(i: int) -> None:
        together[i] = run_point(1, popsize, args, workdir, f"{tag}-together{n}-{i}")["median_s_per_gen"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if not all(together):
        raise SystemExit("--ceiling: a concurrent run failed (see above)")
    return alone / max(together)


def point(n: int, mode: str, args, workdir: Path):
    """A callable running ``n`` ranks once (strong: the config's popsize; weak: --weak-popsize-per-rank
    per rank) and, with --ceiling and n > 1, the machine's ceiling next to it: {"row", "ceiling"}."""
    calls = iter(range(1 << 30))

    def run() -> dict:
        k = next(calls)
        popsize = None if mode == "strong" else args.weak_popsize_per_rank * n
        row = run_point(n, popsize, args, workdir, f"{mode}-r{k}")
        out = {"row": row}
        if args.ceiling and n > 1:
            per_rank = row["popsize"] // n if mode == "strong" else args.weak_popsize_per_rank
            out["ceiling"] = machine_ceiling(n, per_rank, args, workdir, f"{mode}-r{k}")
        return out

    return run


def combine_repeats(runs: list[dict]) -> dict:
    """One row from the repeated runs of one rank count: the median over repeats of each run's median
    s/gen, the extremes over all runs, every run's median and theta kept (``repeat_*``)."""
    row = dict(runs[0])
    meds = [r["median_s_per_gen"] for r in runs]
    row.update(
        median_s_per_gen=float(np.median(meds)),
        min_s_per_gen=min(r["min_s_per_gen"] for r in runs),
        max_s_per_gen=max(r["max_s_per_gen"] for r in runs),
        wall_s=sum(r["wall_s"] for r in runs),
        repeats=len(runs),
        repeat_s_per_gen=meds,
        repeat_theta_sha256=[r["theta_sha256"] for r in runs],
    )
    return row


def summarise(rows: list[dict], mode: str, paired: bool = True) -> None:
    """Speedup and efficiency of every row against the 1-rank row (``paired``: the repeats of each
    rank count ran interleaved with the base's, in this invocation)."""
    base = next((r for r in rows if r["ranks"] == 1), rows[0])

    def eff(t1: float, tn: float, n: int) -> float:
        return t1 * base["ranks"] / (tn * n) if mode == "strong" else t1 / tn

    for r in rows:
        r["speedup"] = base["median_s_per_gen"] / r["median_s_per_gen"]
        # "min": the fastest generation, closer to the uncontended time on a shared (loaded) machine
        for key, stat in (("efficiency", "median_s_per_gen"), ("efficiency_min", "min_s_per_gen")):
            r[key] = eff(base[stat], r[stat], r["ranks"])
        # paired: repeat k of this rank count against repeat k of the base, run next to each other
        # (the rank counts are interleaved), so a drift of the machine's speed cancels
        t1s, tns = base.get("repeat_s_per_gen"), r.get("repeat_s_per_gen")
        if paired and t1s and tns and len(t1s) == len(tns):
            effs = common.spread([eff(a, b, r["ranks"]) for a, b in zip(t1s, tns)])
            r["efficiency_paired"] = effs.median
            r["efficiency_paired_range"] = [effs.low, effs.high]
            r["efficiency"] = r["efficiency_paired"]
        if "machine_ceiling" in r:  # how close the run came to what the machine allows
            r["efficiency_vs_ceiling"] = r["efficiency"] / r["machine_ceiling"]
        if "model_s_per_gen" in r:
            m = base.get("model_s_per_gen", base["median_s_per_gen"])
            r["model_efficiency"] = (
                m * base["ranks"] / (r["model_s_per_gen"] * r["ranks"])
                if mode == "strong"
                else m / r["model_s_per_gen"]
            )


def print_table(mode: str, rows: list[dict]) -> None:
    print(f"{mode} scaling")
    print(
        f"{'ranks':>5} {'P':>6} {'s/gen':>9} {'min':>8} {'max':>8} {'speedup':>8} {'eff':>6} {'eff range':>11} "
        f"{'eff(min)':>8} {'ceiling':>7} {'c range':>11} {'eff/ceil':>8} {'model s/gen':>11} {'model eff':>9}  theta"
    )
    for r in rows:
        lo, hi = r.get("efficiency_paired_range", [math.nan, math.nan])
        clo, chi = r.get("machine_ceiling_range", [math.nan, math.nan])
        print(
            f"{r['ranks']:5d} {r['popsize']:6d} {r['median_s_per_gen']:9.4f} {r['min_s_per_gen']:8.4f} "
            f"{r['max_s_per_gen']:8.4f} {r['speedup']:8.2f} {r['efficiency']:6.2f} {lo:5.2f}-{hi:<5.2f} "
            f"{r['efficiency_min']:8.2f} {r.get('machine_ceiling', math.nan):7.2f} {clo:5.2f}-{chi:<5.2f} "
            f"{r.get('efficiency_vs_ceiling', math.nan):8.2f} "
            f"{r.get('model_s_per_gen', math.nan):11.4f} {r.get('model_efficiency', math.nan):9.2f}  "
            f"{r['theta_sha256'][:12]}"
        )


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode, marker in (("strong", "o"), ("weak", "s")):
        rows = result.get(mode)
        if not rows:
            continue
        n = [r["ranks"] for r in rows]
        t = [r["median_s_per_gen"] for r in rows]
        (line,) = axes[0].loglog(n, t, marker + "-", label=f"{mode} (measured)")
        ideal = [t[0] * n[0] / k for k in n] if mode == "strong" else [t[0]] * len(n)
        axes[0].loglog(n, ideal, ":", color=line.get_color(), label=f"{mode} ideal")
        if all("model_s_per_gen" in r for r in rows):
            axes[0].loglog(
                n, [r["model_s_per_gen"] for r in rows], "x--", color=line.get_color(), label=f"{mode} model"
            )
            axes[1].semilogx(
                n, [r["model_efficiency"] for r in rows], "x--", color=line.get_color(), label=f"{mode} model"
            )
        axes[1].semilogx(
            n, [r["efficiency"] for r in rows], marker + "-", color=line.get_color(), label=f"{mode} (measured)"
        )
    all_n = sorted({r["ranks"] for m in ("strong", "weak") for r in result.get(m) or []})
    axes[1].semilogx(all_n, [1.0] * len(all_n), "k-", lw=0.8, label="ideal")
    axes[0].set(xlabel="ranks", ylabel="s / generation (median)", title=result.get("label", "mpigls scaling"))
    axes[1].set(xlabel="ranks", ylabel="parallel efficiency", ylim=(0, 1.1))
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(result: dict, out: Path | None, params: dict, note: str = "") -> Path:
    """The record of ``result`` at ``out`` (.json; default under benchmarks/records/) and its PNG next to it."""
    path = common.write_record("scaling", params, result, out and out.with_suffix(".json"), note)
    plot(result, path.with_suffix(".png"))
    print(f"wrote {path.with_suffix('.png')}")
    return path


def merge(paths: list[str], out: Path | None, args) -> int:
    """One record from the records (or bare results) of separate runs, e.g. the tasks of a cluster job."""
    result = {"label": args.label or "merged", "strong": [], "weak": []}
    for p in paths:
        part = json.loads(Path(p).read_text())
        part = part.get("results", part)  # a record, or the results alone
        for mode in ("strong", "weak"):
            result[mode] += part.get(mode) or []
    ok = True
    for mode in ("strong", "weak"):
        rows = sorted(result[mode], key=lambda r: r["ranks"])
        result[mode] = rows
        if rows:
            summarise(rows, mode, paired=False)  # separate jobs: their repeats did not run side by side
            print_table(mode, rows)
    if result["strong"]:
        ok = len({t for r in result["strong"] for t in r.get("repeat_theta_sha256", [r["theta_sha256"]])}) == 1
        result["identical_theta"] = ok
        print("strong scaling: theta identical across rank counts:", ok)
    write(result, out, {"merge": paths, "label": result["label"]}, getattr(args, "note", ""))
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_record_args(p)
    p.add_argument("--config", default="configs/quickstart.yaml", help="relative to the repository root")
    p.add_argument("--mode", choices=["strong", "weak", "both"], default="both")
    p.add_argument("--ranks", default="1,2", help="comma-separated rank counts")
    p.add_argument("--weak-popsize-per-rank", type=int, default=32)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--skip", type=int, default=2, help="warm-up generations left out of the statistics")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs per rank count, interleaved (1,2,..,1,2,..); efficiency = median of the paired ratios",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument(
        "--ceiling",
        action="store_true",
        help="also measure the machine's ceiling per rank count (N independent 1-rank runs of the per-rank "
        "population at once vs one alone, in every repeat; one node only)",
    )
    p.add_argument("--launcher", default="mpiexec -n {n}", help='e.g. "srun -n {n} --gpus-per-task=1"')
    p.add_argument("--set", action="append", default=[], help="config override passed to mpigls train")
    p.add_argument("--latency-us", type=float, default=1.0, help="network latency for the model (local: shm)")
    p.add_argument("--bandwidth-gbit", type=float, default=40.0, help="network bandwidth for the model")
    p.add_argument("--no-model", action="store_true", help="skip the model prediction")
    p.add_argument("--label", default="")
    p.add_argument("--workdir", default=None, help="keep run directories here (default: a temp dir)")
    p.add_argument("--merge", nargs="+", default=None, help="merge JSON files of earlier runs instead of running")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else None
    if args.merge:
        return merge(args.merge, out, args)
    ranks = [int(n) for n in args.ranks.split(",")]
    result = {
        "label": args.label or " ".join(args.set),
        "config": args.config,
        "overrides": args.set,
        "generations": args.generations,
        "threads": args.threads,
        "launcher": args.launcher,
    }
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        for mode in ["strong", "weak"] if args.mode == "both" else [args.mode]:
            points = common.interleave({n: point(n, mode, args, work) for n in ranks}, args.repeats)
            runs = {n: [p["row"] for p in points[n]] for n in ranks}
            ceilings = {n: [p["ceiling"] for p in points[n]] for n in ranks if n > 1 and args.ceiling}
            rows = [combine_repeats(runs[n]) for n in ranks]
            for r in rows:
                if ceilings.get(r["ranks"]):
                    c = ceilings[r["ranks"]]
                    r["machine_ceiling"] = float(np.median(c))
                    r["machine_ceiling_range"] = [min(c), max(c)]
            if not args.no_model:
                predict(rows, args)
            summarise(rows, mode)
            print_table(mode, rows)
            result[mode] = rows
            if mode == "strong":
                ok = len({t for r in rows for t in r["repeat_theta_sha256"]}) == 1
                result["identical_theta"] = ok
                print("strong scaling: theta identical across rank counts:", ok)
    write(result, out, vars(args), args.note)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
