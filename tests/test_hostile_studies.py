"""Studies against a hostile user and a hostile disk: every file a study reads or writes (the study
YAML, the run records, the tables, the run directories) edited, truncated, foreign or holding values
that parse but mean nothing, and two runners at once. Each must be refused with one paragraph
(exit 2), reported as what it is, or handled so that no number is reported for settings other than
the study's."""

import fcntl
import json
import threading
import time
from pathlib import Path

import pytest

from mpigls import cli
from mpigls.studies import cli as study_cli, records, runner as study

TINY = """
study: tiny
config:
  data: {name: synthetic, val_size: 64}
  model: {name: mlp-tiny}
  bound: {method: ibp, eps: 0.05}
  optimizer: {name: grad, lr: 0.01}
  train: {epochs: 2, batch_size: 64, checkpoint_every: 1, log_every: 100}
  eval: {methods: [ibp], pgd_steps: 2}
seeds: [0]
rows:
  - name: warm
    set: {bound.method: natural}
  - name: ibp
    after: warm
"""
QUIET = lambda msg: None


def _study(tmp_path: Path, text: str = TINY) -> tuple[study.Study, study.Paths]:
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return study.load_study(path), study.Paths(tmp_path / "runs", tmp_path / "results")


def _argv(command: str, s: study.Study, paths: study.Paths, *more: str) -> list[str]:
    return ["study", command, str(s.path), "--runs", str(paths.runs), "--results", str(paths.results), *more]


def _runs(s: study.Study) -> dict[str, study.StudyRun]:
    return {r.id: r for r in study.expand(s)}


def _write_record(paths: study.Paths, run: study.StudyRun, theta: str, certified: float = 0.25) -> Path:
    """The sealed record ``run_one`` would write for ``run`` (without training it)."""
    dep = study.read_record(paths.record_of(run.after)) if run.after else None
    numbers = {"natural": 0.75, "adversarial": 0.5, "certified": certified, "certified/ibp": certified}
    rec = {"schema": study.RECORD_SCHEMA, "version": 2, "study": "tiny", "run": run.id, "row": run.row,
           "group": run.group, "configuration": run.configuration, "seed": run.seed, "after": run.after,
           "warm_start_theta_sha256": dep["theta_sha256"] if dep else None, "commit": "abc", "generations": 6,
           "theta_sha256": theta, "cost_s": {"train": 1.0}, "evaluation": run.evaluation,
           "validation": dict(numbers), "test": dict(numbers, num_examples=256),
           "config": study.config_mod.to_dict(study.resolved_config(run, paths))}  # fmt: skip
    paths.results.mkdir(parents=True, exist_ok=True)
    paths.record(run).write_text(json.dumps(records.seal(rec), indent=2))
    return paths.record(run)


def _finished(tmp_path: Path, text: str = TINY) -> tuple[study.Study, study.Paths]:
    s, paths = _study(tmp_path, text)
    for run in study.expand(s):
        _write_record(paths, run, f"theta-{run.id}")
    return s, paths


# ------------------------------------------------------------------------------------ run identity


@pytest.mark.parametrize(
    ("edit", "changed"),
    [
        (("lr: 0.01}", "lr: 0.003}"), "optimizer.lr: 0.01 -> 0.003"),
        (("epochs: 2,", "epochs: 3,"), "train.epochs: 2.0 -> 3.0"),
        (("set: {bound.method: natural}", "set: {bound.method: natural, data.val_seed: 4}"), "data.val_seed: 0 -> 4"),
        (("seeds: [0]", "seeds: [0]\nevaluation: {pgd_restarts: 3}"), "evaluation.pgd_restarts: 1 -> 3"),
    ],
    ids=["lr", "epochs", "val_seed", "evaluation"],
)
def test_an_edited_study_file_makes_its_runs_new_work_and_status_says_why(tmp_path, capsys, edit, changed):
    s, paths = _finished(tmp_path)
    assert cli.main(_argv("status", s, paths)) == 0
    assert "2 finished" in capsys.readouterr().out
    s.path.write_text(TINY.replace(*edit))
    assert cli.main(_argv("status", s, paths)) == 0
    out = capsys.readouterr().out
    assert "warm/seed0  stale (" in out and changed in out, out
    assert "ibp/seed0   stale (" in out  # its warm start changes: so does it
    # the report shows no number of the old settings, and says so
    assert cli.main(_argv("report", s, paths)) == 2
    assert "no finished runs" in capsys.readouterr().err


