"""Networks in and out of mpigls: ONNX export, and ONNX / PyTorch state-dict import.

Export (``to_onnx``): the whole ``models.build`` network, input normalisation included, as a
float32 ONNX graph of opset ``OPSET`` (13) with only the operators complete verifiers read
(Sub, Div, Conv, Relu, Flatten, Gemm): the same float32 operations as mpigls's forward pass. The
normalisation (x - mean) / std is ``Sub`` then ``Div`` by per-channel constants (C, 1, 1); for
datasets without one (mean 0, std 1: digits, MNIST) it is left out, which keeps the graph
readable by Marabou (whose ONNX reader has neither Div nor per-channel Sub). Input ``input`` of
shape (batch, C, H, W) pixels in [0, 1], output ``output`` (batch, K) logits; the batch dimension
is symbolic (``batch``) unless a fixed one is asked for (``batch=1`` for tools that need it).

Import (``load_foreign``): the parameters of a network trained elsewhere as one flat theta for an
architecture of ``models.ARCHITECTURES``. Accepted:

* ``.onnx``: Conv, Gemm (either transB), MatMul (+ Add of a constant bias), Relu, Flatten /
  Reshape, Identity, Constant, and an optional input normalisation Sub / Div / Mul by constants,
  which must equal the dataset's (``Normalize`` is part of the mpigls network, not of theta).
* ``.pt`` / ``.pth``: a PyTorch state dict (``torch.save(model.state_dict(), path)``, or a dict
  holding one under ``state_dict`` / ``model_state_dict`` / ``model``) whose weight and bias
  tensors, in order, are those of the architecture; mpigls's own ``Normalize`` buffers
  (``*.mean`` / ``*.std``) are ignored.

The affine layers are matched in order against the architecture of ``model.name``; the first layer
whose shape differs is named in the error, with both shapes.

Shapes: C/H/W image, K classes, D parameters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mpigls.interop.extras import require
from mpigls.nn import models

__all__ = ["OPSET", "IMPORT_SUFFIXES", "to_onnx", "save_onnx", "onnx_forward", "load_foreign", "foreign_kind"]

OPSET = 13
ONNX_SUFFIXES = (".onnx",)
TORCH_SUFFIXES = (".pt", ".pth")
IMPORT_SUFFIXES = ONNX_SUFFIXES + TORCH_SUFFIXES


# ----------------------------------------------------------------------------- export


def to_onnx(model: nn.Sequential, in_shape: Sequence[int], *, batch: int | None = None):
    """The network as an ``onnx.ModelProto`` (float32, opset OPSET); ``batch`` None: symbolic batch."""
    onnx = require("onnx", "onnx", "ONNX export")
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    current, shape = "input", tuple(int(s) for s in in_shape)

    def const(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name))
        return name

    def node(op: str, inputs: list[str], i: int, **attrs) -> None:
        nonlocal current
        out = f"{op.lower()}_{i}"
        nodes.append(helper.make_node(op, inputs, [out], name=f"{op}_{i}", **attrs))
        current = out

    modules = list(model)
    for i, m in enumerate(modules):
        if isinstance(m, models.Normalize):
            mean, std = m.mean.detach().cpu().numpy(), m.std.detach().cpu().numpy()
            if (mean != 0).any() or (std != 1).any():  # the identity is left out (module docstring)
                node("Sub", [current, const(f"mean_{i}", mean)], i)
                node("Div", [current, const(f"std_{i}", std)], i)
        elif isinstance(m, nn.Conv2d):
            weight, bias = models.affine_parameters(m)
            ins = [current, const(f"weight_{i}", weight.detach().cpu().numpy())]
            ins.append(const(f"bias_{i}", bias.detach().cpu().numpy()))
            node(
                "Conv",
                ins,
                i,
                kernel_shape=list(m.kernel_size),
                strides=list(m.stride),
                pads=[*m.padding, *m.padding],
                dilations=list(m.dilation),
                group=m.groups,
            )
        elif isinstance(m, nn.ReLU):
            node("Relu", [current], i)
        elif isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                raise TypeError(f"only Flatten(1, -1) can be exported, got {m}")
            node("Flatten", [current], i, axis=1)
        elif isinstance(m, nn.Linear):
            weight, bias = models.affine_parameters(m)
            w_name = const(f"weight_{i}", weight.detach().cpu().numpy())
            node("Gemm", [current, w_name, const(f"bias_{i}", bias.detach().cpu().numpy())], i, transB=1)
        else:
            raise TypeError(
                f"cannot export layer {i} ({type(m).__name__}); mpigls networks hold Normalize, Conv2d, "
                "ReLU, Flatten and Linear only"
            )
    nodes[-1].output[0] = "output"
    with torch.no_grad():
        num_classes = int(model.cpu()(torch.zeros(1, *shape)).shape[-1])
    dim0: int | str = "batch" if batch is None else int(batch)
    graph = helper.make_graph(
        nodes,
        "mpigls",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [dim0, *shape])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [dim0, num_classes])],
        initializer=inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="mpigls")
    proto.ir_version = 8  # readable by every onnxruntime of opset 13 and later
    onnx.checker.check_model(proto, full_check=True)
    return proto


def save_onnx(model: nn.Sequential, in_shape: Sequence[int], path: str | Path, *, batch: int | None = None) -> Path:
    """Write ``to_onnx`` to ``path`` (through a temporary file: never a partial .onnx)."""
    onnx = require("onnx", "onnx", "ONNX export")
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        onnx.save(to_onnx(model, in_shape, batch=batch), str(tmp))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def onnx_forward(path: str | Path, x: np.ndarray) -> np.ndarray:
    """Logits of an ONNX file on float32 inputs (N, C, H, W), by onnxruntime on the CPU."""
    ort = require("onnxruntime", "onnx", "running an ONNX network")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    x = np.ascontiguousarray(x, dtype=np.float32)
    if spec.shape[0] == 1:  # a fixed batch of one (the VNN-COMP convention): one sample per run
        return np.concatenate([session.run(None, {spec.name: x[i : i + 1]})[0] for i in range(len(x))])
    return session.run(None, {spec.name: x})[0]


# ----------------------------------------------------------------------------- import


def foreign_kind(path: str | Path) -> str | None:
    """ "onnx", "torch" or None (an mpigls checkpoint) from a file's suffix."""
    suffix = Path(path).suffix.lower()
    return "onnx" if suffix in ONNX_SUFFIXES else "torch" if suffix in TORCH_SUFFIXES else None


