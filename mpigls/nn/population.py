"""Population forward: evaluate P perturbed copies of one architecture in one batched call.

A network from ``mpigls.nn.models`` (Normalize, Conv2d, ReLU, Flatten, Linear) is turned into a
``Stack``: the Normalize statistics plus a tuple of ``Affine`` layers whose weights carry a
leading population axis, with a ReLU between consecutive affine layers. Linear layers of all
members run as one batched matmul, Conv2d layers as one grouped convolution (groups = P); a
shared input (leading size 1) meets all members' kernels in a single ungrouped convolution.
The adjoint (``Affine.adjoint``, a batched transposed matmul / grouped ``conv_transpose2d``) is
what the bound engine back-substitutes through, so dense conv matrices are never formed.

Each member's arithmetic is the same whatever the population size, up to the float rounding
of batched kernels; repeated calls on the same inputs give the same bits.

Shapes: P population, D weights (parameters of one network), B batch, M rows (batch x specification rows), K classes,
O/I output/input features of a layer.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mpigls.nn.models import Normalize, affine_parameters, unflatten

__all__ = ["Affine", "Stack", "stack", "forward", "renamed_weights"]


@dataclass(frozen=True)
class Affine:
    """One Linear or Conv2d layer for P members: weight (P,O,I) or (P,O,C,kh,kw), bias (P,O)."""

    weight: torch.Tensor
    bias: torch.Tensor
    in_shape: tuple[int, ...]  # per-example activation shape entering the layer (before any Flatten)
    out_shape: tuple[int, ...]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)

    @property
    def is_conv(self) -> bool:
        return self.weight.ndim == 5

    @property
    def num_members(self) -> int:
        return self.weight.shape[0]

    def members(self, start: int, stop: int) -> Affine:
        return Affine(
            self.weight[start:stop], self.bias[start:stop], self.in_shape, self.out_shape, self.stride, self.padding
        )

    def apply(self, x: torch.Tensor, bias: bool = True, absolute: bool = False) -> torch.Tensor:
        """(P|1, M, *in_shape) -> (P, M, *out_shape); ``absolute`` uses |W| (interval radius)."""
        w = self.weight.abs() if absolute else self.weight
        b = self.bias if bias else None
        p, m = self.num_members, x.shape[1]
        if not self.is_conv:
            out = torch.matmul(x.reshape(x.shape[0], m, -1), w.transpose(1, 2))
            return out + b.unsqueeze(1) if b is not None else out
        o = w.shape[1]
        if p == 1 or x.shape[0] == 1:
            # shared input: every member's kernels in one ordinary convolution
            out = F.conv2d(
                x[0], w.reshape(p * o, *w.shape[2:]), None if b is None else b.reshape(p * o), self.stride, self.padding
            )
        else:
            xs = x.transpose(0, 1).reshape(m, p * x.shape[2], *x.shape[3:])
            out = F.conv2d(
                xs,
                w.reshape(p * o, *w.shape[2:]),
                None if b is None else b.reshape(p * o),
                self.stride,
                self.padding,
                groups=p,
            )
        return out.view(m, p, o, *out.shape[2:]).transpose(0, 1)

    def adjoint(self, a: torch.Tensor) -> torch.Tensor:
        """Row vectors times the weight: (P, M, *out_shape) -> (P, M, *in_shape)."""
        p, m = a.shape[0], a.shape[1]
        if not self.is_conv:
            return torch.matmul(a.reshape(p, m, -1), self.weight).reshape(p, m, *self.in_shape)
        o, c = self.weight.shape[1], self.weight.shape[2]
        kh, kw = self.weight.shape[3:]
        h_out, w_out = a.shape[-2:]
        h_in, w_in = self.in_shape[-2:]
        out_pad = (
            h_in - ((h_out - 1) * self.stride[0] - 2 * self.padding[0] + kh),
            w_in - ((w_out - 1) * self.stride[1] - 2 * self.padding[1] + kw),
        )
        a_m = a[0] if p == 1 else a.transpose(0, 1).reshape(m, p * o, h_out, w_out)
        # oneDNN's transposed convolution is several times faster in channels-last layout
        a_m = a_m.contiguous(memory_format=torch.channels_last)
        out = F.conv_transpose2d(
            a_m, self.weight.reshape(p * o, c, kh, kw), None, self.stride, self.padding, out_pad, groups=p
        )
        return out.view(m, p, c, h_in, w_in).transpose(0, 1)

    def bias_dot(self, a: torch.Tensor) -> torch.Tensor:
        """Row vectors dotted with the bias: (P, M, *out_shape) -> (P, M)."""
        p, m = a.shape[0], a.shape[1]
        if self.is_conv:
            a = a.reshape(p, m, self.weight.shape[1], -1).sum(-1)
        return torch.matmul(a.reshape(p, m, -1), self.bias.unsqueeze(-1)).squeeze(-1)


@dataclass(frozen=True)
class Stack:
    """A network as Normalize statistics + affine layers with a ReLU between consecutive ones."""

    mean: torch.Tensor  # (C,1,1)
    std: torch.Tensor  # (C,1,1)
    layers: tuple[Affine, ...]
    single: bool  # True when built without a population axis (result is squeezed)

    @property
    def num_members(self) -> int:
        return self.layers[0].num_members

    def members(self, start: int, stop: int) -> Stack:
        return Stack(self.mean, self.std, tuple(layer.members(start, stop) for layer in self.layers), self.single)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(P|1, B, C, H, W) pixels -> (P, B, K)."""
        h = self.normalize(x)
        for i, layer in enumerate(self.layers):
            h = layer.apply(h if i == 0 else torch.relu(h))
        return h


