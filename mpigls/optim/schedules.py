"""Schedules: eps annealing per batch and step decay of the learning rate per epoch.

eps annealing per batch; the step t is the 0-based generation (epoch * batches per epoch + batch):
- "constant": eps_max throughout.
- "linear": eps_start until ``start``, then linear to eps_max over ``length`` steps.
- "smooth": auto_LiRPA's SmoothedScheduler as used by CROWN-IBP / CTBench (Shi et al. 2021,
  "Fast Certified Robust Training with Short Warmup"): a polynomial t^beta ramp up to the point
  start + mid * length, then linear up to eps_max, with alpha chosen so the two pieces meet with
  the same value and slope (C^1); defaults mid = 0.25, beta = 4.
Before ``start`` eps is eps_start; from start + length on it is eps_max.

Learning rate: step decay, lr * factor ** (number of milestones <= epoch), epochs 0-based, so
milestones=(110, 130) with factor 0.4 means "x0.4 after the 110th and after the 130th epoch"
(GLS paper App. B.2 for PGPE; App. B.1: x0.2 after 50 and 60 for GRAD on MNIST).
Warm starting from a checkpoint is done by the training loop, not here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["EPS_SCHEDULES", "eps_at", "lr_at"]

EPS_SCHEDULES = ("constant", "linear", "smooth")


def eps_at(
    step: float,
    *,
    eps_max: float,
    kind: str = "smooth",
    start: float = 0,
    length: float = 0,
    eps_start: float = 0.0,
    mid: float = 0.25,
    beta: float = 4.0,
) -> float:
    """eps at global batch ``step`` for an annealing ramp from ``start`` over ``length`` steps."""
    if kind not in EPS_SCHEDULES:
        raise ValueError(f"eps schedule kind must be one of {list(EPS_SCHEDULES)}, got {kind!r}")
    if eps_max < 0 or eps_start < 0:
        raise ValueError(f"eps values must be >= 0, got eps_max={eps_max}, eps_start={eps_start}")
    if length < 0 or start < 0:
        raise ValueError(f"eps schedule start and length must be >= 0, got start={start}, length={length}")
    if not 0 < mid < 1 or beta < 1:
        raise ValueError(f"smooth eps schedule needs 0 < mid < 1 and beta >= 1, got mid={mid}, beta={beta}")
    end = start + length
    if kind == "constant" or step >= end:
        return float(eps_max)
    if step <= start:
        return float(eps_start)
    if kind == "linear":
        return float(eps_start + (eps_max - eps_start) * (step - start) / length)
    mid_step = start + mid * length
    ramp = mid_step - start
    alpha = (eps_max - eps_start) / ((end - mid_step) * beta * ramp ** (beta - 1) + ramp**beta)
    if step < mid_step:
        return float(eps_start + alpha * (step - start) ** beta)
    mid_eps = eps_start + alpha * ramp**beta
    return float(mid_eps + (eps_max - mid_eps) * (step - mid_step) / (end - mid_step))


def lr_at(epoch: float, *, lr: float, milestones: Sequence[float] = (), factor: float = 1.0) -> float:
    """Step-decayed learning rate at (0-based) ``epoch``."""
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if not factor > 0:
        raise ValueError(f"lr decay factor must be > 0, got {factor}")
    if list(milestones) != sorted(milestones):
        raise ValueError(f"lr milestones must be increasing, got {list(milestones)}")
    return float(lr * factor ** sum(1 for m in milestones if epoch >= m))
