"""Studies: expansion of a grid into runs, the resumable runner (each run trained exactly once),
and the seed aggregation and selection of the report, against hand-computed values."""

import json
import math
from pathlib import Path

import pytest

from mpigls.run import monitor
from mpigls.studies import records, report as study_report, runner as study

TINY = """
study: tiny
config:
  data: {name: synthetic, val_size: 64}
  model: {name: mlp-tiny}
  bound: {method: ibp, eps: 0.05}
  optimizer: {name: grad, lr: 0.01}
  train: {epochs: 2, batch_size: 64, checkpoint_every: 1, log_every: 100}
  eval: {methods: [ibp], pgd_steps: 2}
seeds: [0, 1]
rows:
  - name: warm
    set: {bound.method: natural}
  - name: ibp
    after: warm
    grid: {optimizer.lr: [0.01]}
"""


def _study(tmp_path: Path, text: str = TINY) -> tuple[study.Study, study.Paths]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    s = study.load_study(path)
    return s, study.Paths(tmp_path / "runs", tmp_path / "results")


def test_expansion_stages_ids_and_configs(tmp_path):
    text = TINY.replace("seeds: [0, 1]", "seeds: [0, 1]\naxes: {bound.eps: [0.05, 0.1]}").replace(
        "[0.01]", "[0.01, 0.001]"
    )
    s, _ = _study(tmp_path, text)
    runs = study.expand(s)
    assert len(runs) == 2 * (2 + 2 * 2)  # eps x (warm x seeds + ibp x lr x seeds)
    assert [r.stage for r in runs] == sorted(r.stage for r in runs)
    by_id = {r.id: r for r in runs}
    run = by_id["eps=0.1/ibp/lr=0.001/seed1"]
    assert run.after == "eps=0.1/warm/seed1" and run.stage == 1
    assert run.config["bound"]["eps"] == 0.1 and run.config["optimizer"]["lr"] == 0.001
    assert run.config["train"]["seed"] == 1 and run.config["train"]["threads"] == 1
    assert by_id["eps=0.05/warm/seed0"].config["bound"]["method"] == "natural"


def test_study_without_validation_split_is_refused(tmp_path):
    with pytest.raises(study.StudyError, match="val_size"):
        _study(tmp_path, TINY.replace("val_size: 64", "val_size: 0"))


def _headers_and_counts(run_dir: Path) -> tuple[list[int], dict[int, int]]:
    """start generations of the metrics log's sessions; how many lines each generation has."""
    starts, counts = [], {}
    for line in (run_dir / monitor.METRICS_FILE).read_text().splitlines():
        obj = json.loads(line)
        if "schema" in obj:
            starts.append(obj["start_generation"])
        else:
            counts[obj["generation"]] = counts.get(obj["generation"], 0) + 1
    return starts, counts


