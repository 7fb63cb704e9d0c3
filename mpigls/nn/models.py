"""Architectures as plain layer lists, and flat-vector <-> layer-tensor views.

Every network is a ``torch.nn.Sequential`` of ``Normalize``, ``Conv2d``, ``ReLU``, ``Flatten`` and
``Linear`` only, so the bound engine can walk it layer by layer. ``Normalize`` is the first layer,
which keeps the perturbation radius eps in pixel space ([0, 1]) for every dataset.

CNN3 and CNN5 follow Table 4 of Gaussian Loss Smoothing (arXiv 2403.07095): every listed layer is
followed by a ReLU and the output Linear layer is implicit.

A network of one's own: ``model.name: mypkg.nets:cnn_small`` names a function (importable: an
installed package or one on PYTHONPATH) that returns a ``torch.nn.Sequential``; it is called as
``cnn_small(in_shape, num_classes)`` (in_shape (C, H, W)), or without arguments if it takes none,
under ``train.seed`` so that every rank builds the same initial weights. Its layers may be Conv2d
(groups 1, dilation 1, numeric zero padding), Linear, ReLU, Flatten, nested Sequentials, and
BatchNorm1d/2d directly after a Conv2d or Linear: a BatchNorm is folded into that layer with its
running statistics (y = gamma (Wx + b - mean) / sqrt(var + eps) + beta is one affine layer), so
mpigls trains and certifies the folded network (population training has no batch statistics). A
Conv2d or Linear without a bias gets a zero bias (trained like any other). Affine layers and ReLUs
alternate and the last layer is a Linear giving the logits; mpigls puts the dataset's
``Normalize`` in front. Anything else is refused, naming the first layer that does not fit.
``architecture_dict`` of such a network also records its layers, so a checkpoint refuses to load
into a changed definition.

Shapes: P population, D parameters, C/H/W image, K classes.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import math
import re
import threading
from collections.abc import Iterator, Sequence

import torch
from torch import nn

__all__ = [
    "ARCHITECTURES",
    "CUSTOM_NAME",
    "Normalize",
    "build",
    "is_custom",
    "prepare_custom",
    "num_params",
    "flat_params",
    "unflatten",
    "affine_parameters",
    "load_flat_",
    "architecture_dict",
    "private_rng",
]

_GLOBAL_RNG = threading.RLock()


@contextlib.contextmanager
def private_rng(seed: int | None = None) -> Iterator[None]:
    """Use torch's process-wide CPU generator (seeded with ``seed`` if given) and restore it after,
    one thread at a time: ranks run as threads of one process (``parallel.run_threaded``) would otherwise
    restore each other's saved state in the middle of a seeded model initialisation."""
    with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        yield


class Normalize(nn.Module):
    """Per-channel affine input normalisation (x - mean) / std; buffers, not parameters."""

    mean: torch.Tensor  # (C, 1, 1), registered as buffers in __init__
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean_t = torch.as_tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        std_t = torch.as_tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
        if (std_t <= 0).any():
            raise ValueError(f"Normalize std must be positive, got {list(std)}")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


# (out_channels, kernel, stride, padding) per conv; hidden widths of fully connected layers.
_CONV_SPECS: dict[str, tuple[list[tuple[int, int, int, int]], list[int]]] = {
    "cnn3": ([(8, 5, 2, 2), (8, 4, 2, 1)], []),
    "cnn5": ([(16, 5, 2, 2), (16, 4, 2, 1), (32, 4, 2, 1)], [512]),
    # CNN7 as in the certified-training literature (Shi et al. 2021), without batch norm.
    "cnn7": ([(64, 3, 1, 1), (64, 3, 1, 1), (128, 3, 2, 1), (128, 3, 1, 1), (128, 3, 1, 1)], [512]),
    "mlp": ([], [100, 100]),
    "mlp-tiny": ([], [16, 16]),
}
ARCHITECTURES = tuple(_CONV_SPECS)
# ``package.module:function``: a network of one's own (module docstring)
CUSTOM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")