def _conv_out(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def stack(model: nn.Sequential, weights: torch.Tensor | None, in_shape: tuple[int, ...]) -> Stack:
    """Parse ``model`` for inputs of shape ``in_shape`` (C,H,W) with weights from ``weights``.

    weights None uses the model's own parameters (autograd flows to them), (D,) one flat vector,
    (P, D) a population; the first two give a Stack with one member and ``single`` True.
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model must be a torch.nn.Sequential from mpigls.nn.models.build, got {type(model).__name__}")
    single = weights is None or weights.ndim == 1
    if weights is None:
        pieces: Sequence[tuple[torch.Tensor, ...] | None] = [
            None if not isinstance(m, (nn.Conv2d, nn.Linear)) else tuple(t[None] for t in affine_parameters(m))
            for m in model
        ]
    else:
        if weights.ndim not in (1, 2):
            raise ValueError(f"weights must have shape (D,) or (P, D), got {tuple(weights.shape)}")
        pieces = unflatten(model, weights[None] if weights.ndim == 1 else weights)
    shape = tuple(int(s) for s in in_shape)
    mean = torch.zeros(shape[0], 1, 1)
    std = torch.ones(shape[0], 1, 1)
    layers: list[Affine] = []
    expect_affine = True
    for i, (module, wb) in enumerate(zip(model, pieces)):
        if isinstance(module, Normalize):
            if i != 0:
                raise TypeError(f"Normalize must be the first layer of the model, found it at position {i}")
            mean, std = module.mean, module.std
        elif isinstance(module, nn.Flatten):
            shape = (math.prod(shape),)
        elif isinstance(module, nn.ReLU):
            if expect_affine:
                raise TypeError(
                    f"layer {i} (ReLU) must follow a Conv2d or Linear layer; "
                    "supported models alternate affine layers and ReLUs"
                )
            expect_affine = True
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            if not expect_affine:
                raise TypeError(
                    f"layer {i} ({type(module).__name__}) follows another affine layer "
                    "without a ReLU in between; supported models alternate them"
                )
            expect_affine = False
            assert wb is not None  # unflatten gives (weight, bias) for every Conv2d and Linear
            w, b = wb
            if isinstance(module, nn.Linear):
                if len(shape) != 1:
                    raise TypeError(f"layer {i} (Linear) receives shape {shape}; add nn.Flatten before it")
                layers.append(Affine(w, b, shape, (module.out_features,)))
            else:
                if (
                    module.groups != 1
                    or module.dilation != (1, 1)
                    or module.padding_mode != "zeros"
                    or isinstance(module.padding, str)
                    or len(shape) != 3
                ):
                    raise TypeError(
                        f"layer {i} ({module}) is unsupported: need groups=1, dilation=1, "
                        f"numeric zero padding and a (C,H,W) input, got input shape {shape}"
                    )
                k, s, p = module.kernel_size, module.stride, module.padding
                out = (
                    module.out_channels,
                    _conv_out(shape[1], k[0], s[0], p[0]),
                    _conv_out(shape[2], k[1], s[1], p[1]),
                )
                layers.append(Affine(w, b, shape, out, (s[0], s[1]), (p[0], p[1])))
            shape = layers[-1].out_shape
        else:
            raise TypeError(
                f"unsupported layer {i}: {type(module).__name__}; models may only contain "
                "Normalize, Conv2d, ReLU, Flatten and Linear"
            )
    if not layers or expect_affine:
        raise TypeError("the model must end with a Linear layer (the logits)")
    return Stack(mean, std, tuple(layers), single)


def forward(
    model: nn.Sequential, x: torch.Tensor, weights: torch.Tensor | None = None, *, params: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits of the network(s): (B,K) for weights None or (D,); (P,B,K) for weights (P,D).

    x is (B,C,H,W), shared by all members, or (P,B,C,H,W), one input batch per member.
    ``params=`` is the deprecated name of ``weights=`` (``renamed_weights``).
    """
    weights = renamed_weights(weights, params, "population.forward")
    if weights is None:
        return model(x)
    if x.ndim not in (4, 5):
        raise ValueError(f"x must have shape (B,C,H,W) or (P,B,C,H,W), got {tuple(x.shape)}")
    net = stack(model, weights, x.shape[-3:])
    out = net.logits(x if x.ndim == 5 else x[None])
    return out[0] if net.single else out


def renamed_weights(weights: torch.Tensor | None, params: torch.Tensor | None, caller: str) -> torch.Tensor | None:
    """The weight stack passed as ``weights=`` or, deprecated for one release, as ``params=``.

    ``params`` now names the optimizers' hyperparameters (``mpigls.optim``); the (P, D) stack of
    network weights was called ``params`` by the bound engine, the losses and ``forward`` before.
    """
    if params is None:
        return weights
    if weights is not None:
        raise TypeError(f"{caller}() got both weights= and params= (its deprecated name); pass weights= only")
    warnings.warn(
        f"{caller}(params=...) is deprecated: the (P, D) weight stack is now passed as weights=; "
        "params= will be removed in the next release",
        DeprecationWarning,
        stacklevel=3,
    )
    return params