@pytest.mark.slow
def test_runner_resumes_a_grid_and_trains_each_run_exactly_once(tmp_path):
    s, paths = _study(tmp_path)
    runs = {r.id: r for r in study.expand(s)}
    quiet = lambda msg: None
    total = 2 * 3  # epochs x (192 training examples // batch 64)
    # the state before the runner: one run finished, two interrupted, one not started
    assert study.run_one(s, runs["warm/seed0"], paths, log=quiet) == "finished"
    assert study.run_one(s, runs["warm/seed1"], paths, max_generations=2, log=quiet) == study.STOPPED
    assert study.run_one(s, runs["ibp/lr=0.01/seed0"], paths, max_generations=4, log=quiet) == study.STOPPED
    states = {rid: study.run_state(r, paths) for rid, r in runs.items()}
    assert states == {
        "warm/seed0": "finished",
        "warm/seed1": "interrupted",
        "ibp/lr=0.01/seed0": "interrupted",
        "ibp/lr=0.01/seed1": "not started",
    }
    finished_record = paths.record(runs["warm/seed0"]).read_bytes()

    outcome = study.run_study(s, paths, inline=True, log=quiet)
    assert outcome == dict.fromkeys(runs, "finished")
    assert paths.record(runs["warm/seed0"]).read_bytes() == finished_record  # left alone
    expected_starts = {"warm/seed0": [0], "warm/seed1": [0, 2], "ibp/lr=0.01/seed0": [0, 4], "ibp/lr=0.01/seed1": [0]}
    for rid, run in runs.items():
        starts, counts = _headers_and_counts(paths.run_dir(run))
        assert starts == expected_starts[rid], rid  # resumed where it stopped, never restarted
        assert counts == dict.fromkeys(range(1, total + 1), 1), rid  # every generation trained once
        rec = json.loads(paths.record(run).read_text())
        assert rec["run"] == rid and rec["generations"] == total and rec["seed"] == run.seed
        assert rec["validation"]["num_examples"] == 64 and rec["test"]["num_examples"] == 256
        assert set(rec["test"]) >= {"natural", "adversarial", "certified", "certified/ibp"}
        assert rec["cost_s"]["train"] > 0 and rec["commit"]
    dep = json.loads(paths.record(runs["ibp/lr=0.01/seed1"]).read_text())["config"]["model"]["init_from"]
    assert Path(dep) == paths.runs / "warm" / "seed1" / "latest.h5"

    records = {p: p.read_bytes() for p in paths.results.glob("*.json")}
    assert study.run_study(s, paths, inline=True, log=quiet) == dict.fromkeys(runs, "finished")
    assert {p: p.read_bytes() for p in paths.results.glob("*.json")} == records
    assert all(_headers_and_counts(paths.run_dir(r))[0] == expected_starts[rid] for rid, r in runs.items())


def test_dependent_run_waits_for_its_warm_start(tmp_path):
    s, paths = _study(tmp_path)
    run = next(r for r in study.expand(s) if r.after)
    with pytest.raises(study.StudyError, match="has not finished"):
        study.run_one(s, run, paths, log=lambda msg: None)


# ------------------------------------------------------------------------------------- aggregation


def test_aggregate_mean_sample_std_and_n():
    stat = study_report.aggregate([80.0, 82.0, 87.0])
    # mean 83; deviations -3, -1, 4; sample variance (9 + 1 + 16) / (3 - 1) = 13
    assert stat.n == 3 and stat.mean == pytest.approx(83.0) and stat.std == pytest.approx(math.sqrt(13.0))
    one = study_report.aggregate([50.0, None, math.nan])
    assert (one.mean, one.std, one.n) == (50.0, None, 1)
    assert study_report.aggregate([]).n == 0
    assert stat.text() == "83.0 ± 3.6 (n=3)"


def _record(row, conf, seed, val_cert, test_cert, test_nat):
    return {
        "schema": study.RECORD_SCHEMA,
        "run": f"{row}/{conf}/seed{seed}",
        "row": row,
        "group": "",
        "configuration": conf,
        "seed": seed,
        "config": {"optimizer": {"name": "pgpe"}, "bound": {"method": "deeppoly"}},
        "cost_s": {"train": 1800.0, "test": 0.0},
        "validation": {"natural": 0.9, "adversarial": 0.5, "certified": val_cert, "certified/deeppoly": val_cert},
        "test": {"natural": test_nat, "adversarial": 0.5, "certified": test_cert, "certified/deeppoly": test_cert},
    }


