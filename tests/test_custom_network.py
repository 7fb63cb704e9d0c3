"""A network of one's own through the whole path: named in the config as ``package.module:function``,
trained, checkpointed, resumed and certified (each re-imports it), taken out as a torch module
(``analysis.load_network``) and a ``.pt`` state dict that certifies to the same numbers; a changed
definition and an unsupported layer are refused, naming what is wrong."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import yaml

from mpigls import analysis, cli
from mpigls.run import checkpoint

from conftest import tiny_overrides

NETS = """
from torch import nn

WIDTH = 12


def cnn_small(in_shape, num_classes):
    c, h, w = in_shape
    return nn.Sequential(
        nn.Conv2d(c, 4, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * ((h + 1) // 2) * ((w + 1) // 2), WIDTH),
        nn.ReLU(),
        nn.Linear(WIDTH, num_classes),
    )


def pooled(in_shape, num_classes):
    return nn.Sequential(nn.Conv2d(in_shape[0], 2, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(18, num_classes))
"""
PKG = "usernets_e2e"


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    root = tmp_path_factory.mktemp("pkg")
    (root / PKG).mkdir()
    (root / PKG / "__init__.py").write_text("")
    (root / PKG / "nets.py").write_text(NETS)
    sys.path.insert(0, str(root))
    yield f"{PKG}.nets"
    sys.path.remove(str(root))
    for mod in [m for m in sys.modules if m.startswith(PKG)]:
        del sys.modules[mod]


def _sets(name: str) -> list[str]:
    return sum((["--set", s] for s in tiny_overrides(**{"model.name": name, "data.num_test": 24})), [])


@pytest.fixture(scope="module")
def run(nets, tmp_path_factory):
    out = tmp_path_factory.mktemp("custom") / "run"
    assert cli.main(["train", "--out", str(out), "--max-generations", "1", *_sets(f"{nets}:cnn_small")]) == 0
    return out


def test_trains_resumes_and_certifies(run, nets, capsys):
    first = checkpoint.load(run / "latest.h5")
    assert first.generation == 1 and first.arch["name"] == f"{nets}:cnn_small"
    assert first.arch["layers"][0].startswith("Conv2d(1, 4")  # BatchNorm folded away
    assert cli.main(["train", "--out", str(run), "--max-generations", "2", *_sets(f"{nets}:cnn_small")]) == 0
    assert checkpoint.load(run / "latest.h5").generation == 2  # the resume re-imported the network
    capsys.readouterr()
    assert cli.main(["certify", str(run), "--json", "--verify", "--max-domains", "10", "--eps", "0.02"]) == 0
    res = json.loads(capsys.readouterr().out)
    net = analysis.load_network(run)
    ds_x, ds_y = _test_set(run)
    with torch.no_grad():
        natural = float((net(ds_x).argmax(-1) == ds_y).float().mean())
    assert res["num_examples"] == 24 and res["natural"] == pytest.approx(natural)
    assert res["verified"] >= res["certified"]


def _test_set(run):
    from mpigls import config as config_mod
    from mpigls.run import train as train_mod

    cfg = config_mod.from_dict(checkpoint.load(run / "latest.h5").config)
    dataset, _, _ = train_mod.build_problem(cfg)
    return dataset.test_x[:24], dataset.test_y[:24]


def test_out_as_a_module_and_a_state_dict_that_certifies_alike(run, nets, tmp_path, capsys):
    net = analysis.load_network(run / "latest.h5")
    assert isinstance(net, torch.nn.Sequential) and not net.training
    ckpt = checkpoint.load(run / "latest.h5")
    assert torch.equal(torch.nn.utils.parameters_to_vector(net.parameters()), torch.from_numpy(ckpt.theta))
    pt = tmp_path / "net.pt"
    assert cli.main(["export", str(run / "latest.h5"), "--pt", str(pt)]) == 0
    saved = torch.load(pt, weights_only=True)
    assert saved.keys() == net.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in net.state_dict().items())
    assert cli.main(["export", str(run / "latest.h5")]) == 2  # nothing to write
    assert "needs --onnx FILE.onnx, --pt FILE.pt or both" in capsys.readouterr().err
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({"model": {"name": f"{nets}:cnn_small"}}))
    common = ["--json", "--num-test", "24", "--eps", "0.02", "--methods", "ibp,deeppoly"]
    capsys.readouterr()
    assert cli.main(["certify", str(run / "latest.h5"), *common, "--results", str(tmp_path / "a.json")]) == 0
    from_ckpt = json.loads(capsys.readouterr().out)
    sets = [a for s in tiny_overrides(**{"data.num_test": 24}) if not s.startswith("model.") for a in ("--set", s)]
    argv = ["certify", str(pt), "--config", str(tmp_path / "cfg.yaml"), *sets, *common]
    assert cli.main([*argv, "--results", str(tmp_path / "b.json")]) == 0
    from_pt = json.loads(capsys.readouterr().out)
    drop = ("time_s",)
    assert {k: v for k, v in from_pt.items() if k not in drop} == {k: v for k, v in from_ckpt.items() if k not in drop}


def test_a_changed_definition_and_an_unsupported_layer_are_refused(run, nets, capsys, monkeypatch):
    import importlib

    module = importlib.import_module(nets)
    monkeypatch.setattr(module, "WIDTH", 10)
    with pytest.raises(ValueError, match="different architecture.*Linear"):
        analysis.load_network(run)
    capsys.readouterr()
    assert cli.main(["certify", str(run), "--num-test", "4"]) == 2
    assert "different architecture" in capsys.readouterr().err
    argv = ["train", "--out", str(run.parent / "bad"), "--dry-run", *_sets(f"{nets}:pooled")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "layer 2 (AvgPool2d" in err and "is not supported" in err and "Traceback" not in err
