"""Networks trained elsewhere, imported only when they are provably mpigls's architecture.

``load_foreign(path, arch)`` returns the flat float32 theta (D,) of an ONNX file or a PyTorch
state dict for the architecture ``arch`` (``models.architecture_dict``), or refuses the file
(``ForeignNetworkError``, a ValueError: one paragraph, exit code 2) naming what differs.

ONNX (``.onnx``): the graph must be one chain from its single input to its single output, and
every node on it must map onto the layers of ``models.build(arch)`` in order:

* an optional input normalisation (Sub / Div by constants with the data as first input, Mul / Add
  by constants), per channel, equal to the dataset's (``Normalize`` is part of the network);
* ``Conv2d`` <- Conv with constant weight (and bias), strides, pads, dilations, group and
  kernel_shape equal to the layer's (defaults as in the ONNX specification), auto_pad NOTSET;
* ``ReLU`` <- Relu; ``Flatten`` <- Flatten(axis=1) or a Reshape to (batch, features);
* ``Linear`` <- Gemm (transA=0, any transB, alpha and beta folded in) or MatMul (+ Add of a bias);
* Identity and Dropout (inference: the identity) anywhere; Constant nodes supply constants.

Any other operator, attribute, a node off the chain, a non-constant weight, an initializer no
mapped node reads, a missing or extra layer (a deleted Relu, say) is refused, naming the node.
Then the proof by execution: onnxruntime runs the file on ``CHECK_INPUTS`` random inputs in
[0, 1] and its logits must equal mpigls's forward pass of the imported theta within float32
rounding (relative ``CHECK_RTOL`` of the largest logit).

PyTorch (``.pt`` / ``.pth``): a state dict (``torch.save(model.state_dict(), path)``, or one held
under ``state_dict`` / ``model_state_dict`` / ``model``). Checked: every entry is a finite
floating-point tensor; the entries are ``<layer>.weight`` then ``<layer>.bias`` pairs of one
layer each, whose shapes are those of the architecture's affine layers in order; nothing else is
in it except mpigls's own ``Normalize`` buffers (``<layer>.mean`` / ``.std``), which must equal the
dataset's; when the keys are mpigls's own (``0.mean``, ``1.weight``, ...) they are exactly those
of ``models.build(arch).state_dict()``. A state dict holds tensors only, so what it cannot show is
*assumed*: the strides, paddings, dilations and groups of the convolutions, a ReLU after every
hidden layer, the layer order, and flattening in (C, H, W) order, all as in ``model.name``.
Export the network to ONNX to have those checked too.

Shapes: C/H/W image, K classes, D parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mpigls import files
from mpigls.interop.extras import require
from mpigls.nn import models

__all__ = [
    "ONNX_SUFFIXES",
    "TORCH_SUFFIXES",
    "IMPORT_SUFFIXES",
    "CHECK_INPUTS",
    "CHECK_RTOL",
    "ForeignNetworkError",
    "foreign_kind",
    "load_foreign",
]

ONNX_SUFFIXES = (".onnx",)
TORCH_SUFFIXES = (".pt", ".pth")
IMPORT_SUFFIXES = ONNX_SUFFIXES + TORCH_SUFFIXES
CHECK_INPUTS = 8  # random inputs on which onnxruntime and mpigls must agree
CHECK_RTOL = 1e-4  # of the largest |logit| (at least 1): float32 rounding, never a changed layer
_ASSUMED = (
    "a state dict holds tensors only, so mpigls assumes the strides, paddings, ReLU activations, layer "
    "order and (C, H, W) flattening of model.name; export the network to ONNX to have them checked"
)


class ForeignNetworkError(ValueError):
    """An ONNX file or state dict that is not provably the configured architecture (exit code 2)."""


def foreign_kind(path: str | Path) -> str | None:
    """ "onnx", "torch" or None (an mpigls checkpoint) from a file's suffix."""
    suffix = Path(path).suffix.lower()
    return "onnx" if suffix in ONNX_SUFFIXES else "torch" if suffix in TORCH_SUFFIXES else None


