"""Hostile files, class "foreign or edited": every file mpigls reads that another tool wrote, or
that was edited after mpigls wrote it, is used exactly as given or refused (exit 2, one paragraph
naming what differs). Inputs tried: ONNX files, PyTorch state dicts, checkpoints.

An edited ONNX graph must be caught even when every tensor keeps its shape (strides, pads, a
deleted activation): the import maps every node and attribute, then compares onnxruntime's
logits with mpigls's on random inputs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mpigls import config
from mpigls.interop import onnx_import, onnx_io
from mpigls.nn import models
from mpigls.run import checkpoint, train

from conftest import REPO, one_paragraph, run_cli, tiny_overrides

onnx = pytest.importorskip("onnx", reason="needs the onnx extra: pip install mpigls[onnx]")
pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install mpigls[onnx]")
from onnx import helper, numpy_helper  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A digits CNN3 (the tiny test config), its ONNX export, its state dict and its config file."""
    d = tmp_path_factory.mktemp("foreign")
    cfg = config.load_config(None, tiny_overrides())
    dataset, model, arch = train.build_problem(cfg)
    with models.private_rng(5):
        model = models.build(arch["name"], arch["in_shape"], arch["num_classes"], arch["mean"], arch["std"]).eval()
    onnx_io.save_onnx(model, dataset.in_shape, d / "net.onnx")
    torch.save(model.state_dict(), d / "net.pt")
    (d / "cfg.yaml").write_text(yaml.safe_dump(config.to_dict(cfg)))
    return {"dir": d, "cfg": cfg, "arch": arch, "model": model, "x": dataset.test_x[:32].numpy()}


def _edited(digits, name: str, edit) -> Path:
    proto = onnx.load(str(digits["dir"] / "net.onnx"))
    edit(proto.graph)
    path = digits["dir"] / name
    onnx.save(proto, str(path))
    return path


def _conv1_stride1_pad0(graph) -> None:
    conv = next(n for n in graph.node if n.op_type == "Conv")
    for a in conv.attribute:
        if a.name == "strides":
            a.ints[:] = [1, 1]
        if a.name == "pads":
            a.ints[:] = [0, 0, 0, 0]


def _without_relus(graph) -> None:
    for relu in [n for n in graph.node if n.op_type == "Relu"]:
        for n in graph.node:
            n.input[:] = [relu.input[0] if i == relu.output[0] else i for i in n.input]
        graph.node.remove(relu)


def _gemm_alpha(graph) -> None:
    gemm = next(n for n in graph.node if n.op_type == "Gemm")
    gemm.attribute.append(helper.make_attribute("alpha", 2.0))


def _natural_accuracy_changes(digits, path: Path) -> None:
    """The edit changes the function (what onnxruntime computes), though every tensor keeps its shape."""
    base = onnx_io.onnx_forward(digits["dir"] / "net.onnx", digits["x"])
    edited = onnx_io.onnx_forward(path, digits["x"])
    assert base.shape == edited.shape
    assert np.abs(base - edited).max() > 1e-2 * max(1.0, np.abs(base).max())


@pytest.mark.parametrize(
    "name,edit,needle",
    [
        ("strides.onnx", _conv1_stride1_pad0, "strides [1, 1] (the layer's: [2, 2])"),
        ("norelu.onnx", _without_relus, "maps to a Conv2d where layer 2 of cnn3 is a ReLU"),
    ],
)
def test_an_edited_onnx_graph_with_the_same_shapes_is_refused(digits, capsys, name, edit, needle):
    path = _edited(digits, name, edit)
    _natural_accuracy_changes(digits, path)
    with pytest.raises(onnx_import.ForeignNetworkError, match="does not fit model.name='cnn3'") as info:
        onnx_io.load_foreign(path, digits["arch"])
    assert needle in str(info.value)
    code, out, err = run_cli(capsys, "certify", path, "--config", digits["dir"] / "cfg.yaml", "--num-test", 4)
    assert code == 2 and "certified" not in out
    one_paragraph(err, name, needle)
    bad = config.load_config(None, tiny_overrides(**{"model.init_from": str(path)}))
    _, _, arch = train.build_problem(bad)
    with pytest.raises(ValueError, match="does not fit"):
        from mpigls.run import preflight

        preflight.check_init_from(bad, arch)


def test_the_forward_check_alone_catches_an_edit(digits, monkeypatch):
    """Without the structural proof, onnxruntime vs mpigls on random inputs still refuses the file."""
    path = _edited(digits, "strides2.onnx", _conv1_stride1_pad0)
    monkeypatch.setattr(onnx_import, "_check_structure", lambda *a: None)
    with pytest.raises(onnx_import.ForeignNetworkError, match="onnxruntime's logits on 8 random inputs differ"):
        onnx_io.load_foreign(path, digits["arch"])


