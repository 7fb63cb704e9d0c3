"""Interval bound propagation (IBP; Gowal et al. 2018, arXiv 1810.12715).

Boxes are pushed through each affine layer in centre/radius form (mid' = W mid + b,
rad' = |W| rad) and through each ReLU elementwise; the last layer is merged with the margin
matrix C (rows e_y - e_i), so the margin lower bound is C W mid - |C W| rad + C b.

Shapes: P population, B batch, K classes.
"""
from __future__ import annotations

import torch

from .common import Problem, ibp_layer

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
    """Margin lower bounds (P, B, K-1).

    C W mid + C b is read off the logits of the box centre; |C W| rad uses the K x K table of
    |w_y - w_i| per member (P, K*K, I), so no (P, B, K-1, I) merged matrix is built.
    """
    net = prob.net
    if len(net.layers) > 1:
        lo, hi = activation_bounds(prob)[-1]
        lo, hi = lo.clamp(min=0), hi.clamp(min=0)
    else:
        lo, hi = prob.lo, prob.hi
    last = net.layers[-1]
    w, b = last.weight, last.bias  # (P, K, I), (P, K)
    p, k = w.shape[:2]
    batch = prob.y.shape[0]
    mid = ((hi + lo) / 2).reshape(lo.shape[0], batch, -1)
    rad = ((hi - lo) / 2).reshape(lo.shape[0], batch, -1)
    z = torch.matmul(mid, w.transpose(1, 2)) + b.unsqueeze(1)  # (P, B, K)
    dabs = (w.unsqueeze(2) - w.unsqueeze(1)).abs().reshape(p, k * k, -1)  # [y*K + i] = |w_y - w_i|
    spread = torch.matmul(rad, dabs.transpose(1, 2))  # (P, B, K*K)
    others = torch.arange(k - 1, device=prob.y.device).unsqueeze(0)
    others = others + (others >= prob.y.unsqueeze(1)).long()  # (B, K-1)
    z_y = z.gather(2, prob.y.view(1, batch, 1).expand(p, batch, 1))
    z_o = z.gather(2, others.unsqueeze(0).expand(p, -1, -1))
    pair = (prob.y.unsqueeze(1) * k + others).unsqueeze(0).expand(p, -1, -1)
    return z_y - z_o - spread.gather(2, pair)
