"""Seconds per PGPE + DeepPoly generation on one core: matrix mode, the row engines, auto_LiRPA.

One generation as ``train`` evaluates it (``pgpe_dist.evaluate``: the population of P members
around the centre, in work blocks of ``--block-size`` pairs, each block's certified loss, the
robust cross-entropy of the DeepPoly margin bounds, on the minibatch of B examples) is timed with
three engines on the same network, inputs and noise, in interleaved repeats (the engine order
rotates from repeat to repeat):

- ``matrix``: the default, ``conv_mode="auto"`` (matrix mode for this small network);
- ``rows``: the row engines, ``conv_mode="dense"`` (the row engine "auto" picks for CNN3 digits
  when matrix mode is not used: dense rows touch fewer elements than patches there);
- ``auto_lirpa``: auto_LiRPA 0.3 CROWN (patches), one network at a time over the P members
  (``tools/auto_lirpa_compat.py``; needs ``pip install --no-deps auto_LiRPA==0.3 appdirs``),
  the same losses from its bounds.

The network is CNN3 on the bundled digits, warm-started by ``--pgd-steps`` steps of PGD training
(seeded; the start the paper's recipe prescribes), so the unstable neurons are those of a
realistic PGPE run. Wall and CPU seconds of every repeat, their medians and ranges, the paired
ratios (rows / matrix, auto_lirpa / matrix per repeat, on both clocks) and the largest differences of the losses
and bounds to the other engines go to a JSON record with the commit, machine, torch version,
date and command.

  OMP_NUM_THREADS=1 python benchmarks/bench_deeppoly_generation.py --repeats 5 --out deeppoly_gen.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from mpigls import data as mdata, losses, models, pgpe_dist
from mpigls.bounds import margin_lower_bounds
from mpigls.optim import pgpe

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("matrix", "rows", "auto_lirpa")
ENGINE_OPTIONS = {"matrix": {}, "rows": {"conv_mode": "dense"}}


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values}


def pgd_start(model, ds, steps: int, eps: float, batch: int, seed: int) -> None:
    """PGD training in place (Adam, 5-step PGD at eps), seeded: the warm start of the recipe."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, ds.train_x.shape[0], (batch,), generator=gen)
        loss = losses.certified_loss(model, ds.train_x[idx], ds.train_y[idx], eps, "pgd", pgd_steps=5)
        opt.zero_grad()
        loss.backward()
        opt.step()


