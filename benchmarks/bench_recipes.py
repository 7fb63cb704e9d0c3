"""Cost of the paper's recipes (configs/paper/): core-seconds per generation and projected core-hours.

For every recipe YAML it reads the settings that set the cost of a generation (dataset shape, network,
relaxation, optimizer, population, batch, work blocks), and times one work block of one generation
as ``mpigls train`` evaluates it (the registered optimizer unit's ``evaluate`` over block 0, with
the recipe's bound options, at the recipe's final eps), on synthetic inputs of the dataset's shape
(``data.load("synthetic")``: 1x28x28 for MNIST, 3x32x32 for CIFAR-10, 10 classes), at a fresh
initialisation seeded by ``train.seed``:

- a generation's cost is that block's seconds times the number of blocks; for optimizers whose work
  items are population members (PGPE) each member is evaluated on ``--examples`` examples of the
  batch and the time is scaled by ``batch / examples`` (the bounds' cost is linear in the examples);
  the update (``tell``) and the exchange are left out (milliseconds beside the bounds);
- ``generations`` = epochs x floor(training set / batch) (60000 MNIST, 50000 CIFAR-10 training
  images), ``core_h`` = generations x core-seconds per generation / 3600 (``--clock cpu``: this
  process's CPU seconds with one thread, i.e. core-seconds);
- ``chain_core_h`` adds the warm start named by ``model.init_from`` (the row's PGD recipe).

Recipes with the same cost settings are timed once. A fresh network has more unstable neurons than a
trained one, so DeepPoly/CROWN rows are an upper estimate for late generations. Not a GPU figure.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_recipes --clock cpu
    python -m benchmarks.bench_recipes --table benchmarks/records/<record>.json   # the markdown table
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import sys
from pathlib import Path

import torch

from benchmarks import common
from mpigls import data as mdata
from mpigls.config import Config, load_config
from mpigls.nn import models
from mpigls.optim import registry, unit
from mpigls.run import train

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
TRAIN_SIZE = {"mnist": 60000, "cifar10": 50000}
WARM = re.compile(r"runs/paper/([^/]+)/latest\.h5$")

# The paper's numbers (arXiv 2403.07095): natural and certified accuracy (%) from Tables 1-3 and, for
# the PGPE rows, the GPU-hours per epoch of Table 5 (None where the paper gives none).
_T1 = {  # (dataset-eps, method): (GRAD nat, GRAD cert, PGPE nat, PGPE cert)
    ("mnist-0.1", "pgd"): (98.43, 87.27, None, None),
    ("mnist-0.1", "ibp"): (96.02, 91.23, 94.52, 87.02),
    ("mnist-0.1", "sabr"): (97.54, 92.99, 97.37, 90.82),
    ("mnist-0.1", "staps"): (97.48, 93.53, 96.31, 89.39),
    ("mnist-0.1", "hbox"): (94.79, 88.18, 96.12, 90.57),
    ("mnist-0.1", "crown-ibp"): (94.33, 88.76, 96.69, 90.23),
    ("mnist-0.1", "deeppoly"): (95.95, 90.04, 97.44, 91.53),
    ("mnist-0.3", "pgd"): (96.08, 75.14, None, None),
    ("mnist-0.3", "ibp"): (91.02, 77.23, 89.16, 74.00),
    ("mnist-0.3", "hbox"): (83.75, 57.86, 86.58, 70.52),
    ("mnist-0.3", "crown-ibp"): (86.97, 70.55, 90.57, 71.95),
    ("mnist-0.3", "deeppoly"): (77.87, 47.28, 91.05, 74.28),
    ("cifar10-2_255", "pgd"): (60.35, 34.62, None, None),
    ("cifar10-2_255", "ibp"): (48.05, 37.69, 44.55, 34.09),
    ("cifar10-2_255", "crown-ibp"): (44.49, 35.75, 51.19, 37.51),
    ("cifar10-2_255", "deeppoly"): (47.70, 36.72, 54.17, 38.95),
    ("cifar10-8_255", "pgd"): (50.18, 7.90, None, None),
    ("cifar10-8_255", "ibp"): (34.63, 25.72, 30.48, 21.75),
    ("cifar10-8_255", "crown-ibp"): (31.60, 22.66, 32.36, 21.40),
    ("cifar10-8_255", "deeppoly"): (33.06, 22.97, 31.37, 22.19),
}
_T2 = {  # popsize -> (nat, cert, GPU-hours of the run)
    64: (97.22, 94.07, 88), 128: (97.22, 94.13, 160), 256: (97.30, 94.19, 304), 512: (97.27, 94.22, 596),
    1024: (97.43, 94.50, 1192),
}  # fmt: skip
_T3 = {"ibp-grad": (96.67, 93.02), "sabr-grad": (98.60, 94.87), "staps-grad": (98.60, 94.98),
       "deeppoly-grad": (88.82, 84.34), "deeppoly-pgpe": (98.83, 96.98)}  # fmt: skip
_T5 = {  # (dataset, model, method) -> PGPE GPU-hours per epoch (V100 where given, else L4)
    ("mnist", "cnn3", "ibp"): 0.09, ("mnist", "cnn3", "sabr"): 0.25, ("mnist", "cnn3", "staps"): 0.57,
    ("mnist", "cnn3", "crown-ibp"): 0.28, ("mnist", "cnn3", "hbox"): 4.13, ("mnist", "cnn3", "deeppoly"): 2.13,
    ("mnist", "cnn5", "deeppoly"): 27.6, ("cifar10", "cnn3", "ibp"): 0.23, ("cifar10", "cnn3", "crown-ibp"): 0.57,
    ("cifar10", "cnn3", "deeppoly"): 3.87,
}  # fmt: skip


def paper_numbers(recipe: str) -> tuple[str, str]:
    """("nat / cert" of the paper's row, its PGPE GPU-hours for the whole schedule) as text, "–" where none."""
    m = re.fullmatch(r"(mnist|cifar10)-([\d._]+)-(cnn3|cnn5)-(.+)-(grad|pgpe)(?:-pop(\d+))?", recipe)
    if not m:
        return "–", "–"
    data, eps, model, method, opt, pop = m.groups()
    acc: tuple | None = None
    if pop:
        acc = _T2[int(pop)]
    elif model == "cnn5":
        acc = _T3.get(f"{method}-{opt}")
    elif (f"{data}-{eps}", method) in _T1:
        row = _T1[(f"{data}-{eps}", method)]
        acc = row[:2] if opt == "grad" else row[2:]
    nat = f"{acc[0]:.2f} / {acc[1]:.2f}" if acc and acc[0] is not None else "–"
    per_epoch = _T5.get((data, model, method)) if opt == "pgpe" else None
    gpu = f"{_T2[int(pop)][2]:g}" if pop else f"{per_epoch * 150:g}" if per_epoch is not None else "–"
    return nat, gpu


def cost_key(cfg: Config) -> tuple:
    """The settings a generation's cost depends on."""
    o = cfg.optimizer
    return (
        cfg.data.name,
        cfg.model.name,
        cfg.bound.method,
        o.name,
        getattr(o.params, "popsize", None),
        cfg.train.batch_size,
        o.block_size,
        o.batch_chunks,
        tuple(sorted(cfg.bound.options.items())),
    )


def warm_start(cfg: Config) -> str | None:
    """The recipe named by ``model.init_from`` (runs/paper/ROW/latest.h5), or None."""
    m = WARM.search(cfg.model.init_from or "")
    return m.group(1) if m else None


def time_block(cfg: Config, examples: int, clock) -> dict:
    """Seconds of block 0 of one generation of ``cfg`` (see the module docstring) and its scale."""
    shape = SHAPES[cfg.data.name]
    batch = cfg.train.batch_size
    with models.private_rng(cfg.train.seed):
        model = models.build(cfg.model.name, shape, 10, [0.0] * shape[0], [1.0] * shape[0])
    ds = mdata.load("synthetic", shape=shape, num_classes=10, n=batch, seed=1)
    x, y = ds.train_x[:batch], ds.train_y[:batch]
    opt, params = registry.get(cfg.optimizer.name), cfg.optimizer.params
    per_member = opt.num_items(params, batch) == opt.num_items(params, min(batch, examples))
    used = min(batch, examples) if per_member else batch
    x, y = x[:used], y[:used]
    num_blocks = unit.num_blocks(opt.num_items(params, batch), cfg.optimizer.block_size) * cfg.optimizer.batch_chunks
    state = opt.init(params, models.flat_params(model).detach())
    opts = train.bound_options(cfg, 0)

    def work(xs: torch.Tensor, ys: torch.Tensor, resource) -> unit.Work:
        return train.generation_work(cfg, model, xs, ys, cfg.bound.eps, opts, torch.device("cpu"), resource)

    with contextlib.ExitStack() as stack:
        resource = stack.enter_context(opt.open(cfg.train.seed, torch.device("cpu"), params))
        small = min(2, used)
        if per_member:  # warm-up on two examples (kernels, code pages)
            opt.evaluate(work(x[:small], y[:small], resource), state, params, [0])
        else:
            opt.evaluate(work(x, y, resource), state, params, [num_blocks - 1])
        t0 = clock()
        opt.evaluate(work(x, y, resource), state, params, [0])
        block_s = clock() - t0
    scale = batch / used
    return {
        "examples_timed": used,
        "num_blocks": num_blocks,
        "block_s": round(block_s, 3),
        "generation_s": round(block_s * num_blocks * scale, 2),
    }


def measure(paths: list[Path], examples: int, clock) -> list[dict]:
    cfgs = {p.stem: load_config(p) for p in paths}
    timed: dict[tuple, dict] = {}
    rows = []
    for name, cfg in cfgs.items():
        key = cost_key(cfg)
        if key not in timed:
            print(f"timing {name} ...", file=sys.stderr, flush=True)
            timed[key] = time_block(cfg, examples, clock)
        t = timed[key]
        gens = math.ceil(cfg.train.epochs * (TRAIN_SIZE[cfg.data.name] // cfg.train.batch_size))
        rows.append(
            {
                "recipe": name,
                "optimizer": cfg.optimizer.name,
                "method": cfg.bound.method,
                "popsize": getattr(cfg.optimizer.params, "popsize", None),
                "batch": cfg.train.batch_size,
                "epochs": cfg.train.epochs,
                **t,
                "generations": gens,
                "core_h": round(gens * t["generation_s"] / 3600, 1),
                "warm_start": warm_start(cfg),
            }
        )
    by_name = {r["recipe"]: r for r in rows}
    for r in rows:
        w = by_name.get(r["warm_start"] or "")
        r["chain_core_h"] = round(r["core_h"] + (w["core_h"] if w else 0.0), 1)
    return rows


def _num(x: float) -> str:
    """Three significant digits below 100, whole numbers with thousands separators above."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def table(record: dict) -> str:
    """The markdown table of a record: one line per recipe, the paper's numbers beside the measured cost."""
    lines = [
        "| recipe | paper: nat. / cert. % | paper: PGPE GPU-h | CPU core-s / generation | GPU | generations "
        "| projected core-h | with warm start |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in record["results"]["rows"]:
        nat, gpu = paper_numbers(r["recipe"])
        lines.append(
            f"| {r['recipe']} | {nat} | {gpu} | {_num(r['generation_s'])} | not measured | {r['generations']:,} "
            f"| {_num(r['core_h'])} | {_num(r['chain_core_h'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--recipes", default="configs/paper/*.yaml", help="glob of recipe YAMLs (relative: to the repository)"
    )
    ap.add_argument("--examples", type=int, default=16, help="examples per member timed (PGPE), scaled to the batch")
    ap.add_argument("--clock", choices=sorted(common.CLOCKS), default="cpu")
    ap.add_argument("--table", metavar="RECORD", help="print the markdown table of a record and exit")
    common.add_record_args(ap)
    args = ap.parse_args(argv)
    if args.table:
        print(table(common.load_record(args.table)), end="")
        return 0
    torch.set_num_threads(1)
    pattern = REPO / args.recipes
    paths = sorted(pattern.parent.glob(pattern.name))
    rows = measure(paths, args.examples, common.CLOCKS[args.clock])
    common.write_record("bench_recipes", args, {"rows": rows}, out=args.out, note=args.note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
