"""ONNX export equals mpigls's forward pass; VNN-LIB properties hold the right box and label and
contain the complete verifier's counterexamples; ONNX / state-dict import and its shape checks."""

import numpy as np
import pytest
import torch

from mpigls import cli, config
from mpigls.evaluation import verify
from mpigls.interop import extras, onnx_io, vnnlib
from mpigls.nn import models
from mpigls.run import checkpoint, train

from conftest import tiny_overrides

onnx = pytest.importorskip("onnx", reason="needs the onnx extra: pip install mpigls[onnx]")
ort = pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install mpigls[onnx]")


def _net(name, shape, classes=10, mean=None, std=None, seed=0):
    with models.private_rng(seed):
        return models.build(name, shape, classes, mean, std).eval()


ARCHS = [
    ("cnn3", (1, 8, 8), None, None),
    ("mlp-tiny", (1, 8, 8), None, None),
    ("cnn3", (3, 12, 12), (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)),  # per-channel normalisation in the graph
]


@pytest.mark.parametrize("name,shape,mean,std", ARCHS)
@pytest.mark.parametrize("batch", [None, 1])
def test_onnxruntime_equals_mpigls_forward(tmp_path, name, shape, mean, std, batch):
    net = _net(name, shape, mean=mean, std=std)
    path = onnx_io.save_onnx(net, shape, tmp_path / "net.onnx", batch=batch)
    x = torch.from_numpy(np.random.default_rng(0).uniform(0, 1, (16, *shape)).astype(np.float32))
    with torch.no_grad():
        ours = net(x).numpy()
    theirs = onnx_io.onnx_forward(path, x.numpy())
    assert theirs.dtype == np.float32 and theirs.shape == ours.shape
    # float32 rounding only (another summation order in the convolutions / matmuls)
    np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-5 * float(np.abs(ours).max()))
    proto = onnx.load(str(path))
    assert [o.version for o in proto.opset_import] == [onnx_io.OPSET]
    ops = {n.op_type for n in proto.graph.node}
    assert ops <= {"Sub", "Div", "Conv", "Relu", "Flatten", "Gemm"}
    assert ("Div" in ops) == (mean is not None)  # the identity normalisation is left out


@pytest.mark.parametrize("name,shape,mean,std", ARCHS)
def test_onnx_and_state_dict_import_round_trip_bitwise(tmp_path, name, shape, mean, std):
    net = _net(name, shape, mean=mean, std=std, seed=3)
    arch = models.architecture_dict(name, shape, 10, mean, std)
    onnx_io.save_onnx(net, shape, tmp_path / "net.onnx")
    torch.save(net.state_dict(), tmp_path / "net.pt")
    torch.save({"model_state_dict": net.state_dict(), "epoch": 3}, tmp_path / "wrapped.pth")
    want = models.flat_params(net).numpy()
    for f in ("net.onnx", "net.pt", "wrapped.pth"):
        got = onnx_io.load_foreign(tmp_path / f, arch)
        assert got.dtype == np.float32 and np.array_equal(got, want), f


def test_import_reads_matmul_add_and_gemm_without_transb(tmp_path):
    """Graphs written by other exporters: Linear as MatMul + Add, or Gemm with an untransposed weight."""
    from onnx import TensorProto, helper, numpy_helper

    net = _net("mlp-tiny", (1, 4, 4), classes=3, seed=1)
    arch = models.architecture_dict("mlp-tiny", (1, 4, 4), 3, None, None)
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    nodes, inits, cur = [helper.make_node("Flatten", ["x"], ["f"], axis=1)], [], "f"
    for i, lin in enumerate(linears):
        w, b = lin.weight.detach().numpy().T.copy(), lin.bias.detach().numpy()
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        if i % 2 == 0:
            nodes += [
                helper.make_node("MatMul", [cur, f"w{i}"], [f"m{i}"]),
                helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
            ]
        else:
            nodes.append(helper.make_node("Gemm", [cur, f"w{i}", f"b{i}"], [f"a{i}"]))
        cur = f"a{i}"
        if i < len(linears) - 1:
            nodes.append(helper.make_node("Relu", [cur], [f"r{i}"]))
            cur = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info(cur, TensorProto.FLOAT, [1, 3])],
        initializer=inits,
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "other.onnx"))
    assert np.array_equal(onnx_io.load_foreign(tmp_path / "other.onnx", arch), models.flat_params(net).numpy())


