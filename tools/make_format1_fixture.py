"""Write the format-1 checkpoint fixtures under tests/golden/ (run ONCE, with the code of commit 027d07e).

Checkpoint format 2 (theta stored once) replaced format 1 after commit 027d07e. The migration
from format 1 is tested against files written by the OLD code, so this script was run at that
commit and its outputs committed:

    git checkout 027d07e && PYTHONPATH=$PWD OMP_NUM_THREADS=1 python tools/make_format1_fixture.py

For each optimizer (PGPE, RGS, GRAD; digits / mlp-tiny, a few seconds on one CPU thread) it trains
3 generations and copies ``latest.h5`` to ``tests/golden/format1_<opt>.h5``, then resumes the run
to generation 5 and records that theta (float32) in ``tests/golden/format1_resumed_theta.npz``: what
the old code gives when it resumes the fixture. It is a float trajectory of one machine, so the test
compares it to a tolerance (another CPU or torch / MKL build rounds differently); the sha256 of the
fixtures' own theta (bytes that are only read back) is exact everywhere.
The overrides are stored in the JSON too, so a test resumes with exactly the same config.
Running it with a newer mpigls writes format-2 files, which is not what the fixtures are for.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"

COMMON = {
    "data.name": "digits",
    "data.num_train": 128,
    "data.num_test": 32,
    "model.name": "mlp-tiny",
    "bound.method": "ibp",
    "bound.eps": 0.02,
    "optimizer.lr": 0.01,
    "train.epochs": 2,
    "train.batch_size": 32,
    "train.checkpoint_every": 1,
    "train.keep_last": 1,
    "train.threads": 1,
    "train.progress": False,
    "eval.methods": "[ibp]",
    "eval.pgd_steps": 0,
}
PER_OPTIMIZER = {
    "pgpe": {"optimizer.name": "pgpe", "optimizer.popsize": 8, "optimizer.block_size": 2, "optimizer.sigma_init": 0.01},
    "rgs": {
        "optimizer.name": "rgs",
        "optimizer.num_samples": 4,
        "optimizer.block_size": 2,
        "optimizer.sigma_init": 0.01,
    },
    "grad": {"optimizer.name": "grad", "optimizer.block_size": 16},
}
FIRST, THEN = 3, 5


def overrides(opt: str) -> list[str]:
    return [f"{k}={v}" for k, v in {**COMMON, **PER_OPTIMIZER[opt]}.items()]


def main() -> int:
    sys.path.insert(0, str(REPO))
    from mpigls import checkpoint, config, train

    expected = {
        "written_by_commit": "027d07e",
        "first_generations": FIRST,
        "resumed_to": THEN,
        "runs": {},
        "resumed_theta": "format1_resumed_theta.npz",
    }
    resumed = {}
    for opt in PER_OPTIMIZER:
        cfg = config.load_config(None, overrides(opt))
        with tempfile.TemporaryDirectory() as tmp:
            train.train(cfg, tmp, max_generations=FIRST, log=lambda m: None)
            shutil.copyfile(Path(tmp) / "latest.h5", GOLDEN / f"format1_{opt}.h5")
            res = train.train(cfg, tmp, max_generations=THEN, log=lambda m: None)
        ckpt = checkpoint.load(GOLDEN / f"format1_{opt}.h5")
        expected["runs"][opt] = {
            "overrides": overrides(opt),
            "theta_sha256_at_first": checkpoint.theta_sha256(ckpt.theta),
        }
        resumed[opt] = res.theta.numpy().astype("<f4")
        print(opt, res.generation, checkpoint.theta_sha256(res.theta.numpy())[:16])
    np.savez(GOLDEN / expected["resumed_theta"], **resumed)
    (GOLDEN / "format1_expected.json").write_text(json.dumps(expected, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
