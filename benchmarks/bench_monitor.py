"""Cost of live monitoring: one metrics.jsonl line per generation, and validation every K generations,
against the generation it accompanies, all measured in this one run (digits CNN3, PGPE + IBP).

    python -m benchmarks.bench_monitor [--generations 40] [--out record.json]

Prints a table: seconds per generation without monitoring, the metrics-log append per generation
(and as a fraction of a generation), and one validation pass (eval.num_val=256, IBP + DeepPoly +
10-step PGD) as a multiple of a generation.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import common
from mpigls import config
from mpigls.run import checkpoint, monitor, train


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_record_args(ap)
    ap.add_argument("--generations", type=int, default=40)
    ap.add_argument("--validations", type=int, default=3, help="validation passes timed (median)")
    args = ap.parse_args(argv)
    sets = [
        "data.name=digits",
        "model.name=cnn3",
        "bound.method=ibp",
        "bound.eps=0.05",
        "optimizer.popsize=32",
        "optimizer.block_size=8",
        "train.batch_size=64",
        "train.threads=1",
        "train.progress=false",
        "train.checkpoint_every=1000",
        "eval.num_val=256",
        "eval.pgd_steps=10",
        "eval.methods=[ibp,deeppoly]",
    ]
    cfg = config.load_config(None, sets)
    with tempfile.TemporaryDirectory() as tmp:
        train.train(cfg, Path(tmp) / "run", max_generations=args.generations, log=lambda m: None)
        ck = checkpoint.load(Path(tmp) / "run" / "latest.h5")
        gen_s = statistics.median(ck.metrics["time/generation_s"])
        last = {k: float(v[-1]) for k, v in ck.metrics.items()}
        log = monitor.MetricsLog(Path(tmp) / "m.jsonl", 0, config.to_dict(cfg), say=lambda m: None)
        n = 2000
        t0 = time.perf_counter()
        for g in range(n):
            log.append(g, last)
        append_s = (time.perf_counter() - t0) / n
        log.close()
        dataset, model, _ = train.build_problem(cfg)
        validator = monitor.Validator(cfg, dataset, model, train.parallel.SerialComm())
        theta = train.torch.from_numpy(ck.theta.copy())
        val_s = statistics.median(validator(theta)["time/val_s"] for _ in range(args.validations))
    rows = {
        "generation_s": gen_s,
        "metrics_log_append_s": append_s,
        "append_fraction_of_generation": append_s / gen_s,
        "validation_s": val_s,
        "validation_in_generations": val_s / gen_s,
        "num_metrics": len(last),
    }
    print(f"{'quantity':34s} value")
    for k, v in rows.items():
        print(f"{k:34s} {v:.3g}")
    common.write_record("bench_monitor", dict(vars(args), overrides=sets), {"rows": [rows]}, args.out, args.note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