def test_import_names_the_first_mismatching_layer(tmp_path):
    torch.save(_net("mlp-tiny", (1, 8, 8)).state_dict(), tmp_path / "mlp.pt")
    arch = models.architecture_dict("cnn3", (1, 8, 8), 10, None, None)
    with pytest.raises(
        ValueError, match=r"affine layer 0 \(2\.weight\) has weight \(16, 64\).*Conv2d with weight \(8, 1, 5, 5\)"
    ):
        onnx_io.load_foreign(tmp_path / "mlp.pt", arch)
    onnx_io.save_onnx(_net("cnn3", (1, 8, 8), classes=3), (1, 8, 8), tmp_path / "k3.onnx")
    with pytest.raises(
        ValueError, match=r"affine layer 2 \(Gemm node 'Gemm_6'\) has weight \(3, 32\).*Linear with weight \(10, 32\)"
    ):
        onnx_io.load_foreign(tmp_path / "k3.onnx", arch)
    # a network normalised for another dataset
    onnx_io.save_onnx(_net("cnn3", (1, 8, 8), mean=[0.5], std=[0.25]), (1, 8, 8), tmp_path / "norm.onnx")
    with pytest.raises(ValueError, match=r"mean \[0\.5\] and std \[0\.25\]"):
        onnx_io.load_foreign(tmp_path / "norm.onnx", arch)
    bn = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.BatchNorm1d(16))
    torch.save(bn.state_dict(), tmp_path / "bn.pt")
    with pytest.raises(ValueError, match="batch normalisation"):
        onnx_io.load_foreign(tmp_path / "bn.pt", arch)


@pytest.mark.slow
def test_warm_start_from_onnx_and_state_dict(tmp_path):
    """model.init_from=net.onnx / net.pt starts training at the imported weights (generation 0 ==
    the file's theta); a file of another architecture stops the run with the layer named."""
    cfg = config.load_config(None, tiny_overrides())
    _, _, arch = train.build_problem(cfg)
    other = _net("cnn3", tuple(arch["in_shape"]), seed=7)
    onnx_io.save_onnx(other, arch["in_shape"], tmp_path / "w.onnx")
    torch.save(other.state_dict(), tmp_path / "w.pt")
    for f in ("w.onnx", "w.pt"):
        res = train.train(
            config.load_config(None, tiny_overrides(**{"model.init_from": str(tmp_path / f)})),
            tmp_path / f"run-{f}",
            max_generations=0,
            log=lambda m: None,
        )
        assert torch.equal(res.theta, models.flat_params(other)), f
    bad = config.load_config(
        None, tiny_overrides(**{"model.init_from": str(tmp_path / "w.pt"), "model.name": "mlp-tiny"})
    )
    with pytest.raises(ValueError, match="affine layer 0"):
        train.train(bad, tmp_path / "bad", max_generations=1, log=lambda m: None)


# ----------------------------------------------------------------------------- VNN-LIB


def test_property_round_trip_box_and_label():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (1, 4, 4)).astype(np.float32)
    x[0, 0, :2] = [0.0, 1.0]  # clipped at both ends of the data range
    text = vnnlib.render(x, 2, 5, 0.1, ["a comment"])
    prop = vnnlib.parse(text)
    flat = x.astype(np.float64).reshape(-1)
    assert prop.label == 2 and prop.num_classes == 5
    assert np.array_equal(prop.lower, np.maximum(flat - 0.1, 0.0))  # 17 digits read back exactly
    assert np.array_equal(prop.upper, np.minimum(flat + 0.1, 1.0))
    assert prop.lower[0] == 0.0 and prop.upper[1] == 1.0
    lo, hi = verify._box(torch.from_numpy(x), 0.1)  # the complete verifier's own box
    assert np.array_equal(prop.lower, lo.numpy()) and np.array_equal(prop.upper, hi.numpy())


