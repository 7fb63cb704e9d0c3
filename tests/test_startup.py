"""Commands that compute nothing start without torch: ``mpigls --version``, ``--help``, ``config``,
``recipes`` and ``inspect``, and the config with every optimizer's Params, import neither torch nor an
optimizer's unit. Checked in one fresh interpreter by what it imported, never by a timing."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from mpigls.run import checkpoint

COMMANDS = [
    ["--version"],
    ["--help"],
    ["config"],
    ["config", "--markdown"],
    ["recipes"],
    ["recipes", "show", "quickstart"],
]


def test_commands_that_compute_nothing_do_not_import_torch(tmp_path):
    ckpt = checkpoint.Checkpoint(
        generation=1,
        epoch=0,
        batch_in_epoch=1,
        theta=np.zeros(3, np.float32),
        sigma=None,
        opt_state={},
        config={"optimizer": {"name": "grad"}},
        arch={"name": "mlp"},
        metrics={},
        noise_scheme="philox4x64-seedseq-v1",
        world_size=1,
    )
    path = checkpoint.save(tmp_path / "run", ckpt)
    probe = f"""
import json, sys
from mpigls import cli, config
from mpigls.optim import registry
codes = []
for argv in {COMMANDS + [["inspect", str(path)]]!r}:
    try:
        codes.append(cli.main(argv))
    except SystemExit as exc:
        codes.append(exc.code)
rows = config.describe()
params = [registry.params_of(name)() for name in registry.names()]
print(json.dumps({{"codes": codes, "modules": sorted(sys.modules)}}))
"""
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["codes"] == [0] * (len(COMMANDS) + 1), seen["codes"]
    assert "mpigls.commands.setup" in seen["modules"] and "mpigls.run.checkpoint" in seen["modules"]  # they ran
    heavy = [
        m for m in seen["modules"] if m == "torch" or m.startswith(("mpigls.parallel.pgpe_unit", "mpigls.optim.pgpe"))
    ]
    assert not heavy, heavy