def test_an_unedited_export_and_an_equivalent_alpha_import_exactly(digits):
    want = models.flat_params(digits["model"]).numpy()
    assert np.array_equal(onnx_io.load_foreign(digits["dir"] / "net.onnx", digits["arch"]), want)
    # Gemm alpha=2 doubles the weight: the same function as a Linear with 2W (folded, then proven by onnxruntime)
    theta = onnx_io.load_foreign(_edited(digits, "alpha.onnx", _gemm_alpha), digits["arch"])
    w_last = digits["model"][-1].weight.detach().numpy().reshape(-1)
    n_last = w_last.size + digits["model"][-1].bias.numel()
    np.testing.assert_array_equal(theta[-n_last:][: w_last.size], 2 * w_last)
    np.testing.assert_array_equal(theta[:-n_last], want[:-n_last])


def _unused_initializer(graph) -> None:
    graph.initializer.append(numpy_helper.from_array(np.ones(3, np.float32), "spare"))


def _conv1_group_attr(graph) -> None:
    next(n for n in graph.node if n.op_type == "Conv").attribute.append(helper.make_attribute("foo", 1))


def _conv1_dilated(graph) -> None:
    conv = next(n for n in graph.node if n.op_type == "Conv")
    next(a for a in conv.attribute if a.name == "dilations").ints[:] = [2, 2]
    next(a for a in conv.attribute if a.name == "pads").ints[:] = [4, 4, 4, 4]


def _reversed_sub(graph) -> None:
    """c - x instead of x - c in front of the network (a Sub whose data is its second input)."""
    graph.initializer.append(numpy_helper.from_array(np.zeros((1, 1, 1), np.float32), "c"))
    first = graph.node[0]
    graph.node.insert(0, helper.make_node("Sub", ["c", "input"], ["shifted"], name="neg"))
    first.input[0] = "shifted"


def _side_branch(graph) -> None:
    """A second consumer of the first conv's output, off the chain (the Relu reads the conv, not it)."""
    conv = next(n for n in graph.node if n.op_type == "Conv")
    relu = next(n for n in graph.node if n.op_type == "Relu")
    graph.node.insert(
        list(graph.node).index(relu), helper.make_node("Identity", [conv.output[0]], ["side"], name="side")
    )


def _custom_domain(graph) -> None:
    next(n for n in graph.node if n.op_type == "Relu").domain = "com.example"


@pytest.mark.parametrize(
    "edit,needle",
    [
        (_unused_initializer, "initializer(s) ['spare'] that no mapped layer reads"),
        (_conv1_group_attr, "has the attribute(s) ['foo']"),
        (_conv1_dilated, "dilations [2, 2] (the layer's: [1, 1])"),
        (_reversed_sub, "is not (input Sub constant)"),
        (_side_branch, "does not read the previous node's output"),
        (_custom_domain, "operator domain 'com.example'"),
    ],
)
def test_onnx_nodes_attributes_and_initializers_that_do_not_map_are_named(digits, edit, needle):
    path = _edited(digits, "edit.onnx", edit)
    with pytest.raises(onnx_import.ForeignNetworkError) as info:
        onnx_io.load_foreign(path, digits["arch"])
    assert needle in str(info.value)


def test_a_trailing_layer_after_the_network_is_refused(digits):
    def extra_relu(graph):
        last = graph.node[-1]
        last.output[0] = "pre"
        graph.node.append(helper.make_node("Relu", ["pre"], ["output"], name="tail"))

    with pytest.raises(onnx_import.ForeignNetworkError, match="comes after the last layer of cnn3"):
        onnx_io.load_foreign(_edited(digits, "tail.onnx", extra_relu), digits["arch"])


def test_an_input_of_another_image_shape_is_refused(digits):
    def shape(graph):
        graph.input[0].type.tensor_type.shape.dim[2].dim_value = 9

    with pytest.raises(onnx_import.ForeignNetworkError, match=r"has shape \[None, 1, 9, 8\]"):
        onnx_io.load_foreign(_edited(digits, "shape.onnx", shape), digits["arch"])


# ----------------------------------------------------------------------------- PyTorch state dicts


def _state(digits) -> dict:
    return {k: v.clone() for k, v in digits["model"].state_dict().items()}