def test_report_selects_on_validation_and_aggregates_the_test_seeds():
    records = [
        # "a" is better on validation, "b" on the test set: the report must pick "a"
        _record("pgpe", "a", 0, 0.40, 0.30, 0.80),
        _record("pgpe", "a", 1, 0.42, 0.33, 0.82),
        _record("pgpe", "a", 2, 0.44, 0.36, 0.87),
        _record("pgpe", "b", 0, 0.20, 0.90, 0.90),
        _record("pgpe", "b", 1, 0.20, 0.90, 0.90),
    ]
    result = study_report.build(records)
    (row,) = result["rows"]
    assert row["configuration"] == "a" and row["num_configurations"] == 2
    cert, nat = row["test"]["certified"], row["test"]["natural"]
    assert cert.n == 3 and cert.mean == pytest.approx(33.0) and cert.std == pytest.approx(3.0)
    assert nat.mean == pytest.approx(83.0) and nat.std == pytest.approx(math.sqrt(13.0))
    assert result["columns"] == ["natural", "adversarial", "certified/deeppoly", "certified"]
    costs = {c["configuration"]: c["cost_s"] for c in result["configurations"]}
    assert costs == {"a": 3 * 1800.0, "b": 2 * 1800.0}
    text = study_report.format_markdown(result)
    assert "| pgpe | a (best of 2) | 83.0 ± 3.6 (n=3) |" in text
    assert "33.0 ± 3.0 (n=3)" in text


def test_report_figure_is_written(tmp_path):
    result = study_report.build([_record("pgpe", "a", s, 0.4, 0.3 + 0.01 * s, 0.8) for s in range(3)])
    out = study_report.plot(result, tmp_path / "fig.png")
    assert out.stat().st_size > 1000


def test_cli_status_and_slurm_index(tmp_path, capsys):
    from mpigls import cli

    s, paths = _study(tmp_path)
    common = ["--runs", str(paths.runs), "--results", str(paths.results)]
    assert cli.main(["study", "status", str(s.path), *common]) == 0
    out = capsys.readouterr().out
    assert "1  ibp/lr=0.01/seed1  not started" in out and "(stage 0: 2, stage 1: 2)" in out
    # a SLURM task names (stage, index); the index counts the runs of that stage in status order
    assert cli.main(["study", "run", str(s.path), *common, "--stage", "1", "--index", "0"]) == 1
    assert "ibp/lr=0.01/seed0: blocked" in capsys.readouterr().out  # its warm start has not run
    assert cli.main(["study", "run", str(s.path), *common, "--stage", "1", "--index", "2"]) == 2
    assert "stage 1 has 2 runs" in capsys.readouterr().err


def test_mpigls_report_of_a_study_file(tmp_path, monkeypatch, capsys):
    from mpigls import cli

    monkeypatch.chdir(tmp_path)
    s, _ = _study(tmp_path)
    paths = study.Paths.default(s)
    results = paths.results
    runs = {r.id: r for r in study.expand(s)}
    for seed, cert in enumerate((0.30, 0.36)):
        rec = _record("ibp", "lr=0.01", seed, cert, cert, 0.8)
        _write_record(s, paths, runs[f"ibp/lr=0.01/seed{seed}"], f"t{seed}", rec["validation"], rec["test"])
    assert cli.main(["report", str(s.path)]) == 0
    assert "| ibp | lr=0.01 | 80.0 ± 0.0 (n=2) |" in capsys.readouterr().out
    assert {p.name for p in results.iterdir()} >= {"table.md", "table.json", "figure.png"}
    assert json.loads((results / "table.json").read_text())["rows"][0]["test"]["certified"]["n"] == 2


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs" / "studies").glob("*.yaml")), ids=str)
def test_shipped_study_files_expand_into_valid_runs(path):
    s = study.load_study(path)  # builds and validates every run's config
    runs = study.expand(s)
    assert len(runs) >= 3 * len(s.rows) and all(r.config["data"]["val_size"] > 0 for r in runs)
    assert {r.seed for r in runs} == set(s.seeds) and len(s.seeds) >= 3
    for r in runs:
        if r.after:
            assert r.after.endswith(f"seed{r.seed}") and r.stage == 1


# ------------------------------------------------------------------------------------------ adoption