@pytest.mark.parametrize(
    "edit",
    [
        lambda t: t.replace("(assert (>= X_3 ", "(assert (>= X_99 ", 1),  # undeclared input
        lambda t: "\n".join(ln for ln in t.splitlines() if not ln.startswith("(assert (<= X_0 ")),  # missing bound
        lambda t: t.replace("(and (>= Y_0 Y_2))", "(and (>= Y_0 Y_1))"),  # two labels
        lambda t: t.replace("    (and (>= Y_4 Y_2))\n", ""),  # a class left out
        lambda t: t.replace("))\n", ")\n", 1) if t.endswith("))\n") else t + "junk",
        lambda t: t.replace("(declare-const X_1 Real)", "(declare-const X_1 Int)"),
    ],
)
def test_strict_parser_rejects_malformed_properties(edit):
    text = vnnlib.render(np.full((1, 2, 2), 0.5, np.float32), 2, 5, 0.1)
    bad = edit(text)
    assert bad != text
    with pytest.raises(ValueError):
        vnnlib.parse(bad)


def test_falsified_counterexample_lies_in_the_property_box_and_violates_it(tmp_path):
    """A sample the complete verifier falsifies: its counterexample is inside the exported
    property's box, and both the float64 network and the ONNX file score another class higher."""
    net = _net("mlp-tiny", (1, 8, 8), seed=2)
    x_all = torch.from_numpy(np.random.default_rng(4).uniform(0, 1, (20, 1, 8, 8)).astype(np.float32))
    with torch.no_grad():
        y_all = net(x_all).argmax(-1)
    eps = 0.2
    for i in range(len(y_all)):
        res = verify.verify(net, x_all[i], int(y_all[i]), eps, time_limit=None, max_domains=200, seed=0, index=i)
        if res.status == "falsified" and res.reason != "clean":
            break
    else:
        pytest.fail("no falsified sample at eps 0.2 on a random network")
    onnx_path = onnx_io.save_onnx(net, (1, 8, 8), tmp_path / "net.onnx", batch=1)
    (path,) = vnnlib.write_properties(
        tmp_path / "props", onnx_path, x_all[i : i + 1].numpy(), y_all[i : i + 1].numpy(), 10, eps, indices=[i]
    )
    prop = vnnlib.parse(path.read_text())
    cex = res.counterexample.reshape(-1)
    assert prop.label == int(y_all[i])
    assert (prop.lower <= cex).all() and (cex <= prop.upper).all()
    with torch.no_grad():
        z = net.double()(torch.from_numpy(cex).reshape(1, 1, 8, 8))[0].numpy()
    others = [k for k in range(10) if k != prop.label]
    assert z[others].max() >= z[prop.label]  # the VNN-LIB disjunction holds: a model of the property
    zf = onnx_io.onnx_forward(onnx_path, cex.astype(np.float32).reshape(1, 1, 8, 8))[0]
    if z[others].max() - z[prop.label] > 1e-4:  # not a float32 tie
        assert zf[others].max() >= zf[prop.label]


def test_instances_csv_names_the_onnx_and_every_property(tmp_path):
    paths = vnnlib.write_properties(
        tmp_path / "bench" / "vnnlib",
        tmp_path / "bench" / "net.onnx",
        np.zeros((3, 1, 2, 2), np.float32),
        np.array([0, 1, 2]),
        3,
        0.01,
        timeout=30,
        indices=[5, 17, 123],
    )
    rows = (tmp_path / "bench" / "vnnlib" / "instances.csv").read_text().splitlines()
    assert rows == [f"../net.onnx,{p.name},30" for p in paths]
    assert [p.name for p in paths] == ["prop_005.vnnlib", "prop_017.vnnlib", "prop_123.vnnlib"]


