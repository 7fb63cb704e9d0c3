"""Evaluation during training and the live metrics log: the trajectory is untouched, the val/*
numbers are the certify numbers of the θ at that generation, identical for any rank count, and
metrics.jsonl holds every generation exactly once, also across a kill and a resume."""

import json

import numpy as np
import pytest
import torch

from mpigls import config, parallel
from mpigls.evaluation import certify
from mpigls.run import checkpoint, monitor, train

from conftest import run_mpigls, tiny_overrides

EVAL = {"eval.every": 3, "eval.num_val": 40, "eval.batch_size": 16, "eval.methods": "[ibp,deeppoly]"}


def _cfg(**extra):
    return config.load_config(None, tiny_overrides(**extra))


def _quiet(msg):
    return None


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same tiny run without and with validation every 3 generations (8 generations)."""
    root = tmp_path_factory.mktemp("pair")
    plain = train.train(_cfg(), root / "plain", log=_quiet)
    lines = []
    evald = train.train(_cfg(**EVAL), root / "eval", log=lines.append)
    return root, plain, evald, lines


def test_validation_leaves_the_trajectory_bitwise_unchanged(pair):
    root, plain, evald, lines = pair
    assert torch.equal(plain.theta, evald.theta)
    a, b = checkpoint.load(root / "plain" / "latest.h5"), checkpoint.load(root / "eval" / "latest.h5")
    assert np.array_equal(a.sigma, b.sigma) and a.theta.tobytes() == b.theta.tobytes()
    assert np.array_equal(a.metrics["loss/mean"], b.metrics["loss/mean"])
    assert not any(k.startswith("val/") for k in a.metrics)
    assert sum(m.startswith("val gen") for m in lines) == 3  # generations 3, 6 and the last, 8


def test_val_metrics_are_the_certify_numbers_at_those_generations(pair):
    root, _, evald, _ = pair
    ck = checkpoint.load(root / "eval" / "latest.h5")
    gens = ck.metrics["generation"]
    keys = ["val/natural", "val/pgd", "val/certified/ibp", "val/certified/deeppoly"]
    for key in keys:
        recorded = ~np.isnan(np.pad(ck.metrics[key], (0, len(gens) - len(ck.metrics[key])), constant_values=np.nan))
        assert list(gens[recorded]) == [3.0, 6.0, 8.0], key
    cfg = _cfg(**EVAL)
    dataset, model, _ = train.build_problem(cfg)
    ref = certify.evaluate(
        model,
        evald.theta,
        dataset.test_x[:40],
        dataset.test_y[:40],
        cfg.bound.eps,
        ["ibp", "deeppoly"],
        batch_size=16,
        pgd_steps=cfg.eval.pgd_steps,
        seed=cfg.train.seed,
    )
    for key in keys:
        assert ck.metrics[key][-1] == ref[key[4:]], key
    assert 0 <= ck.metrics["val/certified/ibp"][-1] <= ck.metrics["val/natural"][-1] <= 1


@pytest.mark.parametrize("world_size", [2, 3])
def test_validation_is_identical_for_any_rank_count(world_size):
    cfg = _cfg(**{**EVAL, "eval.num_val": 37})  # 3 blocks of 16, the last one short
    dataset, model, _ = train.build_problem(cfg)
    theta = train.models.flat_params(model) * 1.5

    def run(comm):
        res = monitor.Validator(cfg, dataset, model, comm)(theta)
        return {k: v for k, v in res.items() if not k.startswith("time/")}

    serial = run(parallel.SerialComm())
    assert set(serial) == {"val/natural", "val/pgd", "val/certified/ibp", "val/certified/deeppoly"}
    for got in parallel.run_threaded(run, world_size):
        assert got == serial


def test_metrics_log_has_every_generation_once_and_matches_the_checkpoint(pair):
    root = pair[0]
    records, headers = monitor.read_metrics_log(root / "eval" / monitor.METRICS_FILE)
    assert [r["generation"] for r in records] == list(range(1, 9))
    assert len(headers) == 1 and headers[0]["config"]["eval"]["every"] == 3
    ck = checkpoint.load(root / "eval" / "latest.h5")
    for key in ("loss/mean", "loss/min", "sched/eps", "pgpe/sigma_mean", "time/generation_s"):
        assert [r[key] for r in records] == list(ck.metrics[key]), key
    assert [r["generation"] for r in records if "val/natural" in r] == [3, 6, 8]
    assert records[-1]["val/certified/deeppoly"] == ck.metrics["val/certified/deeppoly"][-1]


def test_kill_then_resume_leaves_no_duplicate_generations(tmp_path, pair):
    """A kill after logging generations past the last checkpoint (and mid-line) is resumed from the
    checkpoint: the re-run generations replace the stale lines, the history equals a straight run."""
    out = tmp_path / "r"
    cfg = _cfg(**EVAL)
    train.train(cfg, out, max_generations=4, log=_quiet)
    log = out / monitor.METRICS_FILE
    stale = {"generation": 5, "loss/mean": 123.0}
    with open(log, "a") as f:
        f.write(json.dumps(stale) + "\n" + json.dumps({**stale, "generation": 6}) + "\n" + '{"generation": 7, "lo')
    records, _ = monitor.read_metrics_log(log)  # a reader during the "crash": truncated line skipped
    assert [r["generation"] for r in records] == [1, 2, 3, 4, 5, 6]
    train.train(cfg, out, log=_quiet)
    records, headers = monitor.read_metrics_log(log)
    assert [r["generation"] for r in records] == list(range(1, 9)) and len(headers) == 2
    assert [headers[0]["start_generation"], headers[1]["start_generation"]] == [0, 4]
    lines = [json.loads(s) for s in log.read_text().splitlines()]
    assert sum("generation" in obj for obj in lines) == 8 and 123.0 not in [o.get("loss/mean") for o in lines]
    straight, _ = monitor.read_metrics_log(pair[0] / "eval" / monitor.METRICS_FILE)
    for key in ("loss/mean", "val/natural", "val/certified/ibp"):
        assert [r.get(key) for r in records] == [r.get(key) for r in straight], key


def test_truncate_and_read_tolerate_damage(tmp_path):
    log = tmp_path / "m.jsonl"
    log.write_text(
        '{"schema": "mpigls-metrics", "config": {}}\n{"generation": 1, "a": null}\n'
        'garbage\n{"generation": 2, "a": 2.0}\n{"generation": 2, "a": 3.0}\n{"generation": 3, "a"'
    )
    with pytest.warns(RuntimeWarning, match="unreadable line"):
        records, headers = monitor.read_metrics_log(log)
    assert [(r["generation"], r["a"]) for r in records][1:] == [(2, 3.0)] and np.isnan(records[0]["a"])
    assert monitor.truncate_log(log, 1) == 4  # garbage, both generation-2 lines, the cut line
    assert log.read_text() == '{"schema": "mpigls-metrics", "config": {}}\n{"generation": 1, "a": null}\n'
    assert monitor.truncate_log(log, 1) == 0 and monitor.truncate_log(tmp_path / "none.jsonl", 0) == 0


def test_log_write_failure_warns_and_training_goes_on(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / monitor.METRICS_FILE).mkdir()  # opening it for append fails
    lines = []
    res = train.train(_cfg(**{"train.epochs": 0.25}), tmp_path / "r", log=lines.append)
    assert res.generation == 2 and any("metrics log" in m and "disabled" in m for m in lines), lines


@pytest.mark.slow
def test_val_metrics_same_on_two_mpi_ranks(tmp_path, pair):
    sets = [a for kv in tiny_overrides(**EVAL) for a in ("--set", kv)]
    run_mpigls(["train", "--out", str(tmp_path / "n2"), "--no-eval", *sets], ranks=2)
    one = checkpoint.load(pair[0] / "eval" / "latest.h5")
    two = checkpoint.load(tmp_path / "n2" / "latest.h5")
    assert one.theta.tobytes() == two.theta.tobytes()
    for key in ("val/natural", "val/pgd", "val/certified/ibp", "val/certified/deeppoly"):
        np.testing.assert_array_equal(one.metrics[key], two.metrics[key])