def _expected(arch: Mapping[str, Any]) -> tuple[nn.Sequential, list[tuple[str, tuple, tuple]]]:
    model = models.build(arch["name"], arch["in_shape"], arch["num_classes"], arch["mean"], arch["std"])
    layers = []
    for m in model:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w, b = models.affine_parameters(m)
            layers.append((type(m).__name__, tuple(w.shape), tuple(b.shape)))
    return model, layers


def _describe(arch: Mapping[str, Any]) -> str:
    return f"model.name={arch['name']!r} for inputs {tuple(arch['in_shape'])} and {arch['num_classes']} classes"


def _match(path, arch: Mapping[str, Any], found: list[tuple[str, np.ndarray, np.ndarray]]) -> np.ndarray:
    """Flat float32 theta from the file's affine layers (label, weight, bias), checked in order."""
    _, want = _expected(arch)
    for j, ((kind, w_shape, b_shape), (label, w, b)) in enumerate(zip(want, found)):
        if tuple(w.shape) != w_shape or tuple(b.shape) != b_shape:
            raise ValueError(
                f"{path} does not fit {_describe(arch)}: its affine layer {j} ({label}) has weight "
                f"{tuple(w.shape)} and bias {tuple(b.shape)}, but layer {j} of {arch['name']} is a {kind} with "
                f"weight {w_shape} and bias {b_shape}; set model.name (and data.*) to the network's architecture"
            )
    if len(found) != len(want):
        labels = ", ".join(label for label, _, _ in found[len(want) :]) or "none"
        raise ValueError(
            f"{path} does not fit {_describe(arch)}: it has {len(found)} affine layers, {arch['name']} has "
            f"{len(want)} (the first {min(len(found), len(want))} match; extra in the file: {labels}); "
            "set model.name to the network's architecture"
        )
    parts = [np.concatenate([w.reshape(-1), b.reshape(-1)]) for _, w, b in found]
    theta = np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
    if not np.isfinite(theta).all():
        raise ValueError(f"{path} holds non-finite parameters (NaN/inf); it cannot be a starting point")
    return theta


def load_foreign(path: str | Path, arch: Mapping[str, Any]) -> np.ndarray:
    """Flat float32 theta (D,) of an ONNX file or PyTorch state dict for architecture ``arch``
    (``models.architecture_dict``); ValueError naming the first layer that does not fit."""
    kind = foreign_kind(path)
    if kind == "onnx":
        return _match(path, arch, _onnx_layers(path, arch))
    if kind == "torch":
        return _match(path, arch, _torch_layers(path))
    raise ValueError(f"{path}: not an ONNX ({ONNX_SUFFIXES}) or PyTorch ({TORCH_SUFFIXES}) file")


