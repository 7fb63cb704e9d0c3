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

import torch

from . import crown
from .common import Problem, Relax, relu_relax

__all__ = ["bound"]


def bound(prob: Problem, alpha_steps: int = 20, alpha_lr: float = 0.1, conv_mode: str = "auto") -> torch.Tensor:
    """Margin lower bounds (P, B, K-1), detached."""
    if int(alpha_steps) < 0 or not float(alpha_lr) > 0:
        raise ValueError(f"alpha-crown needs alpha_steps >= 0 and alpha_lr > 0, got {alpha_steps}, {alpha_lr}")
    with torch.no_grad():
        layers = tuple(dataclasses.replace(layer, weight=layer.weight.detach(), bias=layer.bias.detach())
                       for layer in prob.net.layers)
        prob = dataclasses.replace(prob, net=dataclasses.replace(prob.net, layers=layers), x=prob.x.detach(),
                                   eps=prob.eps.detach(), lo=prob.lo.detach(), hi=prob.hi.detach())
        bounds = crown.intermediate_bounds(prob, refine=True, conv_mode=conv_mode)
        base = [relu_relax(lo, hi) for lo, hi in bounds]
        best = crown.final_bound(prob, base)
    if alpha_steps == 0 or not bounds:
        return best
    num_s = best.shape[2]
    unstable = [((lo < 0) & (hi > 0)).unsqueeze(2) for lo, hi in bounds]
    alphas = [r.alpha.expand(-1, -1, num_s, *r.alpha.shape[3:]).clone().requires_grad_(True) for r in base]
    opt = torch.optim.Adam(alphas, lr=float(alpha_lr))
    for _ in range(int(alpha_steps)):
        with torch.enable_grad():
            relax = [Relax(torch.where(m, a, r.alpha), r.slope, r.shift) for a, m, r in zip(alphas, unstable, base)]
            lb = crown.final_bound(prob, relax)
            opt.zero_grad(set_to_none=True)
            (-lb.sum()).backward()
        best = torch.maximum(best, lb.detach())
        opt.step()
        with torch.no_grad():
            for a in alphas:
                a.clamp_(0.0, 1.0)
    with torch.no_grad():
        relax = [Relax(torch.where(m, a, r.alpha), r.slope, r.shift) for a, m, r in zip(alphas, unstable, base)]
        best = torch.maximum(best, crown.final_bound(prob, relax))
    return best
