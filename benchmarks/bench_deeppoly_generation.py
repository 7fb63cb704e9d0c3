"""Seconds per PGPE + DeepPoly generation on one core: matrix mode, the row engines, auto_LiRPA.

One generation as ``train`` evaluates it (``parallel.pgpe_unit.evaluate``: the population of P members
around the centre, in work blocks of ``--block-size`` pairs, each block's certified loss, the
robust cross-entropy of the DeepPoly margin bounds, on the minibatch of B examples) is timed with
three engines on the same network, inputs and noise, in interleaved repeats (the engine order
rotates from repeat to repeat):

- ``matrix``: the default, ``conv_mode="auto"`` (matrix mode for this small network);
- ``rows``: the row engines, ``conv_mode="dense"`` (the row engine "auto" picks for CNN3 digits
  when matrix mode is not used: dense rows touch fewer elements than patches there);
- ``auto_lirpa``: auto_LiRPA 0.3 CROWN (patches), one network at a time over the P members
  (``benchmarks/auto_lirpa_compat.py``; needs ``pip install --no-deps auto_LiRPA==0.3 appdirs``),
  the same losses from its bounds.

The network is CNN3 on the bundled digits, warm-started by ``--pgd-steps`` steps of PGD training
(seeded; the start the paper's recipe prescribes), so the unstable neurons are those of a
realistic PGPE run. Wall and CPU seconds of every repeat, their medians and ranges, the paired
ratios (rows / matrix, auto_lirpa / matrix per repeat, on both clocks) and the largest differences of
the losses and bounds to the other engines go to the benchmark record (``benchmarks.common``).

  OMP_NUM_THREADS=1 python -m benchmarks.bench_deeppoly_generation --repeats 5
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks import common
from mpigls import data as mdata
from mpigls.bounds import margin_lower_bounds
from mpigls.nn import models
from mpigls.objectives import losses
from mpigls.optim import pgpe
from mpigls.parallel import pgpe_unit

ENGINES = ("matrix", "rows", "auto_lirpa")
ENGINE_OPTIONS = {"matrix": {}, "rows": {"conv_mode": "dense"}}


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
    """loss_fn for ``pgpe_unit.evaluate``: auto_LiRPA's bounds member by member, the same loss."""
    from benchmarks import auto_lirpa_compat

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
    common.add_record_args(ap)
    args = ap.parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        raise SystemExit(f"unknown engine(s) {unknown}; choose from {list(ENGINES)}")
    torch.set_num_threads(args.threads)

    ds = mdata.load("digits")
    torch.manual_seed(args.seed)
    model = models.build("cnn3", tuple(ds.train_x.shape[1:]), ds.num_classes, list(ds.mean), list(ds.std))
    pgd_start(model, ds, args.pgd_steps, args.eps, args.batch, args.seed)
    x, y = ds.train_x[: args.batch], ds.train_y[: args.batch]
    theta = models.flat_params(model).detach().clone()
    params = pgpe.PGPEParams(popsize=args.popsize, sigma_init=args.sigma, lr=1e-3)
    state = pgpe.init(params, theta)
    split = pgpe_unit.split_of(params, args.block_size, args.batch)
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
        source = pgpe_unit.NoiseSource(args.seed, prefetch=False, scheme=params.noise)
        try:
            out, _ = pgpe_unit.evaluate(state, params, items, split, source, loss_fns[engine], device)
        finally:
            source.close()
            models.load_flat_(model, theta)
        return split.combine(out)

    losses_of = {e: generation(e) for e in engines}  # warm-up, and the losses compared below

    def timed(e: str):
        def run() -> tuple[float, float]:
            t0, c0 = time.perf_counter(), time.process_time()
            generation(e)
            return time.perf_counter() - t0, time.process_time() - c0

        return run

    rounds = common.interleave({e: timed(e) for e in engines}, args.repeats, alternate=True)
    wall = {e: [w for w, _ in v] for e, v in rounds.items()}
    cpu = {e: [c for _, c in v] for e, v in rounds.items()}

    results: dict = {
        "parameters": theta.numel(),
        "engine_options": {e: ENGINE_OPTIONS.get(e, "auto_LiRPA 0.3 CROWN, patches") for e in engines},
        "wall_s": {e: common.spread(v).as_dict() for e, v in wall.items()},
        "cpu_s": {e: common.spread(v).as_dict() for e, v in cpu.items()},
    }
    if "matrix" in engines:
        for name, clock in (("wall", wall), ("cpu", cpu)):
            results[f"paired_ratio_{name}"] = {
                f"{e}/matrix": common.ratio_spread(clock[e], clock["matrix"]).as_dict()
                for e in engines
                if e != "matrix"
            }
        results["max_abs_loss_diff"] = {
            f"{e}-matrix": float((losses_of[e] - losses_of["matrix"]).abs().max()) for e in engines if e != "matrix"
        }
        if "rows" in engines:  # the bounds themselves, for the block of the first pairs
            points = pgpe.population(state, pgpe.pair_noise(args.seed, 0, list(range(args.block_size)), theta.numel()))
            with torch.no_grad():
                a = margin_lower_bounds(model, x, y, args.eps, "deeppoly", points)
                b = margin_lower_bounds(model, x, y, args.eps, "deeppoly", points, **ENGINE_OPTIONS["rows"])
            results["max_abs_bound_diff_rows_matrix"] = float((a - b).abs().max())
            results["max_abs_bound"] = float(b.abs().max())
    for e in engines:
        w, c = results["wall_s"][e], results["cpu_s"][e]
        print(
            f"{e:11} cpu median {c['median']:.3f} s [{c['low']:.3f}, {c['high']:.3f}]  wall median {w['median']:.3f} s"
        )
    for clock in ("cpu", "wall"):
        for k, v in results.get(f"paired_ratio_{clock}", {}).items():
            print(f"{k} ({clock}): median {v['median']:.1f}x [{v['low']:.1f}, {v['high']:.1f}]")
    common.write_record("bench_deeppoly_generation", args, results, args.out, args.note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
