"""Training with and without ``mpigls.run.hostmem.keep_freed_memory`` (env MPIGLS_KEEP_FREED_MEMORY=1/0),
at 1 and 2 ranks, interleaved A B A B ...: median s/gen (checkpoint ``time/generation_s``), the
kernel's share of the CPU time (/proc/stat: system time is where page faults are served) and theta
(identical with and without: the allocator never changes numbers).

    python -m benchmarks.bench_hostmem --ranks 1,2 --repeats 3 \
        --set model.name=cnn5 --set bound.method=ibp --set optimizer.popsize=256 --set train.batch_size=64
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks import common, scaling


def cpu_times() -> list[int]:
    """Aggregate /proc/stat jiffies: user nice system idle iowait irq softirq steal."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:9]]


def run_with(keep: str, n: int, args, workdir: Path):
    """One training run of ``n`` ranks with MPIGLS_KEEP_FREED_MEMORY=``keep`` per call: its row
    (``scaling.run_point``) with the kernel's share of the busy CPU time during the run."""
    calls = iter(range(1 << 30))

    def run() -> dict:
        os.environ["MPIGLS_KEEP_FREED_MEMORY"] = keep
        before = cpu_times()
        row = scaling.run_point(n, None, args, workdir, f"keep{keep}-r{next(calls)}")
        d = np.subtract(cpu_times(), before)
        row["system_share"] = float(d[2] / max(1, d[0] + d[1] + d[2] + d[4] + d[5] + d[6] + d[7]))
        return row

    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_record_args(p)
    p.add_argument("--config", default="configs/quickstart.yaml", help="relative to the repository root")
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--generations", type=int, default=30)
    p.add_argument("--skip", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--launcher", default="mpiexec -n {n}")
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args(argv)
    ranks = [int(n) for n in args.ranks.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        runs = common.interleave(
            {(n, keep): run_with(keep, n, args, Path(tmp)) for n in ranks for keep in ("1", "0")}, args.repeats
        )
    os.environ.pop("MPIGLS_KEEP_FREED_MEMORY", None)
    print(f"{' '.join(args.set)}; {args.repeats} interleaved repeats, median s/gen; system = kernel share of busy CPU")
    print(
        f"{'ranks':>5} {'keep s/gen':>10} {'default s/gen':>13} {'speedup':>8} {'range':>11} {'sys keep':>8} {'sys def':>8}"
    )
    table = []
    for n in ranks:
        on, off = runs[(n, "1")], runs[(n, "0")]
        pairs = common.paired_ratios([r["median_s_per_gen"] for r in off], [r["median_s_per_gen"] for r in on])
        same = len({r["theta_sha256"] for r in on + off}) == 1
        rec = {
            "ranks": n,
            "keep_s_per_gen": float(np.median([r["median_s_per_gen"] for r in on])),
            "default_s_per_gen": float(np.median([r["median_s_per_gen"] for r in off])),
            "speedup_paired": float(np.median(pairs)),
            "speedup_range": [min(pairs), max(pairs)],
            "system_share_keep": float(np.median([r["system_share"] for r in on])),
            "system_share_default": float(np.median([r["system_share"] for r in off])),
            "identical_theta": same,
        }
        table.append(rec)
        print(
            f"{n:5d} {rec['keep_s_per_gen']:10.4f} {rec['default_s_per_gen']:13.4f} {rec['speedup_paired']:8.2f} "
            f"{min(pairs):5.2f}-{max(pairs):<5.2f} {rec['system_share_keep']:8.3f} {rec['system_share_default']:8.3f}"
            + ("" if same else "  THETA DIFFERS")
        )
    if len(ranks) > 1 and 1 in ranks:
        for key in ("keep", "default"):
            t1 = next(r[f"{key}_s_per_gen"] for r in table if r["ranks"] == 1)
            for r in table:
                r[f"strong_efficiency_{key}"] = t1 / (r["ranks"] * r[f"{key}_s_per_gen"])
        print(
            "strong efficiency (medians): "
            + ", ".join(
                f"{r['ranks']} ranks keep {r['strong_efficiency_keep']:.2f} / default {r['strong_efficiency_default']:.2f}"
                for r in table
            )
        )
    common.write_record(
        "bench_hostmem",
        args,
        {"rows": table, "runs": {f"{n}-{k}": v for (n, k), v in runs.items()}},
        args.out,
        args.note,
    )
    return 0 if all(r["identical_theta"] for r in table) else 1


if __name__ == "__main__":
    sys.exit(main())
