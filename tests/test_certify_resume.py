"""An interrupted ``certify --verify`` keeps every example it finished, and the next run of the same
evaluation resumes them with the same final numbers; another network, other data or other settings
never reuse them (``mpigls.evaluation.partial``)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from mpigls import parallel
from mpigls.evaluation import certify, partial, verify as verify_mod
from mpigls.nn import models

KW = dict(eps=0.08, methods=["ibp"], batch_size=3, pgd_steps=3, verify=True, verify_time_limit=None)
KW |= dict(verify_max_domains=30)
REAL_VERIFY = verify_mod.verify


@pytest.fixture(scope="module")
def problem():
    with models.private_rng(0):
        model = models.build("mlp-tiny", (1, 4, 4), 3)
    theta = models.flat_params(model)
    x = torch.rand(10, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = model(x).argmax(-1)  # correct at the centre: at eps 0.08 verified, unknown and falsified
    return model, theta, x, y


def _store(base, model, theta, x, y, rank=0, **kw):
    key = certify.partial_key(model, theta, x, y, **{**KW, **kw})
    return partial.PartialResults(base, key, rank=rank, num_examples=len(y))


def _without_times(summary, samples):
    return (
        {k: v for k, v in summary.items() if k not in ("time_s", "verify/mean_time_s")},
        {k: v for k, v in samples.items() if k != "verify/time_s"},
    )


def _counting_verify(monkeypatch, stop_after=None):
    calls = []

    def counted(*a, **kw):
        if stop_after is not None and len(calls) == stop_after:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the next example
        calls.append(kw["index"])
        return REAL_VERIFY(*a, **kw)

    monkeypatch.setattr(verify_mod, "verify", counted)
    return calls


def test_an_interrupted_verify_resumes_with_identical_numbers(problem, tmp_path, monkeypatch):
    model, theta, x, y = problem
    calls = _counting_verify(monkeypatch)
    ref = certify.certify(copy.deepcopy(model), theta, x, y, **KW)
    searched = list(calls)
    assert len(searched) >= 4 and set(ref[1]["verified"]) == {"verified", "unknown", "falsified"}

    base = tmp_path / "ckpt.certify-eps0.08.json"
    calls = _counting_verify(monkeypatch, stop_after=3)
    with pytest.raises(KeyboardInterrupt), _store(base, model, theta, x, y) as store:
        certify.certify(copy.deepcopy(model), theta, x, y, partial=store, **KW)
    kept = [json.loads(line) for line in (tmp_path / f"{base.name}.part0").read_text().splitlines()[1:]]
    assert [r["index"] for r in kept] == searched[:3]  # every finished example is on disk

    calls = _counting_verify(monkeypatch)
    with _store(base, model, theta, x, y) as store:
        again = certify.certify(copy.deepcopy(model), theta, x, y, partial=store, **KW)
    assert calls == searched[3:] and store.reused == 3  # the kept ones are not searched again
    assert _without_times(*again) == _without_times(*ref)
    for i in searched[:3]:  # the kept rows are the interrupted run's, time included
        assert again[1]["verify/time_s"][i] == next(r["row"][2] for r in kept if r["index"] == i)
    store.remove_all()
    assert partial.part_files(base) == []


def test_kept_rows_are_never_used_for_another_network_data_or_settings(problem, tmp_path):
    model, theta, x, y = problem
    base = tmp_path / "results.json"
    with _store(base, model, theta, x, y) as store:
        store.put(4, ("verified", "bab", 1.5, 7, 0))
    assert _store(base, model, theta, x, y).get(4) == ("verified", "bab", 1.5, 7, 0)
    other_theta = theta.clone()
    other_theta[0] += 1e-6
    other_x = x.clone()
    other_x[9, 0, 0, 0] = 0.5
    with models.private_rng(1):
        wider = models.build("mlp", (1, 4, 4), 3)
    for store in (
        _store(base, model, other_theta, x, y),
        _store(base, model, theta, other_x, y),
        _store(base, model, theta, x, y, eps=0.1),
        _store(base, model, theta, x, y, verify_max_domains=31),
        _store(base, model, theta, x, y, methods=["ibp", "deeppoly"]),
        _store(base, wider, models.flat_params(wider), x, y),
    ):
        assert store.rows == {} and store.get(4) is None
        assert store.foreign == partial.part_files(base)
    # writing for another evaluation replaces this rank's file; the first evaluation's rows are gone
    with _store(base, model, theta, x, y, eps=0.1) as store:
        store.put(2, ("unknown", "domain-limit", 0.5, 31, 0))
    assert _store(base, model, theta, x, y).rows == {}
    assert _store(base, model, theta, x, y, eps=0.1).rows == {2: ("unknown", "domain-limit", 0.5, 31, 0)}


def test_damaged_or_foreign_lines_are_skipped(problem, tmp_path):
    model, theta, x, y = problem
    base = tmp_path / "r.json"
    with _store(base, model, theta, x, y) as store:
        store.put(1, ("falsified", "pgd", 0.25, 0, 0))
    path = partial.part_files(base)[0]
    with path.open("a") as f:
        for obj in (
            {"index": 99, "row": ["verified", "bab", 1.0, 1, 0]},  # outside the examples
            {"index": 2, "row": ["proved", "bab", 1.0, 1, 0]},  # unknown status
            {"index": 3, "row": ["verified", "bab", -1.0, 1, 0]},  # negative time
            {"index": True, "row": ["verified", "bab", 1.0, 1, 0]},
        ):
            f.write(json.dumps(obj) + "\n")
        f.write('{"index": 5, "row": ["verified", "ba')  # a write cut by a kill
    store = _store(base, model, theta, x, y)
    assert store.rows == {1: ("falsified", "pgd", 0.25, 0, 0)}
    store.put(6, ("verified", "bab", 2.0, 3, 1))  # appended on a line of its own after the cut one
    store.close()
    assert _store(base, model, theta, x, y).rows == {
        1: ("falsified", "pgd", 0.25, 0, 0),
        6: ("verified", "bab", 2.0, 3, 1),
    }


def test_ranks_keep_their_own_files_and_a_rerun_at_another_rank_count_reads_them_all(problem, tmp_path):
    model, theta, x, y = problem
    base = tmp_path / "r.json"
    ref = certify.certify(copy.deepcopy(model), theta, x, y, **KW)

    def run(comm):
        with _store(base, model, theta, x, y, rank=comm.rank) as store:
            return certify.certify(copy.deepcopy(model), theta, x, y, comm=comm, partial=store, **KW)

    first = parallel.run_threaded(run, 3)[0]
    assert len(partial.part_files(base)) == 3
    with _store(base, model, theta, x, y) as store:
        again = certify.certify(copy.deepcopy(model), theta, x, y, partial=store, **KW)
    searched = sum(r != "certificate" for r in ref[1]["verify/reason"])
    assert store.reused == searched
    assert _without_times(*first) == _without_times(*ref) == _without_times(*again)


def test_a_partial_file_that_cannot_be_written_costs_only_the_resume(problem, tmp_path):
    model, theta, x, y = problem
    ref = certify.certify(copy.deepcopy(model), theta, x, y, **KW)
    warnings: list[str] = []
    key = certify.partial_key(model, theta, x, y, **KW)
    store = partial.PartialResults(tmp_path / "no-such-dir" / "r.json", key, num_examples=len(y), warn=warnings.append)
    got = certify.certify(copy.deepcopy(model), theta, x, y, partial=store, **KW)
    assert _without_times(*got) == _without_times(*ref)
    assert len(warnings) == 1 and "will not resume" in warnings[0]


def test_resume_false_reuses_nothing_and_starts_the_files_afresh(problem, tmp_path):
    model, theta, x, y = problem
    base = tmp_path / "r.json"
    with _store(base, model, theta, x, y) as store:
        store.put(1, ("falsified", "pgd", 0.25, 0, 0))
    key = certify.partial_key(model, theta, x, y, **KW)
    with partial.PartialResults(base, key, num_examples=len(y), resume=False) as fresh:
        assert fresh.get(1) is None and fresh.foreign == partial.part_files(base)
        fresh.put(2, ("verified", "bab", 1.0, 3, 0))
    assert _store(base, model, theta, x, y).rows == {2: ("verified", "bab", 1.0, 3, 0)}


# ----------------------------------------------------------------------------- mpigls certify --verify


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory):
    from mpigls import cli

    from conftest import tiny_overrides

    out = tmp_path_factory.mktemp("resume") / "run"
    sets = sum((["--set", s] for s in tiny_overrides(**{"data.num_test": 10})), [])
    assert cli.main(["train", "--out", str(out), "--max-generations", "0", *sets]) == 0
    return out / "latest.h5"


def test_ctrl_c_in_certify_verify_keeps_finished_examples_and_the_rerun_resumes_them(
    checkpoint_file, tmp_path, monkeypatch, capsys
):
    from mpigls import cli

    argv = ["certify", str(checkpoint_file), "--verify", "--max-domains", "5", "--time-limit", "0", "--json"]
    calls = _counting_verify(monkeypatch)
    assert cli.main([*argv, "--results", str(tmp_path / "ref.json")]) == 0
    ref, searched = json.loads(capsys.readouterr().out), list(calls)
    assert len(searched) >= 4

    results = tmp_path / "r.json"
    calls = _counting_verify(monkeypatch, stop_after=3)
    assert cli.main([*argv, "--results", str(results)]) == 130  # Ctrl-C
    err = capsys.readouterr().err
    assert "the same command resumes them" in err and not results.exists()
    assert len(partial.PartialResults(results, "?", num_examples=10).foreign) == 1  # one rank's file, 3 rows

    calls = _counting_verify(monkeypatch)
    assert cli.main([*argv, "--results", str(results)]) == 0
    out, err = capsys.readouterr()
    assert "resuming: 3 example(s)" in err and calls == searched[3:]
    drop = ("time_s", "verify/mean_time_s")
    assert {k: v for k, v in json.loads(out).items() if k not in drop} == {
        k: v for k, v in ref.items() if k not in drop
    }
    assert partial.part_files(results) == []  # the complete results are written: nothing kept any more
    stored, first = json.loads(results.read_text()), json.loads((tmp_path / "ref.json").read_text())
    assert stored["samples"]["verified"] == first["samples"]["verified"]

    calls = _counting_verify(monkeypatch, stop_after=2)
    assert cli.main([*argv, "--results", str(results)]) == 130
    calls = _counting_verify(monkeypatch)
    assert cli.main([*argv, "--results", str(results), "--no-resume"]) == 0
    assert calls == searched  # --no-resume: every example searched again
