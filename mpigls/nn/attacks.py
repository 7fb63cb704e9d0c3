"""Projected gradient descent attacks (Madry et al. 2018, arXiv 1706.06083) on (populations of) networks.

x_{t+1} = Proj_{[x-eps, x+eps] ∩ [0,1]}(x_t + step_size * sign(grad_x loss(x_t))), maximising
either the cross-entropy ("ce") or the negative smallest margin min_{i != y} z_y - z_i ("margin").
With a population (weights (P, D)) every member gets its own adversarial batch, attacked
independently of the others (the losses are summed over members, whose inputs are disjoint).
The random start is drawn once with shape (B, C, H, W) and shared by all members, so a member's
attack does not depend on which other members are stacked with it. Weights are detached:
the attack never contributes a gradient to the network.

Shapes: P population, D parameters, B batch, K classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mpigls.nn.margins import margins
from mpigls.nn.population import forward

__all__ = ["LOSSES", "STEP_SIZE_FACTOR", "default_step_size", "step_size_for", "pgd", "margins"]

LOSSES = ("ce", "margin")
# Madry et al. 2018 take steps of 2.5 eps / steps, so that the attack can cross the whole box
# (2 eps wide) and still move back from its boundary.
STEP_SIZE_FACTOR = 2.5


def default_step_size(eps_max: float, steps: int) -> float:
    """The PGD step size when none is configured: STEP_SIZE_FACTOR * eps_max / steps (0 steps: as 1)."""
    return STEP_SIZE_FACTOR * float(eps_max) / max(int(steps), 1)


def step_size_for(eps, steps: int, step_size: float | None = None) -> float:
    """``step_size`` if configured, else ``default_step_size`` for the largest radius of ``eps``
    (a float or a tensor of radii, read as a tensor: a Python float is rounded to float32 as the
    inputs are; an empty batch counts as radius 0). Callers holding one Python float radius call
    ``default_step_size`` directly."""
    if step_size is not None:
        return float(step_size)
    eps_t = torch.as_tensor(eps)
    return default_step_size(float(eps_t.max()) if eps_t.numel() else 0.0, steps)


def pgd(
    model: nn.Sequential,
    x: torch.Tensor,
    y: torch.Tensor,
    eps,
    steps: int,
    step_size: float,
    weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    loss: str = "ce",
) -> torch.Tensor:
    """Adversarial inputs: (B, C, H, W), or (P, B, C, H, W) for weights (P, D); detached.

    eps is a float or a (B,) tensor; ``generator`` (CPU torch.Generator, e.g. from
    ``mpigls.numerics.noise.torch_generator``) enables a uniform random start, none starts at x.
    """
    if loss not in LOSSES:
        raise ValueError(f"pgd loss must be one of {list(LOSSES)}, got {loss!r}")
    if steps < 0 or step_size < 0:
        raise ValueError(f"pgd needs steps >= 0 and step_size >= 0, got steps={steps}, step_size={step_size}")
    x = x.detach()
    eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    eps_t = eps_t.expand(x.shape[0]).reshape(-1, 1, 1, 1) if eps_t.ndim <= 1 else eps_t
    lo, hi = (x - eps_t).clamp(0, 1), (x + eps_t).clamp(0, 1)
    stacked = weights is not None and weights.ndim == 2
    if weights is not None:
        weights = weights.detach()
    if stacked:
        lo, hi = lo.unsqueeze(0), hi.unsqueeze(0)
    start = x
    if generator is not None:
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        start = x + (2 * noise - 1) * eps_t
    x_adv = start.expand(weights.shape[0], *x.shape) if weights is not None and stacked else start
    x_adv = torch.maximum(torch.minimum(x_adv, hi), lo).detach()
    for _ in range(steps):
        with torch.enable_grad():
            x_adv.requires_grad_(True)
            logits = forward(model, x_adv, weights)
            if loss == "ce":
                flat = logits.reshape(-1, logits.shape[-1])  # members stacked along the batch
                obj = F.cross_entropy(flat, y.repeat(flat.shape[0] // y.numel()), reduction="sum")
            else:
                obj = -margins(logits, y).min(-1).values.sum()
            (grad,) = torch.autograd.grad(obj, x_adv)
        x_adv = x_adv.detach() + step_size * grad.sign()
        x_adv = torch.maximum(torch.minimum(x_adv, hi), lo)
    return x_adv.detach()
