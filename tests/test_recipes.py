"""Every recipe in configs/paper/ and configs/digits-paradox/ loads, validates and trains for one
generation with the smoke overrides of jobs/paper.sh; the paper.sh chain (PGD warm start -> PGPE ->
certify) runs end to end in smoke mode and is resumable."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mpigls import cli, config as config_mod

REPO = Path(__file__).resolve().parents[1]
PAPER = sorted((REPO / "configs" / "paper").glob("*.yaml"))
PARADOX = sorted((REPO / "configs" / "digits-paradox").glob("*.yaml"))


def smoke_sets(optimizer: str = "grad") -> list[str]:
    """The smoke overrides for a recipe of ``optimizer``, read from jobs/paper.sh (one source of truth)."""
    text = (REPO / "jobs" / "paper.sh").read_text()
    body = re.search(r"for kv in (.*?); do", text, re.S).group(1)
    pgpe_only = re.search(r'PGPE_SMOKE="([^"]*)"', text).group(1).split() if optimizer == "pgpe" else []
    return body.replace("\\\n", " ").split() + pgpe_only


def test_paper_rows_cover_tables_1_to_3():
    names = {p.stem for p in PAPER}
    for ds, eps, methods in (
        ("mnist", "0.1", "ibp sabr staps hbox crown-ibp deeppoly"),
        ("mnist", "0.3", "ibp hbox crown-ibp deeppoly"),
        ("cifar10", "2_255", "ibp crown-ibp deeppoly"),
        ("cifar10", "8_255", "ibp crown-ibp deeppoly"),
    ):
        assert f"{ds}-{eps}-cnn3-pgd-grad" in names
        for m in methods.split():
            assert {f"{ds}-{eps}-cnn3-{m}-grad", f"{ds}-{eps}-cnn3-{m}-pgpe"} <= names
    assert {f"mnist-0.1-cnn3-deeppoly-pgpe-pop{p}" for p in (64, 128, 256, 512, 1024)} <= names
    assert {f"mnist-0.1-cnn5-{m}-grad" for m in ("ibp", "sabr", "staps", "deeppoly")} <= names
    for p in PAPER:
        cfg = config_mod.load_config(str(p), [])
        if cfg.optimizer.name == "pgpe":  # App. B.2, warm start from the row's PGD recipe
            assert cfg.train.epochs == 150 and cfg.optimizer.sigma_init == 1e-3
            assert list(cfg.optimizer.lr_milestones) == [110, 130] and cfg.optimizer.lr_factor == 0.4
            warm = Path(cfg.model.init_from).parent.name
            assert warm.endswith("-pgd-grad") and (REPO / "configs" / "paper" / f"{warm}.yaml").exists()
        elif cfg.bound.method != "pgd":  # App. B.1
            assert cfg.optimizer.lr == 5e-5 and cfg.optimizer.lr_factor == 0.2


TINY = [
    "model.init_from=null",
    "train.checkpoint_every=1",
    "train.batch_size=8",
    "optimizer.block_size=2",
    "data.num_train=32",
]


def _signature(path: Path) -> tuple:
    cfg = config_mod.load_config(str(path), [])
    return cfg.bound.method, cfg.optimizer.name


@pytest.mark.slow
def test_every_recipe_validates_and_each_kind_trains_one_generation(tmp_path):
    """Every file passes --dry-run with the smoke overrides; one CNN3 file per (bound, optimizer)
    trains one generation (the others differ in numbers, eps schedule or the architecture, which
    --dry-run builds)."""
    seen = set()
    for path in PAPER + PARADOX:
        name = _signature(path)[1]
        tiny = TINY + (["optimizer.popsize=4"] if name == "pgpe" else [])
        sets = sum((["--set", s] for s in smoke_sets(name) + tiny), [])
        out = tmp_path / path.stem
        assert cli.main(["train", str(path), "--out", str(out), "--dry-run", *sets]) == 0, path.name
        if _signature(path) in seen or config_mod.load_config(str(path), []).model.name != "cnn3":
            continue
        seen.add(_signature(path))
        assert cli.main(["train", str(path), "--out", str(out), "--max-generations", "1", "--no-eval", *sets]) == 0, (
            path.name
        )
        assert (out / "latest.h5").exists()
    assert len(seen) >= 14, seen


@pytest.mark.slow
def test_paper_sh_smoke_chain_is_resumable(tmp_path):
    env = dict(
        os.environ,
        SMOKE="1",
        RUNS=str(tmp_path / "runs"),
        PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    cmd = ["bash", str(REPO / "jobs" / "paper.sh"), "mnist-0.1-cnn3-ibp-pgpe"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "warm start mnist-0.1-cnn3-pgd-grad" in first.stdout
    runs = tmp_path / "runs"
    assert (runs / "mnist-0.1-cnn3-pgd-grad" / "eval.json").exists()
    res = json.loads((runs / "mnist-0.1-cnn3-ibp-pgpe" / "certify.json").read_text())
    assert res["verify"] and len(res["samples"]["verified"]) == 8
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and second.stdout.count("exists") == 3, second.stdout
    bad = subprocess.run(
        ["bash", str(REPO / "jobs" / "paper.sh"), "no-such-row"], env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "no recipe" in bad.stderr