def _torch_layers(path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise ValueError(
            f"could not read {path} as a PyTorch state dict ({type(exc).__name__}: {str(exc)[:300]}); "
            "save one with torch.save(model.state_dict(), path)"
        ) from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"{path} holds a {type(obj).__name__}, not a state dict of tensors; save one with "
            "torch.save(model.state_dict(), path)"
        )
    layers: list[tuple[str, np.ndarray, np.ndarray]] = []
    pending: tuple[str, np.ndarray] | None = None
    norm = [k for k in obj if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")]
    if norm:
        raise ValueError(
            f"{path} has batch normalisation ({norm[0]}); mpigls architectures have none: fold it into the "
            "preceding layer before importing"
        )
    for name, tensor in obj.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("mean", "std") and tensor.dim() == 3:  # mpigls's Normalize buffers
            continue
        array = tensor.detach().to(torch.float32).numpy()
        if tensor.dim() in (2, 4) and pending is None:
            pending = (name, array)
        elif tensor.dim() == 1 and pending is not None:
            layers.append((pending[0], pending[1], array))
            pending = None
        else:
            raise ValueError(
                f"{path}: tensor {name} of shape {tuple(tensor.shape)} is not a weight followed by its bias; "
                "mpigls imports Conv2d / Linear layers with biases, in order"
            )
    if pending is not None:
        raise ValueError(f"{path}: weight {pending[0]} has no bias after it; mpigls layers need biases")
    return layers


def _onnx_layers(path, arch: Mapping[str, Any]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    onnx = require("onnx", "onnx", "model.init_from with an ONNX file")
    from onnx import numpy_helper

    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - protobuf's decode errors have no common base
        raise ValueError(f"could not read {path} as ONNX ({type(exc).__name__}: {str(exc)[:300]})") from None
    graph = proto.graph
    consts = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = numpy_helper.to_array(a.t).astype(np.float64)

    def const(name: str, n) -> np.ndarray:
        if name not in consts:
            raise ValueError(
                f"{path}: input {name!r} of node {n.name or n.op_type} ({n.op_type}) is not a constant; mpigls imports "
                "networks whose weights are initializers or Constant nodes"
            )
        return consts[name]

    def const_input(n) -> np.ndarray:
        found = [consts[i] for i in n.input if i in consts]
        if len(found) != 1:
            raise ValueError(f"{path}: node {n.name or n.op_type} ({n.op_type}) needs exactly one constant input")
        return found[0]

    channels = int(arch["in_shape"][0])
    mean, scale = np.zeros(channels), np.ones(channels)
    layers: list[tuple[str, np.ndarray, np.ndarray]] = []
    open_matmul: tuple[str, np.ndarray] | None = None  # a MatMul waiting for its bias Add
    for n in graph.node:
        op, label = n.op_type, f"{n.op_type} node {n.name or n.output[0]!r}"
        if op in ("Constant", "Identity", "Relu", "Flatten", "Reshape", "Dropout"):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if op in ("Sub", "Div", "Mul", "Add") and not layers and open_matmul is None:
            c = (
                np.broadcast_to(const_input(n).reshape(-1), (channels,))
                if const_input(n).size in (1, channels)
                else None
            )
            if c is None:
                raise ValueError(f"{path}: {label} before the first layer is not a per-channel normalisation")
            if op == "Sub":
                mean = mean + c * scale
            elif op == "Add":
                mean = mean - c * scale
            elif op == "Div":
                scale = scale * c
            else:
                scale = scale / c
            continue
        if op == "Conv":
            w = const(n.input[1], n)
            b = const(n.input[2], n) if len(n.input) > 2 and n.input[2] else np.zeros(w.shape[0])
            layers.append((label, w, b))
        elif op == "Gemm":
            if attrs.get("transA", 0) or len(n.input) < 3:
                raise ValueError(f"{path}: {label} must be x @ W^T + b (transA=0, with a bias)")
            w = const(n.input[1], n) * float(attrs.get("alpha", 1.0))
            w = w if attrs.get("transB", 0) else w.T
            b = np.broadcast_to(const(n.input[2], n) * float(attrs.get("beta", 1.0)), (w.shape[0],))
            layers.append((label, w, np.array(b)))
        elif op == "MatMul":
            open_matmul = (label, const_input(n).T)
            continue
        elif op == "Add" and open_matmul is not None:
            layers.append((open_matmul[0], open_matmul[1], const_input(n).reshape(-1)))
        else:
            raise ValueError(
                f"{path}: unsupported ONNX operator {op} ({label}); mpigls imports Conv, Gemm, MatMul+Add, Relu, "
                "Flatten/Reshape and an input normalisation (Sub, Div, Mul) only"
            )
        open_matmul = None
    if open_matmul is not None:
        layers.append((open_matmul[0], open_matmul[1], np.zeros(open_matmul[1].shape[0])))
    want_mean = np.asarray(arch["mean"] if arch["mean"] is not None else [0.0] * channels, dtype=np.float64)
    want_std = np.asarray(arch["std"] if arch["std"] is not None else [1.0] * channels, dtype=np.float64)
    if not (np.allclose(mean, want_mean, rtol=1e-5, atol=1e-6) and np.allclose(scale, want_std, rtol=1e-5, atol=1e-6)):
        raise ValueError(
            f"{path} normalises its input with mean {mean.round(6).tolist()} and std {scale.round(6).tolist()}, but "
            f"mpigls's {arch['name']} for this dataset uses mean {want_mean.tolist()} and std {want_std.tolist()} "
            "(its first layer); export the network with the dataset's normalisation, or without one for "
            "datasets that have none"
        )
    return layers
