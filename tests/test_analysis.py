"""Analysis of runs: load_run (API), the Table 1 report (md/csv/json), tightness curves and plots,
on small digits runs trained in-process through the CLI."""

import csv
import io
import json
import shutil
import sys

import numpy as np
import pytest
import torch

from mpigls import analysis, cli, config
from mpigls.analysis import plotting, report as analysis_report, tightness as analysis_tightness
from mpigls.evaluation import certify
from mpigls.run import checkpoint, monitor, train

from conftest import tiny_overrides

PNG = b"\x89PNG\r\n\x1a\n"


def _train(out, *extra_args, **overrides):
    sets = [a for kv in tiny_overrides(**{"eval.every": 4, "eval.num_val": 32, **overrides}) for a in ("--set", kv)]
    assert cli.main(["train", "--out", str(out), *extra_args, *sets]) == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    _train(root / "pgpe")
    _train(root / "pgpe-seed1", **{"train.seed": 1})
    _train(root / "grad", **{"optimizer.name": "grad", "optimizer.block_size": 8})
    _train(root / "noeval", "--no-eval", **{"bound.method": "crown-ibp"})
    return root


def _eval(run_dir):
    return json.loads((run_dir / "eval.json").read_text())


def test_load_run_directory_and_checkpoint(runs):
    run = analysis.load_run(runs / "pgpe")
    ck = checkpoint.load(runs / "pgpe" / "latest.h5")
    assert run.config == ck.config and run.label == "pgpe" and run.checkpoint_path is not None
    assert list(run.generations) == list(range(1, 9))
    assert [g for g, _ in run.checkpoints] == [4, 6, 8]
    np.testing.assert_array_equal(run.metrics["loss/mean"], ck.metrics["loss/mean"])
    assert all(v.shape == (8,) for v in run.metrics.values())
    gens, nat = run.series("val/natural")
    assert list(gens) == [4, 8] and nat[-1] == ck.metrics["val/natural"][-1] == run.final("val/natural")
    saved = _eval(runs / "pgpe")
    (cert,) = run.certification
    assert cert["natural"] == saved["natural"] and cert["adversarial"] == saved["pgd"]
    assert cert["certified/ibp"] == saved["certified/ibp"] and cert["certified"] is None and cert["generation"] == 8
    single = analysis.load_run(runs / "pgpe" / "ckpt_00000006.h5")
    assert list(single.generations) == list(range(1, 7)) and single.certification == []  # eval.json is generation 8
    np.testing.assert_array_equal(single.metrics["loss/mean"], run.metrics["loss/mean"][:6])
    with pytest.raises(KeyError, match="available"):
        run.series("nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        analysis.load_run(runs / "missing")
    labels = [r.label for r in analysis.load_runs([runs / "pgpe", runs / "pgpe", runs / "grad" / "latest.h5"])]
    assert labels == ["pgpe #1", "pgpe #2", "grad/latest.h5"]


def test_dataframe_when_pandas_is_installed(runs):
    pytest.importorskip("pandas")
    df = analysis.load_run(runs / "grad").df
    assert list(df["generation"]) == list(range(1, 9)) and str(df["generation"].dtype) == "int64"
    assert {"loss/mean", "sched/lr", "val/certified/ibp"} <= set(df.columns)


def test_dataframe_without_pandas_says_which_extra(runs, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # makes `import pandas` fail
    run = analysis.load_run(runs / "grad")  # everything else works without pandas
    assert run.final("loss/mean") == run.metrics["loss/mean"][-1]
    with pytest.raises(ImportError, match=r"pip install 'mpigls\[analysis\]'"):
        _ = run.df


def test_load_run_while_training_and_from_the_log_alone(runs, tmp_path):
    live = tmp_path / "live"
    shutil.copytree(runs / "pgpe", live)
    with open(live / monitor.METRICS_FILE, "a") as f:  # generations past the last checkpoint, one mid-write
        f.write(json.dumps({"generation": 9, "loss/mean": 1.5}) + "\n" + '{"generation": 10, "loss/m')
    run = analysis.load_run(live)
    assert list(run.generations) == list(range(1, 10)) and run.final("loss/mean") == 1.5
    assert np.isnan(run.metrics["sched/eps"][-1])
    for p in live.glob("*.h5"):
        p.unlink()
    only_log = analysis.load_run(live)
    assert only_log.checkpoint_path is None and only_log.config["eval"]["every"] == 4
    assert list(only_log.generations) == list(range(1, 10))
    (live / monitor.METRICS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="neither a loadable checkpoint"):
        analysis.load_run(live)


def test_normalise_result_is_tolerant():
    n = analysis.normalise_result
    assert n({"a": 1}) is None and n([1]) is None
    assert n({"schema": "mpigls-tightness", "natural": 0.5}) is None
    res = n(
        {
            "summary": {
                "natural": [True, False, True, True],
                "adversarial": [1, 0, 0, 1],
                "certified": {"ibp": 0.25, "deeppoly": 0.5},
                "verified": {"accuracy": 0.5},
            },
            "eps": 0.1,
        }
    )
    assert (res["natural"], res["adversarial"], res["verified"], res["eps"]) == (0.75, 0.5, 0.5, 0.1)
    assert res["certified"] is None and res["certified/deeppoly"] == 0.5
    res = n({"natural": 0.9, "pgd": 0.8, "certified": 0.7, "certified/ibp": 0.6})
    assert (res["adversarial"], res["certified"], res["certified/ibp"], res["verified"]) == (0.8, 0.7, 0.6, None)


def _report(capsys, *args):
    assert cli.main(["report", *map(str, args)]) == 0
    return capsys.readouterr().out


def test_report_tables_md_csv_json(runs, capsys):
    paths = [runs / "grad", runs / "pgpe", runs / "pgpe-seed1"]
    table = json.loads(_report(capsys, *paths, "--format", "json"))
    assert table["optimizers"] == ["grad", "pgpe"] and table["metrics"] == ["natural", "adversarial", "certified"]
    (row,) = table["rows"]
    assert (row["dataset"], row["eps"], row["relaxation"]) == ("digits", 0.05, "ibp")
    g, p0, p1 = _eval(runs / "grad"), _eval(runs / "pgpe"), _eval(runs / "pgpe-seed1")
    pgpe_nat = [100 * p0["natural"], 100 * p1["natural"]]
    cell = row["cells"]["natural"]["pgpe"]
    assert cell["n"] == 2 and cell["runs"] == ["pgpe", "pgpe-seed1"]
    assert cell["mean"] == pytest.approx(np.mean(pgpe_nat)) and cell["std"] == pytest.approx(np.std(pgpe_nat, ddof=1))
    assert row["cells"]["adversarial"]["grad"]["mean"] == pytest.approx(100 * g["pgd"])
    grad_cert = row["cells"]["certified"]["grad"]
    assert grad_cert["mean"] == pytest.approx(100 * g["certified/ibp"]) and grad_cert["single_method"]

    md = _report(capsys, *paths)
    lines = md.splitlines()
    assert (
        lines[0]
        == "| Dataset | eps | Relaxation | Nat. GRAD | Nat. PGPE | Adv. GRAD | Adv. PGPE | Cert. GRAD | Cert. PGPE |"
    )
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[:4] == ["digits", "0.05", "IBP", f"{100 * g['natural']:.2f}"]
    assert cells[4] == f"{np.mean(pgpe_nat):.2f} ± {np.std(pgpe_nat, ddof=1):.2f} (n=2)"
    assert cells[7] == f"{100 * g['certified/ibp']:.2f}*" and "best single bound method" in md

    rows = list(csv.reader(io.StringIO(_report(capsys, *paths, "--format", "csv"))))
    assert rows[0] == lines[0].strip("| ").split(" | ") and len(rows) == 2
    assert float(rows[1][3]) == pytest.approx(100 * g["natural"], abs=1e-4)
    assert float(rows[1][6]) == pytest.approx(100 * np.mean([p0["pgd"], p1["pgd"]]), abs=1e-4)


def test_report_prefers_a_richer_certification_file(runs, tmp_path, capsys):
    run_dir = tmp_path / "rich"
    shutil.copytree(runs / "grad", run_dir)
    per_sample = {
        "natural": [True] * 7 + [False],
        "adversarial": [True] * 6 + [False] * 2,
        "certified": [True] * 5 + [False] * 3,
        "verified": [True] * 5 + [False] * 3,
    }
    (run_dir / "certify").mkdir()
    (run_dir / "certify" / "ckpt_00000008.json").write_text(
        json.dumps({"generation": 8, "eps": 0.05, "num_examples": 8, "certified/ibp": 0.5, "time_s": 1.0, **per_sample})
    )
    table = json.loads(_report(capsys, run_dir, "--format", "json"))
    cells = table["rows"][0]["cells"]
    assert table["metrics"] == ["natural", "adversarial", "certified", "verified"]
    assert [cells[m]["grad"]["mean"] for m in table["metrics"]] == [87.5, 75.0, 62.5, 62.5]
    assert not cells["certified"]["grad"]["single_method"]
    # a result at another radius does not stand in for the training radius
    assert analysis.load_run(run_dir).best_certification(0.3) is None
    (run_dir / "aside-20260101T000000Z").mkdir()  # an earlier run's files, moved aside by train --restart
    (run_dir / "aside-20260101T000000Z" / "eval.json").write_text(json.dumps({"natural": 1.0, "generation": 99}))
    assert [r["generation"] for r in analysis.load_run(run_dir).certification] == [8, 8]


def test_report_certify_fills_in_missing_results(runs, capsys):
    md = _report(capsys, runs / "noeval")
    assert "No stored certification result (left out): noeval" in md and "CROWN-IBP" not in md
    table = json.loads(_report(capsys, runs / "noeval", "--certify", "--format", "json"))
    stored = json.loads((runs / "noeval" / "certify_00000008.json").read_text())
    cfg = config.from_dict(checkpoint.load(runs / "noeval" / "latest.h5").config)
    dataset, model, _ = train.build_problem(cfg)
    theta = torch.from_numpy(checkpoint.load(runs / "noeval" / "latest.h5").theta.copy())
    ref = certify.evaluate(
        model,
        theta,
        dataset.test_x,
        dataset.test_y,
        cfg.bound.eps,
        ["ibp"],
        batch_size=cfg.eval.batch_size,
        pgd_steps=cfg.eval.pgd_steps,
        seed=cfg.train.seed,
    )
    assert stored["natural"] == ref["natural"] and stored["certified/ibp"] == ref["certified/ibp"]
    (row,) = table["rows"]
    assert row["relaxation"] == "crown-ibp" and row["cells"]["natural"]["pgpe"]["mean"] == pytest.approx(
        100 * ref["natural"]
    )


def test_tightness_curves_and_area(runs, tmp_path, capsys):
    png = tmp_path / "t.png"
    ckpt = runs / "grad" / "latest.h5"
    assert (
        cli.main(
            [
                "tightness",
                str(ckpt),
                "--out",
                str(png),
                "--methods",
                "ibp,deeppoly",
                "--num-radii",
                "5",
                "--num-test",
                "48",
            ]
        )
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5000
    res = json.loads(png.with_suffix(".json").read_text())
    assert res["radii"] == pytest.approx([0, 0.025, 0.05, 0.075, 0.1]) and res["num_examples"] == 48
    for curve in res["methods"].values():
        acc = curve["certified"]
        assert acc[0] == res["natural_accuracy"]  # every sound bound is exact at radius 0
        manual = sum(0.025 * (a + b) / 2 for a, b in zip(acc, acc[1:]))
        assert curve["auc"] == pytest.approx(manual) and curve["auc_normalized"] == pytest.approx(manual / 0.1)
    ibp = res["methods"]["ibp"]["certified"]
    assert all(b <= a for a, b in zip(ibp, ibp[1:]))  # IBP boxes are nested in the radius
    cfg = config.from_dict(checkpoint.load(ckpt).config)
    dataset, model, _ = train.build_problem(cfg)
    ref = certify.evaluate(
        model,
        torch.from_numpy(checkpoint.load(ckpt).theta.copy()),
        dataset.test_x[:48],
        dataset.test_y[:48],
        0.05,
        ["deeppoly"],
        pgd_steps=0,
    )
    assert res["methods"]["deeppoly"]["certified"][2] == ref["certified/deeppoly"]
    assert analysis.normalise_result(res) is None  # not mistaken for a certification result
    with pytest.raises(ValueError, match="start at 0"):
        analysis_tightness.tightness(model, torch.zeros(1), dataset.test_x[:2], dataset.test_y[:2], [0.1, 0.2], ["ibp"])
    assert cli.main(["tightness", str(ckpt), "--methods", "ibp,nope", "--out", str(png)]) == 2


def test_plot_overlays_runs_and_checkpoints(runs, tmp_path, capsys):
    out = tmp_path / "m.png"
    assert (
        cli.main(
            ["plot", str(runs / "pgpe"), str(runs / "grad"), str(runs / "pgpe-seed1" / "latest.h5"), "--out", str(out)]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 20000
    assert cli.main(["plot", str(runs / "pgpe"), "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'metrics.png'}"
    assert (tmp_path / "metrics.png").read_bytes()[:8] == PNG
    keys = tmp_path / "k.svg"
    assert cli.main(
        [
            "plot",
            str(runs / "pgpe"),
            str(runs / "grad"),
            "--keys",
            "loss/mean,val/natural",
            "--smooth",
            "3",
            "--out",
            str(keys),
        ]
    ) == 0 and keys.read_text().startswith("<?xml")
    capsys.readouterr()
    assert cli.main(["plot", str(runs / "pgpe"), "--out", str(tmp_path / "noext")]) == 0  # as matplotlib names it
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'noext.png'}" and (tmp_path / "noext.png").exists()
    assert cli.main(["plot", str(runs / "pgpe"), "--keys", "nope", "--out", str(out)]) == 2
    assert "available" in capsys.readouterr().err


def test_smooth_skips_nans_and_keeps_constants():
    v = np.array([1.0, np.nan, 3.0, 5.0, np.nan, np.nan, np.nan])
    s = plotting.smooth(v, 3)
    np.testing.assert_allclose(s[:5], [1.0, 2.0, 4.0, 4.0, 5.0])
    assert np.isnan(s[6]) and np.array_equal(plotting.smooth(np.full(9, 2.0), 5), np.full(9, 2.0))
    assert analysis_tightness.auc([0, 1, 3], [1, 1, 0]) == pytest.approx(2.0)
    assert analysis_report._eps_text(2 / 255) == "2/255" and analysis_report._eps_text(0.1) == "0.1"
