"""mpigls certify: per-sample results, the union of certificates, the complete verifier column,
the stored results file and independence of the number of ranks (ThreadComm)."""

from __future__ import annotations

import json

import pytest
import torch

from mpigls import cli, config as config_mod, parallel
from mpigls.evaluation import certify
from mpigls.numerics import precision
from mpigls.run import checkpoint, train as train_mod

from conftest import tiny_overrides

pytestmark = pytest.mark.slow  # trains a small checkpoint (~15 s on 2 loaded cores)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("certify") / "run"
    sets = tiny_overrides(
        **{
            "optimizer.name": "grad",
            "optimizer.lr": 0.01,
            "optimizer.block_size": 16,
            "bound.method": "ibp",
            "bound.eps": 0.02,
            "train.epochs": 3,
        }
    )
    assert cli.main(["train", "--out", str(out), "--no-eval", *sum((["--set", s] for s in sets), [])]) == 0
    return out / "latest.h5"


def _problem(path):
    ckpt = checkpoint.load(path)
    cfg = config_mod.from_dict(ckpt.config)
    dataset, model, _ = train_mod.build_problem(cfg)
    return model, torch.from_numpy(ckpt.theta.copy()), dataset.test_x[:24], dataset.test_y[:24]


def test_union_verifier_and_rank_independence(trained):
    model, theta, x, y = _problem(trained)
    kw = dict(
        eps=0.03,
        methods=["ibp", "deeppoly"],
        batch_size=5,
        pgd_steps=5,
        pgd_restarts=2,
        verify=True,
        verify_time_limit=None,
        verify_max_domains=40,
    )

    def run(comm):
        import copy

        return certify.certify(copy.deepcopy(model), theta, x, y, comm=comm, **kw)

    results = [parallel.run_threaded(run, w)[0] for w in (1, 2, 3)]
    summary, s = results[0]
    drop = {"verify/time_s"}
    for other in results[1:]:
        assert {k: v for k, v in other[1].items() if k not in drop} == {k: v for k, v in s.items() if k not in drop}
        assert {k: v for k, v in other[0].items() if k not in ("time_s", "verify/mean_time_s")} == {
            k: v for k, v in summary.items() if k not in ("time_s", "verify/mean_time_s")
        }
    n = len(y)
    assert s["index"] == list(range(n))
    for i in range(n):
        union = s["certified/ibp"][i] or s["certified/deeppoly"][i]
        assert s["certified"][i] == union
        if union:  # sound certificates imply correctness, robustness to PGD, and the verifier agrees
            assert s["natural"][i] and s["adversarial"][i] and s["verified"][i] == "verified"
        if s["adversarial"][i]:
            assert s["natural"][i]
        if s["verified"][i] == "verified":  # a complete answer never contradicts PGD
            assert s["adversarial"][i]
        if not s["natural"][i]:
            assert s["verified"][i] == "falsified" and s["verify/reason"][i] == "clean"
        assert (s["margin/ibp"][i] > precision.CERTIFY_MARGIN) == s["certified/ibp"][i]
    assert summary["certified"] == pytest.approx(sum(s["certified"]) / n)
    assert summary["verified"] == pytest.approx(s["verified"].count("verified") / n)
    assert summary["unknown"] + summary["falsified"] + s["verified"].count("verified") == n
    assert summary["verified"] >= summary["certified"]
    assert summary["certified"] > 0 and summary["falsified"] > 0  # the fixture is informative


def test_cli_certify_json_and_results_file(trained, capsys):
    assert (
        cli.main(
            [
                "certify",
                str(trained),
                "--json",
                "--num-test",
                "12",
                "--eps",
                "0.03",
                "--methods",
                "ibp,crown-ibp",
                "--verify",
                "--max-domains",
                "20",
                "--pgd-restarts",
                "2",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    for key in (
        "natural",
        "adversarial",
        "certified",
        "verified",
        "unknown",
        "falsified",
        "certified/ibp",
        "certified/crown-ibp",
        "eps",
        "num_examples",
        "time_s",
    ):
        assert key in out, key
    assert out["num_examples"] == 12 and out["eps"] == 0.03
    stored = json.loads(certify.results_path(trained, 0.03).read_text())
    assert stored["schema"] == certify.RESULTS_SCHEMA and stored["format_version"] == certify.RESULTS_VERSION
    assert stored["theta_sha256"] == checkpoint.summary(trained)["theta_sha256"]
    assert stored["summary"]["certified"] == out["certified"]
    assert len(stored["samples"]["verified"]) == 12
    with pytest.raises(SystemExit) as refused:  # refused by the parser, before any work
        cli.main(["certify", str(trained), "--pgd-restarts", "-1"])
    assert refused.value.code == 2


def test_only_sound_methods_certify():
    """sabr bounds a small box around a PGD point: it must never be reported as a certificate."""
    import pytest as _pytest
    import torch as _torch

    from mpigls import bounds, config
    from mpigls.evaluation import certify as certify_mod
    from mpigls.nn import models

    assert bounds.SOUND_METHODS == config.CERTIFY_METHODS
    assert "sabr" not in bounds.SOUND_METHODS
    with _pytest.raises(config.ConfigError, match="sound"):
        config.EvalConfig(methods=["sabr"])
    model = models.build("mlp-tiny", (1, 4, 4), 3)
    theta = models.flat_params(model)
    x, y = _torch.rand(4, 1, 4, 4), _torch.tensor([0, 1, 2, 0])
    for fn in (certify_mod.evaluate, certify_mod.certify):
        with _pytest.raises(ValueError, match="sound"):
            fn(model, theta, x, y, 0.01, ["ibp", "sabr"])
