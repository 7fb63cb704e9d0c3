"""Fitness shaping: map a population's losses to utilities, before they weight the noise.

We minimise loss, so every utility here is "loss-like": larger loss -> larger utility, and the
optimizer descends along it.

- ``centered_ranks``: the rank transform of Salimans et al. 2017 ("Evolution Strategies as a
  Scalable Alternative to RL", also EvoTorch's default for PGPE): ranks 0..P-1 scaled to
  [-0.5, 0.5]. Invariant under any strictly increasing transform of the losses; ties are broken
  by position (stable sort), so the result is deterministic. Non-finite losses get the worst
  (largest) ranks.
- ``normalized``: (r - mean) / std over the population (zero when all losses are equal).
- ``raw``: the losses themselves; with it PGPE's centre gradient is an unbiased estimate of the
  gradient of the Gaussian-smoothed loss.

Utilities are float64 (they weight a float64 accumulation in PGPE).

Shapes: P population.
"""

from __future__ import annotations

import torch

from mpigls.optim.params import SHAPINGS, check_shaping

__all__ = ["SHAPINGS", "centered_ranks", "normalized", "raw", "shape", "check_shaping"]


def centered_ranks(losses: torch.Tensor) -> torch.Tensor:
    """(P,) losses -> (P,) utilities in [-0.5, 0.5]; the lowest loss gets -0.5."""
    r = losses.to(torch.float64)
    r = torch.where(torch.isfinite(r) | (r == float("-inf")), r, torch.full_like(r, float("inf")))
    num = r.numel()
    if num <= 1:
        return torch.zeros_like(losses, dtype=torch.float64)
    order = torch.argsort(r, stable=True)
    ranks = torch.empty(num, dtype=torch.float64, device=r.device)
    ranks[order] = torch.arange(num, dtype=torch.float64, device=r.device)
    return ranks / (num - 1) - 0.5


def normalized(losses: torch.Tensor) -> torch.Tensor:
    """(P,) finite losses -> (P,) standardised utilities (population std, unbiased=False)."""
    r = losses.to(torch.float64)
    std = r.std(unbiased=False) if r.numel() > 1 else r.new_zeros(())
    if float(std) == 0.0:
        return torch.zeros_like(losses, dtype=torch.float64)
    return (r - r.mean()) / std


def raw(losses: torch.Tensor) -> torch.Tensor:
    return losses.to(torch.float64)


def shape(losses: torch.Tensor, kind: str) -> torch.Tensor:
    """Apply the shaping named ``kind`` (one of SHAPINGS)."""
    check_shaping(kind)
    return {"centered_ranks": centered_ranks, "normalized": normalized, "raw": raw}[kind](losses)