def test_export_command(tmp_path, capsys):
    """`mpigls export CKPT --onnx --vnnlib`: ONNX equal to mpigls on the test set, one parsable
    property per test sample with its label and box."""
    cfg = config.load_config(None, tiny_overrides())
    train.train(cfg, tmp_path / "run", max_generations=2, log=lambda m: None)
    ckpt_path = tmp_path / "run" / "latest.h5"
    argv = ["export", str(ckpt_path), "--onnx", str(tmp_path / "n.onnx"), "--vnnlib", str(tmp_path / "p")]
    assert cli.main([*argv, "--num-test", "4", "--eps", "0.03"]) == 0
    out = capsys.readouterr().out
    assert "wrote 4 VNN-LIB properties" in out and "max |logit difference|" in out
    dataset, model, _ = train.build_problem(cfg)
    models.load_flat_(model, torch.from_numpy(checkpoint.load(ckpt_path).theta))
    with torch.no_grad():
        ours = model(dataset.test_x[:4]).numpy()
    np.testing.assert_allclose(onnx_io.onnx_forward(tmp_path / "n.onnx", dataset.test_x[:4].numpy()), ours, atol=1e-5)
    for i in range(4):
        prop = vnnlib.parse((tmp_path / "p" / f"prop_{i}.vnnlib").read_text())
        lo, hi = vnnlib.box(dataset.test_x[i].numpy(), 0.03)
        assert (
            prop.label == int(dataset.test_y[i]) and np.array_equal(prop.lower, lo) and np.array_equal(prop.upper, hi)
        )
    assert cli.main(["export", str(ckpt_path), "--onnx", str(tmp_path / "no" / "n.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("module,extra", [("onnx", "onnx"), ("onnxruntime", "onnx")])
def test_missing_extra_names_it(monkeypatch, tmp_path, module, extra):
    import sys

    net = _net("mlp-tiny", (1, 8, 8))
    path = onnx_io.save_onnx(net, (1, 8, 8), tmp_path / "n.onnx")
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing it raises ImportError
    with pytest.raises(extras.MissingExtraError, match=rf"pip install 'mpigls\[{extra}\]'") as info:
        if module == "onnx":
            onnx_io.to_onnx(net, (1, 8, 8))
        else:
            onnx_io.onnx_forward(path, np.zeros((1, 1, 8, 8), np.float32))
    assert isinstance(info.value, ValueError)  # the CLI reports it as a user error (exit 2)


def test_certify_an_imported_network_equals_certifying_its_checkpoint(tmp_path, capsys):
    """`mpigls certify net.onnx --config C` (and a .pt) gives the checkpoint's own per-sample results."""
    import json

    import yaml

    cfg = config.load_config(None, tiny_overrides())
    train.train(cfg, tmp_path / "run", max_generations=3, log=lambda m: None)
    ckpt = checkpoint.load(tmp_path / "run" / "latest.h5")
    _, model, _ = train.build_problem(cfg)
    models.load_flat_(model, torch.from_numpy(ckpt.theta))
    onnx_io.save_onnx(model, (1, 8, 8), tmp_path / "net.onnx")
    torch.save(model.state_dict(), tmp_path / "net.pt")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config.to_dict(cfg)))
    common = ["--num-test", "16", "--methods", "ibp,deeppoly", "--json"]
    results = {}
    for name, extra in (
        ("latest.h5", []),
        ("net.onnx", ["--config", str(tmp_path / "cfg.yaml")]),
        ("net.pt", ["--config", str(tmp_path / "cfg.yaml")]),
    ):
        path = tmp_path / ("run" if name == "latest.h5" else "") / name
        out = tmp_path / f"{name}.json"
        assert cli.main(["certify", str(path), *common, "--results", str(out), *extra]) == 0
        capsys.readouterr()
        results[name] = json.loads(out.read_text())
    assert (
        results["net.onnx"]["theta_sha256"] == results["latest.h5"]["theta_sha256"] == results["net.pt"]["theta_sha256"]
    )
    for name in ("net.onnx", "net.pt"):
        assert results[name]["samples"] == results["latest.h5"]["samples"]
    assert cli.main(["certify", str(tmp_path / "net.onnx"), *common]) == 2
    assert "pass --config CONFIG.yaml" in capsys.readouterr().err


def test_import_refuses_unsupported_operators_by_name(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.zeros((3, 16), np.float32), "w")
    b = numpy_helper.from_array(np.zeros(3, np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["x"], ["f"], axis=1),
            helper.make_node("Sigmoid", ["f"], ["s"], name="act"),
            helper.make_node("Gemm", ["s", "w", "b"], ["y"], transB=1),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        initializer=[w, b],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "sig.onnx"))
    arch = models.architecture_dict("mlp-tiny", (1, 4, 4), 3, None, None)
    with pytest.raises(ValueError, match=r"unsupported ONNX operator Sigmoid \(Sigmoid node 'act'\)"):
        onnx_io.load_foreign(tmp_path / "sig.onnx", arch)
