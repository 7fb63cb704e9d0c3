"""``mpigls train``'s own promises: the final evaluation is written while the run still holds its
directory (a concurrent ``--restart`` is refused until ``eval.json`` is complete, and the file is the
evaluation of the run's own checkpoint); a finished run started again trains nothing, writes nothing
to ``metrics.jsonl`` and evaluates again only when ``eval.json`` is missing or stale; the dry run says
what it would do in a sentence."""

from __future__ import annotations

import json

import pytest

from mpigls import cli
from mpigls.run import checkpoint, finaleval, monitor

pytestmark = pytest.mark.timeout(300)

TINY = {
    "data.name": "digits",
    "data.num_train": 64,
    "data.num_test": 16,
    "model.name": "mlp-tiny",
    "optimizer.popsize": 4,
    "optimizer.block_size": 2,
    "train.batch_size": 32,
    "train.epochs": 1,
    "train.threads": 1,
    "train.progress": False,
    "eval.methods": "[ibp]",
    "eval.pgd_steps": 1,
}


def _sets(**extra) -> list[str]:
    return [a for k, v in {**TINY, **extra}.items() for a in ("--set", f"{k}={v}")]


def _files(d) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}


def test_a_restart_is_refused_while_the_final_evaluation_runs(tmp_path, capsys, monkeypatch):
    d = tmp_path / "run"
    real, seen = finaleval.evaluate, {}

    def evaluate_with_a_second_command(*args, **kwargs):
        seen["code"] = cli.main(["train", "--out", str(d), "--restart", "--no-eval", *_sets()])
        seen["err"] = " ".join(capsys.readouterr().err.split())
        return real(*args, **kwargs)

    monkeypatch.setattr(finaleval, "evaluate", evaluate_with_a_second_command)
    assert cli.main(["train", "--out", str(d), *_sets()]) == 0
    assert seen["code"] == 2 and "is in use by another mpigls train" in seen["err"], seen
    assert not [p for p in d.iterdir() if p.name.startswith("aside-")]  # nothing was moved aside
    stored = json.loads((d / finaleval.EVAL_FILE).read_text())
    latest = checkpoint.load(d / checkpoint.LATEST)
    assert stored["generation"] == latest.generation == 2
    assert stored["theta_sha256"] == checkpoint.theta_sha256(latest.theta)  # the run's own network


def test_a_finished_run_started_again_writes_nothing(tmp_path, capsys):
    d = tmp_path / "run"
    assert cli.main(["train", "--out", str(d), *_sets()]) == 0
    capsys.readouterr()
    before = _files(d)
    assert cli.main(["train", "--out", str(d), *_sets()]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "nothing to do" in out and "no generation was run" in out, out
    assert "it was not repeated and nothing was written" in out and "final test accuracy" not in out, out
    assert _files(d) == before  # metrics.jsonl gained no line, eval.json is the first run's


def test_a_finished_run_started_again_evaluates_only_what_is_missing_or_stale(tmp_path, capsys):
    d = tmp_path / "run"
    assert cli.main(["train", "--out", str(d), "--no-eval", *_sets()]) == 0
    log = (d / monitor.METRICS_FILE).read_bytes()
    assert not (d / finaleval.EVAL_FILE).exists()
    capsys.readouterr()
    assert cli.main(["train", "--out", str(d), *_sets()]) == 0  # missing: evaluated now
    out = capsys.readouterr().out
    assert "only the final evaluation is checked" in out and f"wrote {d / finaleval.EVAL_FILE}" in out, out
    first = json.loads((d / finaleval.EVAL_FILE).read_text())
    assert first["settings"]["eval"]["pgd_steps"] == 1
    assert cli.main(["train", "--out", str(d), *_sets(**{"eval.pgd_steps": 2})]) == 0  # other settings: stale
    again = json.loads((d / finaleval.EVAL_FILE).read_text())
    assert again["settings"]["eval"]["pgd_steps"] == 2 and again["theta_sha256"] == first["theta_sha256"]
    assert (d / monitor.METRICS_FILE).read_bytes() == log  # no run appended anything to the log


def test_a_run_below_its_max_generations_is_not_evaluated(tmp_path, capsys):
    d = tmp_path / "run"
    assert cli.main(["train", "--out", str(d), "--max-generations", "1", *_sets()]) == 0
    assert cli.main(["train", "--out", str(d), "--max-generations", "1", *_sets()]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "nothing to do" in out and "--max-generations 1 asks for no more" in out and "nothing was written" in out
    assert not (d / finaleval.EVAL_FILE).exists()


def test_the_dry_run_says_what_it_would_do(tmp_path, capsys):
    d = tmp_path / "run"
    assert cli.main(["train", "--out", str(d), "--dry-run", *_sets()]) == 0
    assert f"would start a new run in {d}" in capsys.readouterr().out
    assert not d.exists()
    assert cli.main(["train", "--out", str(d), "--no-eval", "--max-generations", "1", *_sets()]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--out", str(d), "--dry-run", *_sets()]) == 0
    assert f"would resume {d} from generation 1" in capsys.readouterr().out