def test_a_retrained_warm_start_makes_the_runs_from_it_stale(tmp_path):
    s, paths = _finished(tmp_path)
    runs = _runs(s)
    _write_record(paths, runs["warm/seed0"], "another-network")  # trained again: another θ
    assert study.run_state(runs["warm/seed0"], paths) == "finished"
    assert study.run_state(runs["ibp/seed0"], paths).startswith("stale (its warm start warm/seed0 has been trained")


def test_a_record_of_another_run_does_not_stand_for_this_one(tmp_path):
    s, paths = _finished(tmp_path)
    runs = _runs(s)
    paths.record(runs["ibp/seed0"]).write_bytes(paths.record(runs["warm/seed0"]).read_bytes())
    state = study.states(list(runs.values()), paths)["ibp/seed0"]
    assert state.startswith("stale (the record is of run 'warm/seed0'")


@pytest.mark.slow
def test_a_stale_run_is_trained_again_and_its_old_record_kept_aside(tmp_path):
    s, paths = _finished(tmp_path)
    run = _runs(s)["warm/seed0"]
    old = paths.record(run).read_bytes()
    s, _ = _study(tmp_path, TINY.replace("epochs: 2,", "epochs: 1,"))
    run = _runs(s)["warm/seed0"]
    assert study.run_one(s, run, paths, log=QUIET) == "finished"
    rec = study.read_record(paths.record(run))
    assert rec["config"]["train"]["epochs"] == 1 and rec["generations"] == 3  # 192 examples / batch 64
    (kept,) = (paths.results / "superseded").iterdir()
    assert kept.read_bytes() == old and kept.name.startswith("warm__seed0.")


@pytest.mark.slow
def test_an_interrupted_run_started_with_other_settings_starts_again(tmp_path, capsys):
    s, paths = _study(tmp_path)
    run = _runs(s)["warm/seed0"]
    assert study.run_one(s, run, paths, max_generations=2, log=QUIET) == study.STOPPED
    assert study.run_state(run, paths) == "interrupted"
    s, _ = _study(tmp_path, TINY.replace("lr: 0.01}", "lr: 0.02}"))
    run = _runs(s)["warm/seed0"]
    assert study.run_state(run, paths).startswith("interrupted, settings changed (optimizer.lr: 0.01 -> 0.02)")
    assert study.run_one(s, run, paths, log=QUIET) == "finished"
    starts = [json.loads(x)["start_generation"] for x in (paths.run_dir(run) / "metrics.jsonl").read_text().split("\n")
              if "start_generation" in x]  # fmt: skip
    assert starts == [0]  # trained from the start in a fresh metrics log, not resumed under the new lr
    assert study.read_record(paths.record(run))["config"]["optimizer"]["lr"] == 0.02


# ------------------------------------------------------------------------------------------ records


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


def _edit(path: Path) -> None:
    rec = json.loads(path.read_text())
    rec["test"]["certified"] = 0.99
    path.write_text(json.dumps(rec, indent=2))


def _unseal(path: Path) -> None:
    rec = json.loads(path.read_text())
    del rec["sha256"]
    path.write_text(json.dumps(rec))


def _downgrade(path: Path) -> None:
    rec = json.loads(path.read_text())
    rec["version"] = 7
    path.write_text(json.dumps(rec))


