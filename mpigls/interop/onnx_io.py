"""Networks in and out of mpigls: ONNX export, and ONNX / PyTorch state-dict import.

Export (``to_onnx``): the whole ``models.build`` network, input normalisation included, as a
float32 ONNX graph of opset ``OPSET`` (13) with only the operators complete verifiers read
(Sub, Div, Conv, Relu, Flatten, Gemm): the same float32 operations as mpigls's forward pass. The
normalisation (x - mean) / std is ``Sub`` then ``Div`` by per-channel constants (C, 1, 1); for
datasets without one (mean 0, std 1: digits, MNIST) it is left out, which keeps the graph
readable by Marabou (whose ONNX reader has neither Div nor per-channel Sub). Input ``input`` of
shape (batch, C, H, W) pixels in [0, 1], output ``output`` (batch, K) logits; the batch dimension
is symbolic (``batch``) unless a fixed one is asked for (``batch=1`` for tools that need it).

Import (``load_foreign``, ``foreign_kind``, ``IMPORT_SUFFIXES``): re-exported from
``mpigls.interop.onnx_import``, which imports an ONNX file or a PyTorch state dict only when it is
provably the configured architecture (every node, attribute and initializer mapped, then checked
against onnxruntime) and names what differs otherwise.

Shapes: C/H/W image, K classes, D parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mpigls.interop.extras import require
from mpigls.interop.onnx_import import IMPORT_SUFFIXES, foreign_kind, load_foreign
from mpigls.nn import models

__all__ = ["OPSET", "IMPORT_SUFFIXES", "to_onnx", "save_onnx", "onnx_forward", "load_foreign", "foreign_kind"]

OPSET = 13


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
