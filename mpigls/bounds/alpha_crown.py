"""alpha-CROWN: CROWN with optimised lower ReLU slopes (Xu et al. 2021, arXiv 2011.13824).

Pre-activation bounds come from DeepPoly (``crown.intermediate_bounds``) and stay fixed. For the
margin specification every unstable neuron of every ReLU layer gets its own lower slope
alpha in [0, 1] per specification row, initialised to the adaptive CROWN choice; a few steps of
projected Adam ascent maximise the sum of the margin lower bounds (every alpha in [0, 1] gives a
sound bound). The best bound seen per row is kept, so the result is never looser than DeepPoly.
The result is detached: the bound is an optimum over alpha, trained with PGPE, not by backprop.

Shapes: P population, B batch, S rows (K-1), K classes.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from mpigls.bounds import crown
from mpigls.bounds.common import Problem, Relax, over_pairs, plan_chunks, relu_relax

# Row-sized tensors one level of the final back-substitution keeps for backward (A, its negative
# part, the products with alpha and slope, the transposed-layer output) plus working copies.
_GRAPH_FACTOR = 8

__all__ = ["bound"]


def bound(
    prob: Problem, alpha_steps: int = 20, alpha_lr: float = 0.1, conv_mode: str = "auto", rows: str = "auto"
) -> torch.Tensor:
    """Margin lower bounds (P, B, K-1), detached."""
    if int(alpha_steps) < 0 or not float(alpha_lr) > 0:
        raise ValueError(f"alpha-crown needs alpha_steps >= 0 and alpha_lr > 0, got {alpha_steps}, {alpha_lr}")
    with torch.no_grad():
        layers = tuple(
            dataclasses.replace(layer, weight=layer.weight.detach(), bias=layer.bias.detach())
            for layer in prob.net.layers
        )
        prob = dataclasses.replace(
            prob,
            net=dataclasses.replace(prob.net, layers=layers),
            x=prob.x.detach(),
            eps=prob.eps.detach(),
            lo=prob.lo.detach(),
            hi=prob.hi.detach(),
        )
        bounds = crown.intermediate_bounds(prob, refine=True, conv_mode=conv_mode, rows=rows)
        base = [relu_relax(lo, hi) for lo, hi in bounds]
        best = crown.final_bound(prob, base, conv_mode, rows)
    if alpha_steps == 0 or not bounds:
        return best
    # Each (member, example)'s alphas only touch its own bound and Adam is elementwise, so the
    # optimisation runs chunk by chunk with the same result; a chunk's autograd graph (about
    # _GRAPH_FACTOR row-sized tensors per level) is freed before the next chunk starts.
    net = prob.net
    num_p, num_b, num_s = net.num_members, prob.x.shape[0], best.shape[2]
    per_pair = num_s * sum(math.prod(layer.in_shape) for layer in net.layers) * _GRAPH_FACTOR
    per_pair += 2 * sum(math.prod(layer.out_shape) for layer in net.layers[:-1]) * num_s * 4  # alphas + Adam
    pc, bc, _ = plan_chunks(num_p, num_b, 1, per_pair, prob.memory_budget_mb, work_factor=1)

    def chunk(sub: Problem, p0: int, p1: int, b0: int, b1: int) -> torch.Tensor:
        sub_bounds = [(lo[p0:p1, b0:b1], hi[p0:p1, b0:b1]) for lo, hi in bounds]
        return _optimise(sub, sub_bounds, best[p0:p1, b0:b1], alpha_steps, alpha_lr, conv_mode, rows)

    return over_pairs(prob, pc, bc, chunk)


def _optimise(
    prob: Problem,
    bounds,
    best: torch.Tensor,
    alpha_steps: int,
    alpha_lr: float,
    conv_mode: str = "auto",
    rows: str = "auto",
) -> torch.Tensor:
    """Projected Adam on the lower slopes of one chunk; the best bound seen per row."""
    base = [relu_relax(lo, hi) for lo, hi in bounds]
    num_s = best.shape[2]
    unstable = [((lo < 0) & (hi > 0)).unsqueeze(2) for lo, hi in bounds]
    alphas = [r.alpha.expand(-1, -1, num_s, *r.alpha.shape[3:]).clone().requires_grad_(True) for r in base]
    opt = torch.optim.Adam(alphas, lr=float(alpha_lr))
    for _ in range(int(alpha_steps)):
        with torch.enable_grad():
            relax = [Relax(torch.where(m, a, r.alpha), r.slope, r.shift) for a, m, r in zip(alphas, unstable, base)]
            lb = crown.final_bound(prob, relax, conv_mode, rows)
            opt.zero_grad(set_to_none=True)
            (-lb.sum()).backward()
        best = torch.maximum(best, lb.detach())
        del lb, relax
        opt.step()
        with torch.no_grad():
            for a in alphas:
                a.clamp_(0.0, 1.0)
    with torch.no_grad():
        relax = [Relax(torch.where(m, a, r.alpha), r.slope, r.shift) for a, m, r in zip(alphas, unstable, base)]
        best = torch.maximum(best, crown.final_bound(prob, relax, conv_mode, rows))
    return best
