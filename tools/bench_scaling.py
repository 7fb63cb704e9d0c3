"""Strong-scaling benchmark: seconds per generation of `mpigls train` for several rank counts.

Runs ``mpiexec -n N python -m mpi4py -m mpigls train CONFIG --max-generations G --no-eval`` for each
N, reads the per-generation wall times from the checkpoint's metrics (the first `--skip`
generations are warm-up), checks that every N ends with the same theta (world-size invariance),
prints a table and writes JSON.

    python tools/bench_scaling.py --ranks 1,2 --generations 12 --out bench-out/scaling.json \
        --set optimizer.popsize=64 --set bound.method=deeppoly

On a cluster, pass --launcher "srun -n {n}" to use the site launcher.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mpigls import checkpoint  # noqa: E402


def run(n: int, args, workdir: Path) -> dict:
    out = workdir / f"n{n}"
    launcher = shlex.split(args.launcher.format(n=n))
    cmd = [*launcher, sys.executable, "-m", "mpi4py", "-m", "mpigls", "train", args.config, "--out", str(out),
           "--max-generations", str(args.generations), "--no-eval", "--set", "train.progress=false",
           "--set", f"train.threads={args.threads}"]
    for kv in args.set:
        cmd += ["--set", kv]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    ck = checkpoint.load(out / "latest.h5")
    per_gen = np.asarray(ck.metrics["time/generation_s"])[args.skip:]
    return {"ranks": n, "median_s_per_gen": float(np.median(per_gen)), "min_s_per_gen": float(per_gen.min()),
            "max_s_per_gen": float(per_gen.max()), "wall_s": wall,
            "theta_sha256": checkpoint.theta_sha256(ck.theta)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    p.add_argument("--ranks", default="1,2", help="comma-separated rank counts")
    p.add_argument("--generations", type=int, default=12)
    p.add_argument("--skip", type=int, default=2, help="warm-up generations left out of the statistics")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--launcher", default="mpiexec -n {n}")
    p.add_argument("--set", action="append", default=[], help="config override passed to mpigls train")
    p.add_argument("--out", default="bench-out/scaling.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(int(n), args, Path(tmp)) for n in args.ranks.split(",")]
    base = rows[0]["median_s_per_gen"] * rows[0]["ranks"]
    print(f"{'ranks':>5} {'s/gen (median)':>15} {'min':>8} {'max':>8} {'speedup':>8} {'efficiency':>10}  theta")
    for r in rows:
        r["speedup"] = rows[0]["median_s_per_gen"] / r["median_s_per_gen"]
        r["efficiency"] = base / (r["median_s_per_gen"] * r["ranks"])
        print(f"{r['ranks']:5d} {r['median_s_per_gen']:15.4f} {r['min_s_per_gen']:8.4f} {r['max_s_per_gen']:8.4f} "
              f"{r['speedup']:8.2f} {r['efficiency']:10.2f}  {r['theta_sha256'][:12]}")
    identical = len({r["theta_sha256"] for r in rows}) == 1
    print("theta identical across rank counts:", identical)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "identical_theta": identical, "config": args.config,
                                          "overrides": args.set, "generations": args.generations}, indent=2))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
