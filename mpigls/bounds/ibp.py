"""Interval bound propagation (IBP; Gowal et al. 2018, arXiv 1810.12715).

Boxes are pushed through each affine layer in centre/radius form (mid' = W mid + b,
rad' = |W| rad) and through each ReLU elementwise; the last layer is merged with the margin
matrix C (rows e_y - e_i), so the margin lower bound is C W mid - |C W| rad + C b.

Shapes: P population, B batch, K classes.
"""
from __future__ import annotations

import torch

from .common import Problem, concretize, ibp_layer, margin_spec

__all__ = ["activation_bounds", "bound"]


def activation_bounds(prob: Problem) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pre-activation bounds (P, B, *shape) of every hidden affine layer."""
    out = []
    lo, hi = prob.lo, prob.hi
    for layer in prob.net.layers[:-1]:
        lo, hi = ibp_layer(layer, lo, hi)
        out.append((lo, hi))
        lo, hi = lo.clamp(min=0), hi.clamp(min=0)
    return out


def bound(prob: Problem) -> torch.Tensor:
    """Margin lower bounds (P, B, K-1)."""
    net = prob.net
    if len(net.layers) > 1:
        lo, hi = activation_bounds(prob)[-1]
        lo, hi = lo.clamp(min=0), hi.clamp(min=0)
    else:
        lo, hi = prob.lo, prob.hi
    w_c, b_c = margin_spec(net, prob.y)
    return concretize(w_c, b_c, lo, hi)