@pytest.mark.parametrize(
    "change,needle",
    [
        (lambda s: s.update({"1.weight": s["1.weight"].to(torch.int32)}), "has dtype torch.int32"),
        (lambda s: s.update({"extra.scale": torch.ones(3)}), "tensor extra.scale"),
        (lambda s: s.pop("0.mean"), "missing: ['0.mean']"),
        (lambda s: s.update({"0.mean": torch.full((1, 1, 1), 0.5)}), "its normalisation 0.mean is [0.5]"),
        (lambda s: s["3.bias"].__setitem__(0, float("nan")), "non-finite parameters"),
    ],
)
def test_state_dict_entries_that_are_not_the_architecture_are_refused(digits, tmp_path, change, needle):
    state = _state(digits)
    change(state)
    torch.save(state, tmp_path / "s.pt")
    with pytest.raises(onnx_import.ForeignNetworkError) as info:
        onnx_io.load_foreign(tmp_path / "s.pt", digits["arch"])
    assert needle in str(info.value)


def test_state_dict_weight_and_bias_of_different_layers_are_refused(digits, tmp_path):
    state = {f"conv{i}.{leaf}": v for i, (k, v) in enumerate(_state(digits).items()) for leaf in [k.split(".")[1]]}
    state = {k: v for k, v in state.items() if not k.endswith(("mean", "std"))}  # foreign names, one prefix per entry
    torch.save(state, tmp_path / "s.pt")
    with pytest.raises(onnx_import.ForeignNetworkError, match=r"after conv2\.weight is not a layer's weight followed"):
        onnx_io.load_foreign(tmp_path / "s.pt", digits["arch"])


def test_state_dict_refusal_says_what_it_assumes(digits, tmp_path):
    state = _state(digits)
    state["3.weight"] = torch.zeros(8, 8, 3, 3)
    torch.save(state, tmp_path / "s.pt")
    with pytest.raises(onnx_import.ForeignNetworkError, match="mpigls assumes the strides, paddings, ReLU activations"):
        onnx_io.load_foreign(tmp_path / "s.pt", digits["arch"])
    renamed = {k.replace("1.", "conv1.").replace("3.", "conv2."): v for k, v in _state(digits).items()}
    torch.save(renamed, tmp_path / "foreign.pt")  # foreign names in the right order: imported (structure assumed)
    assert np.array_equal(
        onnx_io.load_foreign(tmp_path / "foreign.pt", digits["arch"]), models.flat_params(digits["model"]).numpy()
    )


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def run2(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("run2") / "r"
    train.train(config.load_config(None, tiny_overrides()), d, max_generations=2, log=lambda m: None)
    return d


def test_a_format2_checkpoint_without_its_config_checksum_is_damaged_not_old(run2, tmp_path, capsys):
    """Delete config_sha256 and set eps to 0 in /config: refused, not certified at the edited eps."""
    path = tmp_path / "edited.h5"
    ck = checkpoint.load(run2 / checkpoint.LATEST)
    checkpoint.save(tmp_path, dataclasses.replace(ck), keep_last=None)
    (tmp_path / checkpoint.LATEST).rename(path)
    with checkpoint.h5py.File(path, "r+") as f:
        cfg = json.loads(f[checkpoint.DS_CONFIG][()])
        cfg["bound"]["eps"] = 0.0
        del f[checkpoint.DS_CONFIG]
        f[checkpoint.DS_CONFIG] = json.dumps(cfg)
        del f.attrs["config_sha256"]
    with pytest.raises(checkpoint.CheckpointError, match="format-2 checkpoint without its config checksum"):
        checkpoint.load(path)
    code, out, err = run_cli(capsys, "certify", path, "--num-test", 4)
    assert code == 2 and "certified" not in out
    one_paragraph(err, "without its config checksum", "edited or damaged")
    for name in ("format1_grad.h5", "format1_pgpe.h5", "format1_rgs.h5"):  # format 1: old, read without it
        assert checkpoint.load(REPO / "tests" / "golden" / name).format_version == 1


def test_a_torch_exported_graph_of_the_architecture_imports_exactly(digits, tmp_path):
    """Another tool's ONNX of the same network (torch.onnx's TorchScript exporter) is used as given."""
    import warnings

    body = torch.nn.Sequential(*list(digits["model"])[1:])  # mpigls's Normalize is the identity on digits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            body,
            torch.zeros(1, *digits["arch"]["in_shape"]),
            str(tmp_path / "t.onnx"),
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "n"}},
        )
    got = onnx_io.load_foreign(tmp_path / "t.onnx", digits["arch"])
    assert np.array_equal(got, models.flat_params(digits["model"]).numpy())