def _foreign(path: Path) -> None:
    path.write_text(json.dumps({"rows": []}))


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _nan(path: Path) -> None:
    path.write_text(path.read_text().replace('"certified": 0.25', '"certified": NaN', 1))


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (_truncate, "not readable JSON"),
        (_edit, "checksum does not match"),
        (_unseal, "without its checksum"),
        (_downgrade, "format 7"),
        (_foreign, "not a study record"),
        (_directory, "not a regular file"),
        (_nan, "checksum does not match"),
    ],
    ids=["truncated", "edited", "checksum-removed", "unknown-format", "foreign", "directory", "nan"],
)
def test_a_damaged_or_edited_record_is_refused_loudly_and_never_overwritten(tmp_path, capsys, damage, why):
    s, paths = _finished(tmp_path)
    path = paths.record(_runs(s)["warm/seed0"])
    damage(path)
    before = sorted((p.name, p.read_bytes() if p.is_file() else b"") for p in paths.results.iterdir())
    assert cli.main(_argv("report", s, paths)) == 2  # never averaged without it
    err = capsys.readouterr().err
    assert str(path) in err and why in err and "Traceback" not in err
    assert cli.main(_argv("run", s, paths, "--inline")) == 2  # nor trained over
    assert why in capsys.readouterr().err
    assert cli.main(_argv("verify", s, paths)) == 2
    assert cli.main(_argv("status", s, paths)) == 0
    assert "warm/seed0  damaged record (" in capsys.readouterr().out
    after = sorted((p.name, p.read_bytes() if p.is_file() else b"") for p in paths.results.iterdir())
    assert after == before and not paths.runs.exists()  # nothing written, nothing trained


@pytest.mark.slow
def test_records_are_told_from_the_other_files_of_a_results_folder(tmp_path, capsys):
    s, paths = _finished(tmp_path)
    (paths.results / "table.json").write_text("{trunc")  # a table or a diagnosis is not a record
    (paths.results / "diagnose-ibp-seed0.json").write_text("[]")
    assert cli.main(_argv("report", s, paths)) == 0
    assert "(2 runs)" in capsys.readouterr().out


def test_format_1_records_are_read_with_a_note(tmp_path, capsys):
    s, paths = _finished(tmp_path)
    for run in _runs(s).values():
        rec = json.loads(paths.record(run).read_text())
        for key in ("sha256", "evaluation", "warm_start_theta_sha256"):
            del rec[key]
        paths.record(run).write_text(json.dumps(dict(rec, version=1)))
    assert cli.main(_argv("report", s, paths)) == 0
    captured = capsys.readouterr()
    assert "(2 runs)" in captured.out and "2 record(s) of format 1 carry no checksum" in captured.err
    assert cli.main(_argv("status", s, paths)) == 0
    assert "2 finished" in capsys.readouterr().out


def test_a_stale_record_is_left_out_of_the_report_with_a_note(tmp_path, capsys):
    s, paths = _finished(tmp_path, TINY.replace("seeds: [0]", "seeds: [0, 1]"))
    runs = _runs(s)
    rec = json.loads(paths.record(runs["ibp/seed1"]).read_text())
    rec["config"]["optimizer"]["lr"] = 0.5  # and sealed again: not damaged, but not this run's settings
    paths.record(runs["ibp/seed1"]).write_text(json.dumps(records.seal(rec)))
    assert cli.main(_argv("report", s, paths)) == 0
    captured = capsys.readouterr()
    assert "(3 runs)" in captured.out
    assert "ibp/seed1: stale (optimizer.lr: 0.5 -> 0.01); not reported" in captured.err


@pytest.mark.slow
def test_verify_fails_on_a_record_that_does_not_reproduce_and_does_not_keep_it(tmp_path, capsys):
    text = TINY.replace("seeds: [0]", "seeds: [0]\nevaluation: {num_test: 16}")
    s, paths = _study(tmp_path, text)
    run = _runs(s)["warm/seed0"]
    assert study.run_one(s, run, paths, log=QUIET) == "finished"
    rec = json.loads(paths.record(run).read_text())
    assert rec["test"]["certified"] < 0.5
    rec["test"]["certified"] = 0.99  # edited, and its checksum recomputed: only evaluating again tells
    edited = records.seal(rec)
    paths.record(run).write_text(json.dumps(edited))
    assert cli.main(_argv("verify", s, paths, "--time-limit", "1")) == 1
    err = capsys.readouterr().err
    assert "warm/seed0 (certified; record moved to" in err and "do not reproduce" in err
    assert not paths.record(run).exists()  # not kept as the run's result
    (kept,) = (paths.results / "rejected").iterdir()
    assert json.loads(kept.read_text()) == edited
    assert study.run_state(run, paths) == "interrupted"  # its checkpoint is there: `run` evaluates it again