def is_custom(name: object) -> bool:
    """True for a ``package.module:function`` name (a network of one's own), not a built-in."""
    return isinstance(name, str) and CUSTOM_NAME.fullmatch(name) is not None


def build(
    name: str,
    in_shape: Sequence[int],
    num_classes: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Sequential:
    """Build architecture ``name`` for inputs of shape (C, H, W) and ``num_classes`` outputs.

    Parameters are initialised with torch's default (Kaiming-uniform) initialisation; callers
    that need a particular initial point seed torch themselves or load a flat vector.
    """
    if name not in _CONV_SPECS and not is_custom(name):
        raise ValueError(
            f"model.name must be one of {list(ARCHITECTURES)} or a network of your own as "
            f"'package.module:function', got {name!r}"
        )
    if len(in_shape) != 3 or any(int(s) <= 0 for s in in_shape):
        raise ValueError(f"in_shape must be (channels, height, width) with positive sizes, got {tuple(in_shape)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    channels, height, width = (int(s) for s in in_shape)
    mean = [0.0] * channels if mean is None else list(mean)
    std = [1.0] * channels if std is None else list(std)
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean/std need {channels} entries (one per channel), got {len(mean)} and {len(std)}")
    if is_custom(name):
        net = prepare_custom(_call_custom(name, (channels, height, width), num_classes), name)
        _check_output(net, name, (channels, height, width), num_classes)
        return nn.Sequential(Normalize(mean, std), *net)
    convs, hidden = _CONV_SPECS[name]
    layers: list[nn.Module] = [Normalize(mean, std)]
    for out_ch, kernel, stride, pad in convs:
        height_out = (height + 2 * pad - kernel) // stride + 1
        width_out = (width + 2 * pad - kernel) // stride + 1
        if height_out < 1 or width_out < 1:
            raise ValueError(
                f"model {name!r} does not fit input shape {tuple(in_shape)}: a {kernel}x{kernel} conv with "
                f"stride {stride} and padding {pad} would give a {height_out}x{width_out} output; "
                "use a larger input or a smaller architecture (e.g. 'mlp')"
            )
        layers += [nn.Conv2d(channels, out_ch, kernel, stride, pad), nn.ReLU()]
        channels, height, width = out_ch, height_out, width_out
    layers.append(nn.Flatten())
    features = channels * height * width
    for width_fc in hidden:
        layers += [nn.Linear(features, width_fc), nn.ReLU()]
        features = width_fc
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


def architecture_dict(
    name: str, in_shape: Sequence[int], num_classes: int, mean: Sequence[float] | None, std: Sequence[float] | None
) -> dict:
    """A JSON-able description from which ``build`` recreates the same architecture; for a network
    of one's own also its layers (as built, BatchNorm folded), so that a changed definition is seen."""
    out = {
        "name": name,
        "in_shape": [int(s) for s in in_shape],
        "num_classes": int(num_classes),
        "mean": None if mean is None else [float(m) for m in mean],
        "std": None if std is None else [float(s) for s in std],
    }
    if is_custom(name):
        with private_rng(0):
            out["layers"] = [str(m) for m in build(name, in_shape, num_classes, mean, std)[1:]]
    return out


# ----------------------------------------------------------------------------- a network of one's own


def _call_custom(name: str, in_shape: tuple[int, int, int], num_classes: int) -> object:
    """Import ``package.module:function`` and call it (module docstring)."""
    module_name, _, attr = name.partition(":")
    rng = torch.random.get_rng_state()  # the first import must not move the seeded generator
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"model.name {name!r}: cannot import {module_name!r} ({exc}); make it importable in every "
            "process that reads the config (install the package, e.g. pip install -e ., or add the folder "
            "that holds it to PYTHONPATH)"
        ) from None
    finally:
        torch.random.set_rng_state(rng)
    fn = getattr(module, attr, None)
    if isinstance(fn, nn.Module) or not callable(fn):
        what = "has no attribute" if fn is None else f"has a {type(fn).__name__} named"
        raise ValueError(
            f"model.name {name!r}: {module_name} {what} {attr!r}; name a function that returns a "
            "torch.nn.Sequential (called with (in_shape, num_classes) or no arguments, under train.seed "
            "so that the initial weights are reproducible)"
        )
    try:
        takes_args = any(
            p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
            for p in inspect.signature(fn).parameters.values()
        )
    except (TypeError, ValueError):  # no signature (a builtin): try with the arguments
        takes_args = True
    return fn(tuple(in_shape), int(num_classes)) if takes_args else fn()


def _flat_layers(net: nn.Sequential, prefix: str) -> list[tuple[str, nn.Module]]:
    out = []
    for key, m in net.named_children():
        path = f"{prefix}.{key}" if prefix else key
        out += _flat_layers(m, path) if isinstance(m, nn.Sequential) else [(path, m)]
    return out


def _fold_batchnorm(layer: nn.Conv2d | nn.Linear, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """layer := bn(layer(.)) with bn's running statistics, in place (float64 arithmetic)."""
    var, mean = bn.running_var.double(), bn.running_mean.double()  # type: ignore[union-attr]
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    w = layer.weight.double() * scale.reshape(-1, *([1] * (layer.weight.ndim - 1)))
    b = (layer.bias.double() - mean) * scale + beta  # type: ignore[union-attr]
    with torch.no_grad():
        layer.weight.copy_(w.to(layer.weight.dtype))
        layer.bias.copy_(b.to(layer.bias.dtype))  # type: ignore[union-attr]


def _refuse(name: str, path: str, module: nn.Module, why: str) -> ValueError:
    return ValueError(
        f"model.name {name!r}: layer {path} ({module}) {why}. mpigls trains and certifies Sequentials of "
        "Conv2d, Linear, ReLU and Flatten (BatchNorm folded into the Conv2d or Linear before it), "
        "alternating affine layers and ReLUs and ending with a Linear layer"
    )


def prepare_custom(net: object, name: str = "the network") -> list[nn.Module]:
    """The layers of a network of one's own as mpigls runs them: nested Sequentials flattened,
    BatchNorm folded, missing biases zero, float32; ValueError naming the first layer that does not fit."""
    if not isinstance(net, nn.Sequential):
        raise ValueError(
            f"model.name {name!r} returned a {type(net).__name__}, not a torch.nn.Sequential: mpigls walks "
            "the layers in order, so the network must be one Sequential (of Conv2d, Linear, ReLU, Flatten, BatchNorm)"
        )
    net = copy.deepcopy(net).float().eval().requires_grad_(True)
    layers: list[nn.Module] = []
    affine_last = False  # the last kept layer is a Conv2d / Linear (a BatchNorm may follow)
    seen: set[int] = set()
    for path, m in _flat_layers(net, ""):
        if id(m) in seen and any(True for _ in m.parameters()):
            raise _refuse(name, path, m, "appears twice (shared weights)")
        seen.add(id(m))
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if affine_last:
                raise _refuse(name, path, m, "follows another affine layer without a ReLU in between")
            if isinstance(m, nn.Conv2d) and (
                m.groups != 1 or m.dilation != (1, 1) or m.padding_mode != "zeros" or isinstance(m.padding, str)
            ):
                raise _refuse(name, path, m, "is not supported: need groups=1, dilation=1 and numeric zero padding")
            if m.bias is None:
                m.bias = nn.Parameter(torch.zeros(m.weight.shape[0]))
            layers.append(m)
            affine_last = True
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            prev = layers[-1] if layers else None
            if not affine_last or prev is None:
                raise _refuse(name, path, m, "does not directly follow a Conv2d or Linear layer to fold into")
            if m.running_mean is None or m.running_var is None:
                raise _refuse(name, path, m, "has no running statistics (track_running_stats=False) to fold")
            if isinstance(m, nn.BatchNorm2d) != isinstance(prev, nn.Conv2d):
                raise _refuse(name, path, m, f"does not fit the {type(prev).__name__} before it")
            _fold_batchnorm(prev, m)  # type: ignore[arg-type]
        elif isinstance(m, nn.ReLU):
            if not affine_last:
                raise _refuse(name, path, m, "does not follow a Conv2d or Linear layer")
            layers.append(nn.ReLU())
            affine_last = False
        elif isinstance(m, nn.Flatten):
            if (m.start_dim, m.end_dim) != (1, -1):
                raise _refuse(name, path, m, "is not supported: only Flatten(start_dim=1, end_dim=-1)")
            layers.append(m)
        else:
            raise _refuse(name, path, m, "is not supported")
    if not layers or not isinstance(layers[-1], nn.Linear):
        raise ValueError(
            f"model.name {name!r}: the network must end with a Linear layer giving the logits (no ReLU after it)"
        )
    return layers


def _check_output(layers: list[nn.Module], name: str, in_shape: tuple[int, int, int], num_classes: int) -> None:
    try:
        with torch.no_grad():
            out = nn.Sequential(*layers)(torch.zeros(1, *in_shape))
    except RuntimeError as exc:
        raise ValueError(f"model.name {name!r} does not run on inputs of shape {in_shape}: {exc}") from None
    if tuple(out.shape) != (1, num_classes):
        raise ValueError(
            f"model.name {name!r} gives outputs of shape {tuple(out.shape[1:])} for inputs {in_shape}; the data "
            f"has {num_classes} classes, so the last Linear layer needs {num_classes} outputs"
        )


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flat_params(model: nn.Module) -> torch.Tensor:
    """(D,) copy of all parameters, ordered like ``parameters_to_vector(model.parameters())``."""
    return nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def load_flat_(model: nn.Module, flat: torch.Tensor) -> nn.Module:
    """Copy a (D,) vector into the model's parameters in place (they keep their device and dtype);
    returns the model."""
    expected = num_params(model)
    if flat.ndim != 1 or flat.numel() != expected:
        raise ValueError(f"flat parameter vector must have shape ({expected},), got {tuple(flat.shape)}")
    with torch.no_grad():
        first = next(model.parameters())
        nn.utils.vector_to_parameters(flat.to(first.device, first.dtype), model.parameters())
    return model


def affine_parameters(module: nn.Conv2d | nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of an affine layer; the bound engine needs the bias, so a layer without one is an error."""
    if module.bias is None:
        raise TypeError(f"{type(module).__name__} layers need a bias (bias=True), got {module}")
    return module.weight, module.bias


def unflatten(model: nn.Sequential, flat: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Per-module (weight, bias) views into ``flat`` of shape (*lead, D); None for parameter-free modules.

    The views keep the leading dimensions, e.g. a (P, D) stack gives weights of shape (P, *w.shape),
    and stay differentiable with respect to ``flat``.
    """
    expected = num_params(model)
    if flat.shape[-1] != expected:
        raise ValueError(f"parameter vectors must have {expected} entries (last dim), got shape {tuple(flat.shape)}")
    lead = flat.shape[:-1]
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    offset = 0
    for module in model:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            pieces = []
            for tensor in affine_parameters(module):
                size = math.prod(tensor.shape)
                pieces.append(flat[..., offset : offset + size].reshape(*lead, *tensor.shape))
                offset += size
            out.append((pieces[0], pieces[1]))
        elif any(True for _ in module.parameters(recurse=False)):
            raise TypeError(
                f"unsupported parametric layer {type(module).__name__}; "
                "models may only contain Normalize, Conv2d, ReLU, Flatten and Linear"
            )
        else:
            out.append(None)
    return out