def lirpa_loss_fn(model, x, y, eps):
    """loss_fn for ``pgpe_dist.evaluate``: auto_LiRPA's bounds member by member, the same loss."""
    sys.path.insert(0, str(ROOT / "tools"))
    import auto_lirpa_compat

    bound = auto_lirpa_compat.bounder(model, x, "deeppoly", "patches")

    def loss(points: torch.Tensor, examples: slice) -> torch.Tensor:
        out = []
        for w in points:
            models.load_flat_(model, w)
            out.append(losses.robust_ce(bound(x[examples], y[examples], eps)))
        return torch.stack(out)

    return loss


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_deeppoly_generation.json")
    ap.add_argument("--popsize", type=int, default=64)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--eps", type=float, default=0.2)
    ap.add_argument("--block-size", type=int, default=8, help="pairs per work block (optimizer.block_size)")
    ap.add_argument("--sigma", type=float, default=1e-3)
    ap.add_argument("--pgd-steps", type=int, default=200, help="PGD warm-start training steps (0: fresh network)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"comma list of {list(ENGINES)}")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        raise SystemExit(f"unknown engine(s) {unknown}; choose from {list(ENGINES)}")
    torch.set_num_threads(args.threads)
    commit = _commit()  # the code being measured (before anything may change the checkout)

    ds = mdata.load("digits")
    torch.manual_seed(args.seed)
    model = models.build("cnn3", tuple(ds.train_x.shape[1:]), ds.num_classes, list(ds.mean), list(ds.std))
    pgd_start(model, ds, args.pgd_steps, args.eps, args.batch, args.seed)
    x, y = ds.train_x[: args.batch], ds.train_y[: args.batch]
    theta = models.flat_params(model).detach().clone()
    params = pgpe.PGPEParams(popsize=args.popsize, sigma_init=args.sigma, lr=1e-3)
    state = pgpe.init(params, theta)
    split = pgpe_dist.split_of(params, args.block_size, args.batch)
    items = list(range(split.num_items))
    device = torch.device("cpu")

    def ours(opts):
        def loss(points: torch.Tensor, examples: slice) -> torch.Tensor:
            return losses.certified_loss(model, x[examples], y[examples], args.eps, "deeppoly", weights=points, **opts)

        return loss

    loss_fns = {e: ours(ENGINE_OPTIONS[e]) for e in engines if e in ENGINE_OPTIONS}
    if "auto_lirpa" in engines:
        loss_fns["auto_lirpa"] = lirpa_loss_fn(model, x, y, args.eps)

    def generation(engine: str) -> torch.Tensor:
        source = pgpe_dist.NoiseSource(args.seed, prefetch=False, scheme=params.noise)
        try:
            out, _ = pgpe_dist.evaluate(state, params, items, split, source, loss_fns[engine], device)
        finally:
            source.close()
            models.load_flat_(model, theta)
        return split.combine(out)

    results = {e: generation(e) for e in engines}  # warm-up, and the losses compared below
    wall: dict[str, list[float]] = {e: [] for e in engines}
    cpu: dict[str, list[float]] = {e: [] for e in engines}
    for r in range(args.repeats):
        for j in range(len(engines)):
            e = engines[(r + j) % len(engines)]
            t0, c0 = time.perf_counter(), time.process_time()
            generation(e)
            wall[e].append(time.perf_counter() - t0)
            cpu[e].append(time.process_time() - c0)
        print(f"repeat {r}: " + "  ".join(f"{e} {wall[e][-1]:.3f} s" for e in engines), flush=True)

    record: dict = {
        "benchmark": "deeppoly_generation",
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpu": _cpu_model(), "arch": platform.machine(), "cores": os.cpu_count()},
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "setting": {
            "data": "digits",
            "model": "cnn3",
            "parameters": theta.numel(),
            "popsize": args.popsize,
            "batch": args.batch,
            "eps": args.eps,
            "block_size": args.block_size,
            "sigma": args.sigma,
            "pgd_steps": args.pgd_steps,
            "repeats": args.repeats,
            "engine_options": {e: ENGINE_OPTIONS.get(e, "auto_LiRPA 0.3 CROWN, patches") for e in engines},
        },
        "wall_s": {e: _summary(v) for e, v in wall.items()},
        "cpu_s": {e: _summary(v) for e, v in cpu.items()},
    }
    if "matrix" in engines:
        for name, clock in (("wall", wall), ("cpu", cpu)):
            record[f"paired_ratio_{name}"] = {
                f"{e}/matrix": _summary([a / b for a, b in zip(clock[e], clock["matrix"])])
                for e in engines
                if e != "matrix"
            }
        record["max_abs_loss_diff"] = {
            f"{e}-matrix": float((results[e] - results["matrix"]).abs().max()) for e in engines if e != "matrix"
        }
        if "rows" in engines:  # the bounds themselves, for the block of the first pairs
            points = pgpe.population(state, pgpe.pair_noise(args.seed, 0, list(range(args.block_size)), theta.numel()))
            with torch.no_grad():
                a = margin_lower_bounds(model, x, y, args.eps, "deeppoly", points)
                b = margin_lower_bounds(model, x, y, args.eps, "deeppoly", points, **ENGINE_OPTIONS["rows"])
            record["max_abs_bound_diff_rows_matrix"] = float((a - b).abs().max())
            record["max_abs_bound"] = float(b.abs().max())
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    for e in engines:
        w = record["wall_s"][e]
        c = record["cpu_s"][e]["median"]
        print(f"{e:11} wall median {w['median']:.3f} s [{w['min']:.3f}, {w['max']:.3f}]  cpu median {c:.3f} s")
    for clock in ("wall", "cpu"):
        for k, v in record.get(f"paired_ratio_{clock}", {}).items():
            print(f"{k} ({clock}): median {v['median']:.1f}x [{v['min']:.1f}, {v['max']:.1f}]")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