# ---------------------------------------------------------------------------------- the study file


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("after: warm", "after: [warm]"), "after names one other row"),
        (("after: warm", "after: 5"), "after names one other row"),
        (("after: warm", "after: ibp"), "which is not another row"),
        (("seeds: [0]", "seeds: [0]\nevaluation: {methods: [nosuch]}"), "evaluation.methods must be"),
        (("seeds: [0]", "seeds: [0]\nevaluation: {methods: [ibp, ibp]}"), "evaluation.methods must be"),
        (("seeds: [0]", "seeds: [0]\nevaluation: {methods: []}"), "evaluation.methods must be"),
        (("seeds: [0]", "seeds: [0]\nevaluation: {pgd_restarts: 'three'}"), "evaluation.pgd_restarts must be"),
        (("seeds: [0]", "seeds: [0]\nevaluation: {pgd_restarts: 0}"), "evaluation.pgd_restarts must be"),
        (("seeds: [0]", "seeds: [0]\nevaluation: {pgd_restarts: true}"), "evaluation.pgd_restarts must be"),
        (("seeds: [0]", "seeds: [0]\nevaluation: {num_test: -5}"), "evaluation.num_test must be"),
        (("seeds: [0]", "seeds: [0]\nevaluation: {max_domains: 0}"), "evaluation.max_domains must be"),
        (("seeds: [0]", "seeds: [0]\nevaluation: {verify: 'yes'}"), "evaluation.verify must be"),
        (("seeds: [0]", "seeds: [0]\nevaluation: {time_limit: .nan}"), "evaluation.time_limit must be"),
        (("seeds: [0]", "seeds: [0]\nevaluation: {time_limit: -1}"), "evaluation.time_limit must be"),
        (("seeds: [0]", "seeds: [0]\nevaluation: [verify]"), "evaluation must be a mapping"),
        (("seeds: [0]", "seeds: [0]\nselect: nosuch"), "select: 'nosuch' is not a validation metric"),
        (("seeds: [0]", "seeds: [0]\nselect: verified"), "select: 'verified' is not a validation metric"),
        (("seeds: [0]", "seeds: [0]\nselect: certified/deeppoly"), "is not a validation metric"),
        (("seeds: [0]", "seeds: [0]\nselect: [certified]"), "select must be a metric name"),
        (("seeds: [0]", "seeds: ['0']"), "seeds must be"),
        (("seeds: [0]", "seeds: [true]"), "seeds must be"),
        (("set: {bound.method: natural}", "set: {bound.method: natural, train.seed: 3}"), "sets train.seed"),
        (("seeds: [0]", "seeds: [0]\naxes: {train.seed: [1, 2]}"), "sets train.seed"),
        (("after: warm", "after: warm\n    set: {model.init_from: x.h5}"), "sets model.init_from and starts from"),
        (("  - name: warm", "  - name: ''"), "needs a name"),
        (("rows:\n", "rows: {warm: 1}\nx:\n"), "unknown keys"),
        (("study: tiny", "study: '..'"), "study name must be a string without '/'"),
        (("  - name: warm", "  - name: '..'"), "needs a name"),
        (("seeds: [0]", "seeds: [0]\naxes: {bound.eps: [{bound.eps: 0.1, label: '..'}]}"), "has a part '.' or '..'"),
        (
            (
                "  - name: ibp\n",
                "  - name: p\n    grid: {optimizer.lr: [{optimizer.lr: 0.1, label: q}]}\n  - name: p__q\n  - name: ibp\n",
            ),
            "share one record file",
        ),
        (("study: tiny", "study: tiny\nbase: [a]"), "base must be the path of a config file"),
        (("study: tiny", "study: tiny\nbase: nosuch.yaml"), "base config"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_a_study_file_is_checked_whole_before_anything_trains(tmp_path, capsys, edit, message):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.replace(*edit))
    folders = ["--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]
    assert cli.main(["study", "run", str(path), "--inline", *folders]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


def test_a_study_file_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path, capsys):
    import os

    fifo = tmp_path / "study.yaml"
    os.mkfifo(fifo)
    assert cli.main(["study", "status", str(fifo)]) == 2  # opening a FIFO would wait for a writer forever
    assert "is a FIFO (named pipe), not a regular file" in capsys.readouterr().err


def test_max_generations_below_0_is_refused_before_anything_runs(tmp_path, capsys):
    s, paths = _study(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli.main(_argv("run", s, paths, "--max-generations", "-1"))
    assert exc.value.code == 2 and "--max-generations" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--max-generations must be >= 0"):
        study.run_study(s, paths, inline=True, max_generations=-1, log=QUIET)
    assert not paths.runs.exists()


def test_select_may_name_a_certificate_every_run_records(tmp_path):
    s, _ = _study(tmp_path, TINY.replace("seeds: [0]", "seeds: [0]\nselect: certified/ibp"))
    assert s.select == "certified/ibp"


def test_select_cannot_name_the_adversarial_accuracy_of_runs_evaluated_without_an_attack(tmp_path):
    """Without a PGD attack (eval.pgd_steps 0) no adversarial accuracy is recorded: selecting by it is refused."""
    text = TINY.replace("pgd_steps: 2", "pgd_steps: 0").replace("seeds: [0]", "seeds: [0]\nselect: adversarial")
    with pytest.raises(study.StudyError, match="adversarial"):
        _study(tmp_path, text)
    assert _study(tmp_path, TINY.replace("seeds: [0]", "seeds: [0]\nselect: adversarial"))[0].select == "adversarial"


# ------------------------------------------------------------------------------- two runners at once


def test_a_second_runner_waits_for_a_run_another_process_trains_and_exits_0(tmp_path, capsys):
    s, paths = _study(tmp_path)
    runs = _runs(s)
    held = threading.Event()

    def other_runner() -> None:  # holds the runs' locks as a runner training them does, then records them
        for rid in ("warm/seed0", "ibp/seed0"):
            d = paths.run_dir(runs[rid])
            d.mkdir(parents=True, exist_ok=True)
            with open(d / study.LOCK_FILE, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                held.set()
                time.sleep(0.5)
                _write_record(paths, runs[rid], f"theta-{rid}")

    thread = threading.Thread(target=other_runner)
    thread.start()
    held.wait(10)
    try:
        logs: list[str] = []
        outcome = study.run_study(s, paths, inline=True, log=logs.append, poll_s=0.05)
    finally:
        thread.join()
    assert outcome == {"warm/seed0": "finished", "ibp/seed0": "finished"}
    assert study_cli.exit_code(outcome) == 0
    assert any("warm/seed0: being trained by another process; waiting" in m for m in logs)
    assert not (paths.run_dir(runs["warm/seed0"]) / "metrics.jsonl").exists()  # it trained nothing itself


# ---------------------------------------------------------------------------------- exit codes


def test_study_run_exit_codes_agree_with_train():
    code = study_cli.exit_code
    assert code({"a": "finished", "b": study.STOPPED, "c": f"waiting (b: {study.STOPPED})"}) == 0
    assert code({"a": "finished", "b": "interrupted", "c": "waiting (b: interrupted)"}) == 3  # requeue
    assert code({"a": "not started (stopped)"}) == 3
    assert code({"a": "failed (exit 1)", "b": "blocked (a: failed (exit 1))"}) == 1
    assert code({"b": "blocked (a: pending)"}) == 1


def test_max_generations_pauses_a_study_with_exit_0_as_train_does(tmp_path, capsys):
    s, paths = _study(tmp_path)
    assert cli.main(_argv("run", s, paths, "--inline", "--max-generations", "1")) == 0
    out = capsys.readouterr().out
    assert "1 stopped at --max-generations, 1 waiting" in out
    assert study.run_state(_runs(s)["warm/seed0"], paths) == "interrupted"  # the next `study run` resumes it


# --------------------------------------------------------------------------------- the report's files


def test_a_fifo_where_the_report_writes_is_refused_without_blocking(tmp_path, capsys):
    import os

    s, paths = _finished(tmp_path)
    os.mkfifo(paths.results / "table.md")
    assert cli.main(_argv("report", s, paths)) == 2
    assert "is a FIFO (named pipe), not a regular file" in capsys.readouterr().err
    assert not (paths.results / "table.json").exists()  # refused before anything was written


@pytest.mark.slow
def test_the_report_replaces_a_link_instead_of_writing_through_it(tmp_path, capsys):
    s, paths = _finished(tmp_path)
    record = paths.record(_runs(s)["warm/seed0"])
    before = record.read_bytes()
    (paths.results / "table.json").symlink_to(record.name)  # a link to a record: writing through would destroy it
    assert cli.main(_argv("report", s, paths)) == 0
    assert record.read_bytes() == before and not (paths.results / "table.json").is_symlink()
    assert json.loads((paths.results / "table.json").read_text())["rows"]
    assert sorted(p.name for p in paths.results.iterdir() if p.name.startswith(".")) == []  # no temporary left


def test_a_report_out_that_is_a_file_is_refused(tmp_path, capsys):
    s, paths = _finished(tmp_path)
    out = tmp_path / "out.md"
    out.write_text("mine")
    assert cli.main([*_argv("report", s, paths), "--out", str(out)]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err and out.read_text() == "mine"


def test_verify_leaves_a_run_whose_lock_another_process_holds(tmp_path):
    s, paths = _finished(tmp_path)
    run = _runs(s)["warm/seed0"]
    paths.run_dir(run).mkdir(parents=True)
    before = paths.record(run).read_bytes()
    logs: list[str] = []
    with open(paths.run_dir(run) / study.LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert study.verify_finished(s, paths, time_limit=1, only=[run.id], log=logs.append) == []
    assert any("another process holds" in m and "left for now" in m for m in logs)
    assert paths.record(run).read_bytes() == before


@pytest.mark.slow
def test_a_run_killed_between_its_training_and_its_record_is_evaluated_without_training_again(tmp_path, monkeypatch):
    s, paths = _study(tmp_path)
    run = _runs(s)["warm/seed0"]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process ends after the last checkpoint, before the record

    with monkeypatch.context() as m:
        m.setattr(study, "_evaluate", killed)
        with pytest.raises(KeyboardInterrupt):
            study.run_one(s, run, paths, log=QUIET)
    assert study.run_state(run, paths) == "interrupted" and not paths.record(run).exists()
    assert study.run_one(s, run, paths, log=QUIET) == "finished"
    lines = [json.loads(x) for x in (paths.run_dir(run) / "metrics.jsonl").read_text().splitlines()]
    generations = [x["generation"] for x in lines if "generation" in x and "schema" not in x]
    assert sorted(generations) == list(range(1, 7))  # every generation once: nothing trained again
    assert study.read_record(paths.record(run))["generations"] == 6


def test_a_second_study_run_command_waits_for_the_first_and_exits_0(tmp_path, capsys):
    s, paths = _study(tmp_path)
    runs = _runs(s)
    held = threading.Event()

    def first_runner() -> None:  # trains both runs (holds their locks), then records them
        locks = []
        for run in runs.values():
            paths.run_dir(run).mkdir(parents=True, exist_ok=True)
            locks.append(open(paths.run_dir(run) / study.LOCK_FILE, "a"))  # noqa: SIM115
            fcntl.flock(locks[-1], fcntl.LOCK_EX)
        held.set()
        time.sleep(1.0)
        for run in runs.values():  # stage order: the warm start first
            _write_record(paths, run, f"theta-{run.id}")
        for lock in locks:
            lock.close()

    thread = threading.Thread(target=first_runner)
    thread.start()
    held.wait(10)
    try:
        code = cli.main(_argv("run", s, paths))  # the default: each run in a process of its own
    finally:
        thread.join()
    out = capsys.readouterr().out
    assert code == 0 and "tiny: 2 finished" in out, out
    assert "being trained by another process; waiting" in out
    assert not any(p.name == study.LOG_FILE for p in paths.runs.rglob("*"))  # no run process was started