def _write_record(s: study.Study, paths: study.Paths, run: study.StudyRun, tag: str, validation, test) -> dict:
    """The record ``run_one`` would write for ``run`` (sealed), with the given numbers and θ hash ``tag``."""

    config = study.config_mod.to_dict(study.resolved_config(run, paths))
    dep = study.read_record(paths.record_of(run.after)) if run.after else None
    record = {"schema": study.RECORD_SCHEMA, "version": 2, "study": s.name, "run": run.id, "row": run.row,
              "group": run.group, "configuration": run.configuration, "seed": run.seed, "after": run.after,
              "warm_start_theta_sha256": dep["theta_sha256"] if dep else None, "commit": "abc",
              "generations": 6, "theta_sha256": tag, "cost_s": {"train": 1.0}, "evaluation": run.evaluation,
              "validation": validation, "test": test, "config": config}  # fmt: skip
    paths.results.mkdir(parents=True, exist_ok=True)
    record = records.seal(record)
    paths.record(run).write_text(json.dumps(record))
    return record


def _fake_finished(s: study.Study, paths: study.Paths, run: study.StudyRun, tag: str) -> None:
    """A finished run without training: a run directory with a checkpoint file, and its record."""
    d = paths.run_dir(run)
    d.mkdir(parents=True)
    (d / "latest.h5").write_bytes(tag.encode())
    (d / study.LOCK_FILE).write_bytes(b"")
    _write_record(s, paths, run, tag, {"certified": 0.5}, {"certified": 0.4})


def _finished_study(tmp_path: Path, name: str) -> tuple[study.Study, study.Paths]:
    """The TINY study under ``name`` with every run finished (without training)."""
    s, paths = _study(tmp_path / name, TINY.replace("study: tiny", f"study: {name}"))
    for run in study.expand(s):
        _fake_finished(s, paths, run, run.id)
    return s, paths


def test_adopt_copies_finished_runs_with_identical_settings_and_warm_starts(tmp_path):
    from mpigls.studies import adopt

    old, old_paths = _finished_study(tmp_path, "old")
    # the new study: the same warm start; ibp at the old lr and a new one; seed 1 of warm differs
    new_text = (
        TINY.replace("study: tiny", "study: new")
        .replace("[0.01]", "[0.01, 0.003]")
        .replace("seeds: [0, 1]", "seeds: [0, 1, 2]")
    )
    new, new_paths = _study(tmp_path / "new", new_text)
    adopted = adopt.adopt(new, new_paths, old, old_paths, log=lambda msg: None)
    assert adopted == {
        "warm/seed0": "warm/seed0",
        "warm/seed1": "warm/seed1",
        "ibp/lr=0.01/seed0": "ibp/lr=0.01/seed0",
        "ibp/lr=0.01/seed1": "ibp/lr=0.01/seed1",
    }
    states = {r.id: study.run_state(r, new_paths) for r in study.expand(new)}
    assert {k for k, v in states.items() if v == "finished"} == set(adopted)
    rec = json.loads(new_paths.record(next(r for r in study.expand(new) if r.id == "ibp/lr=0.01/seed1")).read_text())
    assert rec["study"] == "new" and rec["run"] == "ibp/lr=0.01/seed1" and rec["after"] == "warm/seed1"
    assert (
        rec["adopted_from"] == {"study": "old", "run": "ibp/lr=0.01/seed1"}
        and rec["theta_sha256"] == "ibp/lr=0.01/seed1"
    )
    assert Path(rec["config"]["model"]["init_from"]) == new_paths.runs / "warm" / "seed1" / "latest.h5"
    assert (new_paths.runs / "warm" / "seed1" / "latest.h5").read_bytes() == b"warm/seed1"
    assert not (new_paths.runs / "warm" / "seed1" / study.LOCK_FILE).exists()
    assert adopt.adopt(new, new_paths, old, old_paths, log=lambda msg: None) == {}  # nothing left to adopt


