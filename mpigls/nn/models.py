"""Architectures as plain layer lists, and flat-vector <-> layer-tensor views.

Every network is a ``torch.nn.Sequential`` of ``Normalize``, ``Conv2d``, ``ReLU``, ``Flatten`` and
``Linear`` only, so the bound engine can walk it layer by layer. ``Normalize`` is the first layer,
which keeps the perturbation radius eps in pixel space ([0, 1]) for every dataset.

CNN3 and CNN5 follow Table 4 of Gaussian Loss Smoothing (arXiv 2403.07095): every listed layer is
followed by a ReLU and the output Linear layer is implicit.

Shapes: P population, D parameters, C/H/W image, K classes.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence

import torch
from torch import nn

__all__ = [
    "ARCHITECTURES",
    "Normalize",
    "build",
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
    if name not in _CONV_SPECS:
        raise ValueError(f"model.name must be one of {list(ARCHITECTURES)}, got {name!r}")
    if len(in_shape) != 3 or any(int(s) <= 0 for s in in_shape):
        raise ValueError(f"in_shape must be (channels, height, width) with positive sizes, got {tuple(in_shape)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    channels, height, width = (int(s) for s in in_shape)
    mean = [0.0] * channels if mean is None else list(mean)
    std = [1.0] * channels if std is None else list(std)
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean/std need {channels} entries (one per channel), got {len(mean)} and {len(std)}")
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
    """A JSON-able description from which ``build`` recreates the same architecture."""
    return {
        "name": name,
        "in_shape": [int(s) for s in in_shape],
        "num_classes": int(num_classes),
        "mean": None if mean is None else [float(m) for m in mean],
        "std": None if std is None else [float(s) for s in std],
    }


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