def _describe(arch: Mapping[str, Any]) -> str:
    return f"model.name={arch['name']!r} for inputs {tuple(arch['in_shape'])} and {arch['num_classes']} classes"


def _build(arch: Mapping[str, Any]) -> nn.Sequential:
    return models.build(arch["name"], arch["in_shape"], arch["num_classes"], arch["mean"], arch["std"])


def _per_channel(arch: Mapping[str, Any], key: str, default: float) -> np.ndarray:
    channels = int(arch["in_shape"][0])
    return np.asarray(arch[key] if arch[key] is not None else [default] * channels, dtype=np.float64)


def load_foreign(path: str | Path, arch: Mapping[str, Any]) -> np.ndarray:
    """Flat float32 theta (D,) of an ONNX file or PyTorch state dict proven to be ``arch``'s network
    (module docstring); ForeignNetworkError naming the first thing that differs."""
    kind = foreign_kind(path)
    if kind is None:
        raise ForeignNetworkError(f"{path}: not an ONNX ({ONNX_SUFFIXES}) or PyTorch ({TORCH_SUFFIXES}) file")
    files.input_file(path, "the network file", advice="give an ONNX file or a PyTorch state dict")
    if kind == "torch":
        obj = _torch_dict(path)
        theta = _match(path, arch, _torch_layers(path, arch, obj), assumed=True)
        _check_torch_keys(path, arch, obj)
        return theta
    chain = _read_onnx(path, arch)
    theta = _match(path, arch, [(label, w, b) for kind_, label, w, b, _ in chain if kind_ in ("Conv2d", "Linear")])
    _check_structure(path, arch, chain)
    _check_forward(path, arch, theta)
    return theta