def test_adopt_refuses_other_warm_starts_other_settings_and_other_evaluation(tmp_path):
    from mpigls.studies import adopt

    old, old_paths = _finished_study(tmp_path, "old")
    # the warm start trains differently: neither it nor the runs that start from it are adopted
    other_warm = TINY.replace("study: tiny", "study: new").replace("{bound.method: natural}", "{bound.method: pgd}")
    new, new_paths = _study(tmp_path / "new", other_warm)
    assert adopt.adopt(new, new_paths, old, old_paths, log=lambda msg: None) == {}
    # a run already started here is left alone
    new2, new2_paths = _study(tmp_path / "new2", TINY.replace("study: tiny", "study: new2"))
    started = next(r for r in study.expand(new2) if r.id == "warm/seed0")
    new2_paths.run_dir(started).mkdir(parents=True)
    assert set(adopt.adopt(new2, new2_paths, old, old_paths, log=lambda msg: None)) == {
        "warm/seed1",
        "ibp/lr=0.01/seed1",
    }
    # another evaluation: nothing is comparable
    new3, new3_paths = _study(
        tmp_path / "new3", TINY.replace("study: tiny", "study: new3") + "evaluation: {pgd_restarts: 3}\n"
    )
    with pytest.raises(study.StudyError, match="not comparable"):
        adopt.adopt(new3, new3_paths, old, old_paths, log=lambda msg: None)


def test_complete_verifier_column_is_recorded_and_aggregated(tmp_path):
    text = TINY.replace("seeds: [0, 1]", "seeds: [0]\nevaluation: {verify: true, time_limit: 2, num_test: 16}")
    s, paths = _study(tmp_path, text)
    run = next(r for r in study.expand(s) if r.id == "warm/seed0")
    assert study.run_one(s, run, paths, log=lambda msg: None) == "finished"
    rec = json.loads(paths.record(run).read_text())
    test = rec["test"]
    assert "verified" not in rec["validation"] and test["num_examples"] == 16
    # sound and complete: the verifier proves every certified example and refutes no clean one
    assert test["certified"] <= test["verified"] <= test["natural"]
    records = [dict(rec, run=f"warm/seed{k}", seed=k, test=dict(test, verified=v)) for k, v in enumerate((0.5, 0.75))]
    result = study_report.build(records)
    assert result["columns"][-1] == "verified"
    stat = result["rows"][0]["test"]["verified"]
    assert (stat.n, stat.mean) == (2, pytest.approx(62.5)) and stat.std == pytest.approx(math.sqrt(2) * 12.5)
    assert "| Verified |" in study_report.format_markdown(result)


def test_verify_adds_the_complete_verifier_to_finished_runs_once(tmp_path):
    text = TINY.replace("seeds: [0, 1]", "seeds: [0]\nevaluation: {num_test: 16}")
    s, paths = _study(tmp_path, text)
    run = next(r for r in study.expand(s) if r.id == "warm/seed0")
    assert study.run_one(s, run, paths, log=lambda msg: None) == "finished"
    before = json.loads(paths.record(run).read_text())
    assert "verified" not in before["test"]
    assert study.verify_finished(s, paths, time_limit=2, log=lambda msg: None) == ["warm/seed0"]
    after = json.loads(paths.record(run).read_text())
    assert after["validation"] == before["validation"]  # the selection is not touched
    assert {k: after["test"][k] for k in before["test"]} == before["test"]  # the numbers it had are kept
    assert after["test"]["certified"] <= after["test"]["verified"] <= after["test"]["natural"]
    assert after["verify"] == {"time_limit": 2, "max_domains": None} and after["cost_s"]["verify"] > 0
    assert study.verify_finished(s, paths, time_limit=2, log=lambda msg: None) == []  # once
    # an edited record is refused by its checksum; one sealed again is refused by the network's hash
    del after["test"]["verified"]
    after["theta_sha256"] = "0" * 64
    paths.record(run).write_text(json.dumps(after))
    with pytest.raises(study.RecordError, match="checksum does not match"):
        study.verify_finished(s, paths, time_limit=2, log=lambda msg: None)
    paths.record(run).write_text(json.dumps(records.seal(after)))
    with pytest.raises(study.StudyError, match="not the network"):
        study.verify_finished(s, paths, time_limit=2, log=lambda msg: None)
