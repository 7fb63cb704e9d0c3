"""SABR: IBP over a small box around an adversarial point (Müller et al. 2023, arXiv 2210.04871).

With tau = lambda * eps, the PGD point x' is projected into [x - (eps - tau), x + (eps - tau)] so
that the small box [x' - tau, x' + tau] ∩ [0, 1] lies inside the original box, and IBP bounds
the margins over the small box. The result is NOT a sound bound over the full eps-box (only over
the small box; lambda = 1 gives plain IBP): it is a training signal whose tightness lies between
adversarial and IBP training. The PGD point is detached; the IBP part is differentiable.

Shapes: P population, D weights, B batch, K classes.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from mpigls.bounds import ibp
from mpigls.bounds.common import Problem, make_problem
from mpigls.nn.attacks import pgd, step_size_for

__all__ = ["small_box", "bound", "bound_at"]


def small_box(x: torch.Tensor, eps: torch.Tensor, x_adv: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel corners of the SABR box: x (B,C,H,W), eps (B,1,1,1), x_adv (B,...) or (P,B,...)."""
    if not 0.0 < lam <= 1.0:
        raise ValueError(f"sabr_lambda must lie in (0, 1], got {lam}")
    tau = lam * eps
    centre = torch.maximum(torch.minimum(x_adv, x + eps - tau), x - eps + tau)
    return (centre - tau).clamp(0, 1), (centre + tau).clamp(0, 1)


def _ibp_small(prob: Problem, x_adv: torch.Tensor, lam: float) -> torch.Tensor:
    lo, hi = small_box(prob.x, prob.eps, x_adv.detach(), lam)
    if lo.ndim == 4:
        lo, hi = lo[None], hi[None]
    lo, hi = prob.net.normalize(lo), prob.net.normalize(hi)
    return ibp.bound(dataclasses.replace(prob, lo=lo, hi=hi))


def bound(
    prob: Problem,
    sabr_lambda: float = 0.4,
    pgd_steps: int = 8,
    pgd_step_size: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Small-box margin lower bounds (P, B, K-1) around a PGD point of ``prob.model`` with
    ``prob.weights`` (step size ``attacks.step_size_for``: 2.5 eps / steps by default)."""
    if prob.model is None:
        raise ValueError("sabr attacks the network itself: build the problem with make_problem(model, ...)")
    step = step_size_for(prob.eps, pgd_steps, pgd_step_size)
    x_adv = pgd(prob.model, prob.x, prob.y, prob.eps.view(-1), pgd_steps, step, prob.weights, generator)
    return _ibp_small(prob, x_adv, float(sabr_lambda))


def bound_at(
    model: nn.Sequential,
    x: torch.Tensor,
    y: torch.Tensor,
    eps,
    x_adv: torch.Tensor,
    weights: torch.Tensor | None = None,
    sabr_lambda: float = 0.4,
    **opts,
) -> torch.Tensor:
    """SABR bounds around a given point x_adv ((B,...) or (P,B,...)): (B, K-1) or (P, B, K-1)."""
    prob = make_problem(model, x, y, eps, weights, **opts)
    out = _ibp_small(prob, x_adv, float(sabr_lambda))
    return out[0] if prob.net.single else out