def _match(path, arch: Mapping[str, Any], found: list, *, assumed: bool = False) -> np.ndarray:
    """Flat float32 theta from the file's affine layers (label, weight, bias), shapes checked in order."""
    want = [
        (type(m).__name__, *(tuple(t.shape) for t in models.affine_parameters(m)))
        for m in _build(arch)
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    note = f" ({_ASSUMED})" if assumed else ""
    for j, ((kind, w_shape, b_shape), (label, w, b)) in enumerate(zip(want, found)):
        if tuple(w.shape) != w_shape or tuple(b.shape) != b_shape:
            raise ForeignNetworkError(
                f"{path} does not fit {_describe(arch)}: its affine layer {j} ({label}) has weight "
                f"{tuple(w.shape)} and bias {tuple(b.shape)}, but layer {j} of {arch['name']} is a {kind} with "
                f"weight {w_shape} and bias {b_shape}; set model.name (and data.*) to the network's architecture{note}"
            )
    if len(found) != len(want):
        labels = ", ".join(label for label, _, _ in found[len(want) :]) or "none"
        raise ForeignNetworkError(
            f"{path} does not fit {_describe(arch)}: it has {len(found)} affine layers, {arch['name']} has "
            f"{len(want)} (the first {min(len(found), len(want))} match; extra in the file: {labels}); "
            f"set model.name to the network's architecture{note}"
        )
    parts = [np.concatenate([np.reshape(w, -1), np.reshape(b, -1)]) for _, w, b in found]
    theta = np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
    if not np.isfinite(theta).all():
        raise ForeignNetworkError(f"{path} holds non-finite parameters (NaN/inf); it cannot be a starting point")
    return theta


# ----------------------------------------------------------------------------- PyTorch state dicts


def _torch_dict(path) -> Mapping[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise ForeignNetworkError(
            f"could not read {path} as a PyTorch state dict ({type(exc).__name__}: {str(exc)[:300]}); "
            "save one with torch.save(model.state_dict(), path)"
        ) from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ForeignNetworkError(
            f"{path} holds a {type(obj).__name__}, not a state dict of tensors; save one with "
            "torch.save(model.state_dict(), path)"
        )
    norm = [k for k in obj if str(k).rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")]
    if norm:
        raise ForeignNetworkError(
            f"{path} has batch normalisation ({norm[0]}); mpigls architectures have none: fold it into the "
            "preceding layer before importing"
        )
    bad = [k for k, v in obj.items() if not (v.is_floating_point() and not v.is_complex())]
    if bad:
        raise ForeignNetworkError(
            f"{path}: tensor {bad[0]} has dtype {obj[bad[0]].dtype}, not a floating-point type; a network's "
            "weights, biases and normalisation are real numbers"
        )
    return obj


def _check_torch_keys(path, arch: Mapping[str, Any], obj: Mapping[str, torch.Tensor]) -> None:
    """A state dict with mpigls's own keys (``0.mean``, ``1.weight``, ...) holds exactly the architecture's."""
    reference = _build(arch).state_dict()
    if all(str(k).split(".", 1)[0].isdigit() for k in obj) and set(obj) != set(reference):
        missing = sorted(set(reference) - set(obj))
        extra = sorted(set(obj) - set(reference))
        raise ForeignNetworkError(
            f"{path} has the keys of an mpigls network, but not those of {_describe(arch)} (missing: "
            f"{missing[:6] or 'none'}; extra: {extra[:6] or 'none'}); set model.name to the network's architecture"
        )


def _torch_layers(path, arch: Mapping[str, Any], obj: Mapping[str, torch.Tensor]) -> list:
    """(weight key, weight, bias) of every layer, in order; the Normalize buffers checked against the dataset's."""
    layers: list[tuple[str, np.ndarray, np.ndarray]] = []
    pending: tuple[str, np.ndarray] | None = None
    for name, tensor in obj.items():
        prefix, _, leaf = str(name).rpartition(".")
        if leaf in ("mean", "std") and tensor.dim() == 3 and pending is None:  # mpigls's Normalize buffers
            want = _per_channel(arch, leaf, 0.0 if leaf == "mean" else 1.0)
            have = tensor.detach().to(torch.float64).reshape(-1).numpy()
            if have.shape != want.shape or not np.allclose(have, want, rtol=1e-5, atol=1e-6):
                raise ForeignNetworkError(
                    f"{path}: its normalisation {name} is {have.round(6).tolist()}, but mpigls's {arch['name']} for "
                    f"this dataset uses {leaf} {want.tolist()}; import a network normalised for this dataset"
                )
            continue
        array = tensor.detach().to(torch.float32).numpy()
        if leaf == "weight" and tensor.dim() in (2, 4) and pending is None:
            pending = (str(name), array)
        elif leaf == "bias" and tensor.dim() == 1 and pending is not None and pending[0] == f"{prefix}.weight":
            layers.append((pending[0], pending[1], array))
            pending = None
        else:
            after = f" after {pending[0]}" if pending is not None else ""
            raise ForeignNetworkError(
                f"{path}: tensor {name} of shape {tuple(tensor.shape)}{after} is not a layer's weight followed by "
                "that layer's bias; mpigls imports Conv2d / Linear layers with biases, in order, and its own "
                "Normalize buffers, nothing else"
            )
    if pending is not None:
        raise ForeignNetworkError(f"{path}: weight {pending[0]} has no bias after it; mpigls layers need biases")
    return layers


# ----------------------------------------------------------------------------- ONNX: reading the chain


@dataclass
class _Graph:
    """What the chain walk needs of an ONNX graph: its constants and which of them were read."""

    path: Any
    consts: dict[str, np.ndarray]
    used: set[str] = field(default_factory=set)

    def const(self, name: str, label: str) -> np.ndarray:
        if name not in self.consts:
            raise ForeignNetworkError(
                f"{self.path}: input {name!r} of {label} is not a constant; mpigls imports networks whose weights "
                "are initializers or Constant nodes"
            )
        self.used.add(name)
        return self.consts[name]


def _label(n) -> str:
    return f"{n.op_type} node {n.name or n.output[0]!r}"


def _attrs(onnx, n, allowed: set[str], path) -> dict[str, Any]:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
    extra = sorted(set(attrs) - allowed)
    if extra:
        raise ForeignNetworkError(
            f"{path}: {_label(n)} has the attribute(s) {extra}, which mpigls's layers do not have; it imports "
            f"{n.op_type} with {sorted(allowed) or 'no attributes'} only"
        )
    return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}


def _load_proto(onnx, path):
    try:
        return onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - protobuf's decode errors have no common base
        raise ForeignNetworkError(f"could not read {path} as ONNX ({type(exc).__name__}: {str(exc)[:300]})") from None


def _read_onnx(path, arch: Mapping[str, Any]) -> list[tuple[str, str, np.ndarray | None, np.ndarray | None, dict]]:
    """The graph's chain as (kind, label, weight, bias, attributes) with kind a layer class name of
    ``models.build`` ("Normalize", "Conv2d", "ReLU", "Flatten", "Linear"), constants read exactly."""
    onnx = require("onnx", "onnx", "importing an ONNX network")
    from onnx import numpy_helper

    graph = _load_proto(onnx, path).graph
    g = _Graph(path, {t.name: numpy_helper.to_array(t) for t in graph.initializer})
    for n in graph.node:
        if n.op_type == "Constant":
            value = [a for a in n.attribute if a.name == "value"]
            if n.domain not in ("", "ai.onnx") or len(value) != 1 or len(n.attribute) != 1:
                raise ForeignNetworkError(f"{path}: {_label(n)} is not a tensor constant (attribute 'value')")
            g.consts[n.output[0]] = numpy_helper.to_array(value[0].t)
    data_inputs = [i for i in graph.input if i.name not in g.consts]
    if len(data_inputs) != 1 or len(graph.output) != 1:
        raise ForeignNetworkError(
            f"{path} has {len(data_inputs)} data input(s) and {len(graph.output)} output(s); mpigls imports "
            "networks with one image input and one logits output"
        )
    batch = _check_input(path, arch, data_inputs[0])
    steps = [n for n in graph.node if n.op_type != "Constant"]
    chain: list[tuple[str, str, np.ndarray | None, np.ndarray | None, dict]] = []
    current, i = data_inputs[0].name, 0
    while i < len(steps):
        n = steps[i]
        if n.domain not in ("", "ai.onnx"):
            raise ForeignNetworkError(f"{path}: {_label(n)} is from the operator domain {n.domain!r}, not ONNX's")
        if current not in n.input:
            raise ForeignNetworkError(
                f"{path}: {_label(n)} does not read the previous node's output {current!r}; mpigls imports a "
                "chain of layers from the input to the output, and this node is off it"
            )
        if len([o for o in n.output if o]) != 1:
            raise ForeignNetworkError(f"{path}: {_label(n)} has {len(n.output)} outputs; mpigls's layers have one")
        nxt = steps[i + 1] if i + 1 < len(steps) else None
        step = _map_node(onnx, g, n, current, nxt, arch, batch, after_layer=any(c[0] != "Normalize" for c in chain))
        if step is not None:
            chain.append(step[0])
            if step[1]:  # a MatMul that took the next Add as its bias
                i += 1
                n = steps[i]
        current, i = n.output[0], i + 1
    if current != graph.output[0].name:
        raise ForeignNetworkError(f"{path}: the graph's output {graph.output[0].name!r} is not the end of its chain")
    unused = sorted(set(t.name for t in graph.initializer) - g.used)
    if unused:
        raise ForeignNetworkError(
            f"{path} has initializer(s) {unused[:6]} that no mapped layer reads; mpigls cannot tell what they "
            "were for, so it does not import the file"
        )
    return chain


def _check_input(path, arch: Mapping[str, Any], value_info) -> int | None:
    """Refuse an input of another element type or image shape; its fixed batch size (None: symbolic)."""
    t = value_info.type.tensor_type
    if t.elem_type != 1:  # TensorProto.FLOAT
        raise ForeignNetworkError(f"{path}: input {value_info.name!r} is not float32 (element type {t.elem_type})")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    want = [int(s) for s in arch["in_shape"]]
    if len(dims) != 4 or any(d is not None and d != w for d, w in zip(dims[1:], want)):
        raise ForeignNetworkError(
            f"{path}: input {value_info.name!r} has shape {dims}, but {_describe(arch)} reads (batch, {want[0]}, "
            f"{want[1]}, {want[2]}); set data.* to the network's dataset"
        )
    return dims[0]


def _map_node(onnx, g: _Graph, n, current: str, nxt, arch, batch, *, after_layer: bool):
    """((kind, label, w, b, attrs), took_next) for one chain node; None for Identity / Dropout."""
    label, op = _label(n), n.op_type
    others = [x for x in n.input if x and x != current]
    if list(n.input).count(current) != 1:
        raise ForeignNetworkError(f"{g.path}: {label} reads the data {current!r} more than once")
    if op == "Identity" or (op == "Dropout" and len(n.input) <= 2):
        _attrs(onnx, n, {"seed", "ratio"}, g.path)
        for x in others:
            g.const(x, label)
        return None
    if op in ("Sub", "Div", "Mul", "Add") and not after_layer:
        if len(others) != 1 or (op in ("Sub", "Div") and n.input[0] != current):
            raise ForeignNetworkError(f"{g.path}: {label} is not (input {op} constant), a per-channel normalisation")
        _attrs(onnx, n, set(), g.path)
        return ("Normalize", label, g.const(others[0], label), None, {"op": op}), False
    if op in ("Conv", "Gemm", "MatMul") and n.input[0] != current:
        raise ForeignNetworkError(f"{g.path}: {label} has its data {current!r} as a weight, not as its first input")
    if op == "Conv":
        attrs = _attrs(onnx, n, {"kernel_shape", "strides", "pads", "dilations", "group", "auto_pad"}, g.path)
        w = g.const(n.input[1], label)
        b = g.const(n.input[2], label) if len(n.input) > 2 and n.input[2] else np.zeros(w.shape[:1], w.dtype)
        return ("Conv2d", label, w, b, attrs), False
    if op == "Gemm":
        attrs = _attrs(onnx, n, {"alpha", "beta", "transA", "transB"}, g.path)
        if attrs.get("transA", 0):
            raise ForeignNetworkError(f"{g.path}: {label} has transA=1; mpigls's Linear computes x @ W^T + b")
        w = g.const(n.input[1], label).astype(np.float64) * float(attrs.get("alpha", 1.0))
        w = w if attrs.get("transB", 0) else w.T
        c = g.const(n.input[2], label) if len(n.input) > 2 and n.input[2] else np.zeros(w.shape[:1])
        return (
            "Linear",
            label,
            w,
            _bias(g.path, label, c.astype(np.float64) * float(attrs.get("beta", 1.0)), w),
            {},
        ), False
    if op == "MatMul":
        _attrs(onnx, n, set(), g.path)
        if len(others) != 1 or g.const(others[0], label).ndim != 2:
            raise ForeignNetworkError(f"{g.path}: {label} must multiply the data by one constant matrix")
        w = g.const(others[0], label).T
        if nxt is not None and nxt.op_type == "Add" and n.output[0] in nxt.input and len(nxt.input) == 2:
            _attrs(onnx, nxt, set(), g.path)
            bias = [x for x in nxt.input if x != n.output[0]]
            return ("Linear", label, w, _bias(g.path, _label(nxt), g.const(bias[0], _label(nxt)), w), {}), True
        return ("Linear", label, w, np.zeros(w.shape[:1], w.dtype), {}), False
    if op == "Relu":
        _attrs(onnx, n, set(), g.path)
        return ("ReLU", label, None, None, {}), False
    if op == "Flatten":
        return ("Flatten", label, None, None, _attrs(onnx, n, {"axis"}, g.path)), False
    if op == "Reshape":
        _attrs(onnx, n, {"allowzero"}, g.path)
        shape = g.const(others[0], label) if len(others) == 1 else np.zeros(0)
        return ("Flatten", label, None, None, {"reshape": [int(s) for s in shape.reshape(-1)], "batch": batch}), False
    raise ForeignNetworkError(
        f"{g.path}: unsupported ONNX operator {op} ({label}) at this place of the chain; mpigls imports Conv, "
        "Gemm, MatMul+Add, Relu, Flatten/Reshape, Identity/Dropout and an input normalisation (Sub, Div, Mul, Add) only"
    )


def _bias(path, label: str, c: np.ndarray, w: np.ndarray) -> np.ndarray:
    """A Linear layer's bias (K,) from a constant of shape (), (K,) or (1, K); others are batch-dependent."""
    k = w.shape[0]
    if c.size not in (1, k) or (c.ndim == 2 and c.shape[0] != 1) or c.ndim > 2:
        raise ForeignNetworkError(f"{path}: the bias of {label} has shape {c.shape}; mpigls's Linear adds one ({k},)")
    return np.broadcast_to(c.reshape(-1), (k,)).copy()


# ----------------------------------------------------------------------------- ONNX: the proof


def _normalisation(path, arch: Mapping[str, Any], steps: list) -> None:
    """The Sub / Div / Mul / Add constants before the first layer must be the dataset's per-channel normalisation."""
    c, h, w = (int(s) for s in arch["in_shape"])
    mean, scale = np.zeros(c), np.ones(c)
    for _, label, const, _, attrs in steps:
        try:
            full = np.broadcast_to(np.asarray(const, dtype=np.float64), (1, c, h, w))
        except ValueError:
            full = None
        per = np.zeros(c) if full is None else full[0, :, 0, 0]
        if full is None or not np.array_equal(full, np.broadcast_to(per.reshape(1, c, 1, 1), full.shape)):
            raise ForeignNetworkError(
                f"{path}: {label} is not a per-channel normalisation (its constant has shape {np.shape(const)})"
            )
        op = attrs["op"]
        if op == "Sub":
            mean = mean + per * scale
        elif op == "Add":
            mean = mean - per * scale
        elif op == "Div":
            scale = scale * per
        else:
            scale = scale / per
    want_mean, want_std = _per_channel(arch, "mean", 0.0), _per_channel(arch, "std", 1.0)
    with np.errstate(all="ignore"):
        same = np.allclose(mean, want_mean, rtol=1e-5, atol=1e-6) and np.allclose(scale, want_std, rtol=1e-5, atol=1e-6)
    if not same:
        raise ForeignNetworkError(
            f"{path} normalises its input with mean {mean.round(6).tolist()} and std {scale.round(6).tolist()}, but "
            f"mpigls's {arch['name']} for this dataset uses mean {want_mean.tolist()} and std {want_std.tolist()} "
            "(its first layer); export the network with the dataset's normalisation, or without one for "
            "datasets that have none"
        )


def _conv_differs(m: nn.Conv2d, w: np.ndarray, attrs: dict) -> list[str]:
    want = {
        "kernel_shape": list(m.kernel_size),
        "strides": list(m.stride),
        "pads": [*m.padding, *m.padding],
        "dilations": list(m.dilation),
        "group": m.groups,
        "auto_pad": "NOTSET",
    }
    have = {
        "kernel_shape": list(w.shape[2:]),
        "strides": [1, 1],
        "pads": [0, 0, 0, 0],
        "dilations": [1, 1],
        "group": 1,
        "auto_pad": "NOTSET",
    }
    have.update({k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in attrs.items()})
    return [f"{k} {have[k]} (the layer's: {want[k]})" for k in want if have[k] != want[k]]


def _flatten_differs(attrs: dict, features: int) -> str | None:
    if "reshape" not in attrs:
        return None if attrs.get("axis", 1) == 1 else f"axis {attrs['axis']} (mpigls flattens from axis 1)"
    shape, batch = attrs["reshape"], attrs["batch"]
    first_ok = len(shape) == 2 and (shape[0] in (0, -1) or (batch is not None and shape[0] == batch))
    if not first_ok or shape[1] not in (-1, features) or (shape[0] == -1 and shape[1] == -1):
        return f"target shape {shape} (mpigls flattens to (batch, {features}))"
    return None


def _check_structure(path, arch: Mapping[str, Any], chain: list) -> None:
    """Every layer of ``models.build(arch)`` matched by the chain's nodes, in order, attributes included."""
    model = _build(arch)
    steps = [c for c in chain if c[0] != "Normalize"]
    _normalisation(path, arch, [c for c in chain if c[0] == "Normalize"])
    layers = [m for m in model if not isinstance(m, models.Normalize)]
    flat_features, x = {}, torch.zeros(1, *arch["in_shape"])
    with torch.no_grad():
        for m in model:
            x = m(x)
            if isinstance(m, nn.Flatten):
                flat_features[id(m)] = int(x.shape[-1])
    for j, m in enumerate(layers):
        kind = type(m).__name__
        if j >= len(steps):
            raise ForeignNetworkError(
                f"{path} does not fit {_describe(arch)}: its chain ends where layer {j + 1} of {arch['name']} is a "
                f"{kind}; the file's network has fewer layers (a missing {kind})"
            )
        got, label, w, _, attrs = steps[j]
        if got != kind:
            raise ForeignNetworkError(
                f"{path} does not fit {_describe(arch)}: {label} maps to a {got} where layer {j + 1} of "
                f"{arch['name']} is a {kind} (a layer was removed, added or reordered); mpigls would compute "
                "another function than the file's"
            )
        if isinstance(m, nn.Conv2d):
            diffs = _conv_differs(m, np.asarray(w), attrs)
        elif isinstance(m, nn.Flatten):
            d = _flatten_differs(attrs, flat_features[id(m)])
            diffs = [d] if d else []
        else:
            diffs = []
        if diffs:
            raise ForeignNetworkError(
                f"{path} does not fit {_describe(arch)}: {label} has {'; '.join(diffs)}; mpigls would compute "
                f"another function than the file's, so it does not import it"
            )
    if len(steps) > len(layers):
        raise ForeignNetworkError(
            f"{path} does not fit {_describe(arch)}: {steps[len(layers)][1]} comes after the last layer of "
            f"{arch['name']} (the file's network has more layers)"
        )


def _check_forward(path, arch: Mapping[str, Any], theta: np.ndarray) -> None:
    """onnxruntime's logits of the file on random inputs equal mpigls's forward pass of theta (float32 rounding)."""
    ort = require("onnxruntime", "onnx", "importing an ONNX network")
    model = _build(arch).eval()
    models.load_flat_(model, torch.from_numpy(theta))
    rng = np.random.default_rng(0)
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        spec = session.get_inputs()[0]
        fixed = spec.shape[0] if isinstance(spec.shape[0], int) else None
        per_run = fixed or CHECK_INPUTS
        x = rng.uniform(0, 1, (per_run * max(1, CHECK_INPUTS // per_run), *arch["in_shape"])).astype(np.float32)
        theirs = np.concatenate(
            [session.run(None, {spec.name: x[i : i + per_run]})[0] for i in range(0, len(x), per_run)]
        )
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors have no common base
        raise ForeignNetworkError(
            f"onnxruntime cannot run {path} ({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); "
            "mpigls imports only networks it can check against onnxruntime"
        ) from None
    with torch.no_grad():
        ours = model(torch.from_numpy(x)).numpy()
    tol = CHECK_RTOL * max(1.0, float(np.abs(ours).max()))
    diff = float(np.abs(theirs.astype(np.float64) - ours).max()) if theirs.shape == ours.shape else float("inf")
    if not diff <= tol:
        raise ForeignNetworkError(
            f"{path}: onnxruntime's logits on {len(x)} random inputs differ from those of the imported "
            f"{arch['name']} by up to {diff:.3g} (float32 rounding allows {tol:.3g}); the file computes another "
            "function than mpigls's network, so it is not imported"
        )
