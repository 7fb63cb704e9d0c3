"""Training losses: robust cross-entropy from margin bounds, natural CE, PGD and mixed losses.

robust_ce(lb) = mean_b log(1 + sum_i exp(-lb_bi)), the cross-entropy of the logits [0, -lb] for
target 0 (Wong & Kolter 2018; Gowal et al. 2018): an upper bound of the worst-case CE whenever
lb is a sound margin bound. ``certified_loss`` dispatches on ``method``:

- a relaxation of the bound registry (``mpigls.bounds.METHODS`` and any registered later):
  robust_ce of its margin bounds;
- "natural": CE on clean inputs; "pgd": CE on PGD inputs (Madry et al. 2018);
- "staps": (1 - staps_mix) * CE at the PGD point + staps_mix * robust_ce of SABR bounds around
  it — a convex mix of adversarial and small-box certified losses in the spirit of STAPS
  (Mao et al. 2023, arXiv 2305.04574) and expressive losses (De Palma et al. 2024); the
  TAPS-style split of the network into a bounded extractor and an attacked head is not done.

Shapes: P population, D weights (parameters of one network), B batch, K classes.
"""

from __future__ import annotations

import torch
from torch import nn

from mpigls import bounds
from mpigls.nn.attacks import pgd, step_size_for
from mpigls.nn.population import forward, renamed_weights

__all__ = ["LOSS_METHODS", "OTHER_LOSSES", "robust_ce", "natural_ce", "certified_loss"]

# The losses that bound nothing or mix an attack in, then the built-in relaxations.
OTHER_LOSSES = ("natural", "pgd", "staps")
LOSS_METHODS = OTHER_LOSSES + bounds.METHODS
_PGD_OPTS = ("pgd_steps", "pgd_step_size", "generator")


def robust_ce(lb: torch.Tensor) -> torch.Tensor:
    """(..., B, K-1) margin lower bounds -> (...) mean over the batch of CE([0, -lb], 0)."""
    zero = torch.zeros(*lb.shape[:-1], 1, dtype=lb.dtype, device=lb.device)
    return torch.logsumexp(torch.cat([zero, -lb], -1), -1).mean(-1)


def natural_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(..., B, K) logits, (B,) labels -> (...) mean cross-entropy over the batch."""
    logp = torch.log_softmax(logits, -1)
    return -logp.gather(-1, y.view(-1, 1).expand(*logits.shape[:-1], 1)).squeeze(-1).mean(-1)


def _pgd_point(model, x, y, eps, weights, opts):
    steps = int(opts.get("pgd_steps", 8))
    step = step_size_for(eps, steps, opts.get("pgd_step_size"))
    return pgd(model, x, y, eps, steps, step, weights, opts.get("generator"))


def certified_loss(
    model: nn.Sequential,
    x: torch.Tensor,
    y: torch.Tensor,
    eps,
    method: str,
    weights: torch.Tensor | None = None,
    *,
    params: torch.Tensor | None = None,
    **opts,
) -> torch.Tensor:
    """Loss per member (P,) for weights (P, D), else a scalar; see the module docstring.

    ``params=`` is the deprecated name of ``weights=`` (``population.renamed_weights``).
    """
    weights = renamed_weights(weights, params, "certified_loss")
    if method not in OTHER_LOSSES and method not in bounds.registry.RELAXATIONS:
        raise ValueError(
            f"unknown loss method {method!r}; choose one of {[*OTHER_LOSSES, *bounds.registry.RELAXATIONS]}"
        )
    if method in ("natural", "pgd"):
        opts.pop("memory_budget_mb", None)  # accepted by every method; these two bound nothing
    if method == "natural":
        if opts:
            raise ValueError(f"method 'natural' takes no options, got {sorted(opts)}")
        return natural_ce(forward(model, x, weights), y)
    if method == "pgd":
        unknown = sorted(set(opts) - set(_PGD_OPTS))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for method 'pgd'; allowed: {list(_PGD_OPTS)}")
        return natural_ce(forward(model, _pgd_point(model, x, y, eps, weights, opts), weights), y)
    if method == "staps":
        mix = float(opts.pop("staps_mix", 0.5))
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"staps_mix must lie in [0, 1], got {mix}")
        budget = opts.pop("memory_budget_mb", None)
        lam = opts.pop("sabr_lambda", 0.4)
        unknown = sorted(set(opts) - set(_PGD_OPTS))
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for method 'staps'; allowed: "
                f"{['staps_mix', 'sabr_lambda', 'memory_budget_mb', *_PGD_OPTS]}"
            )
        x_adv = _pgd_point(model, x, y, eps, weights, opts)
        adv = natural_ce(forward(model, x_adv, weights), y)
        extra = {} if budget is None else {"memory_budget_mb": budget}
        lb = bounds.sabr.bound_at(model, x, y, eps, x_adv, weights, lam, **extra)
        return (1 - mix) * adv + mix * robust_ce(lb)
    return robust_ce(bounds.margin_lower_bounds(model, x, y, eps, method, weights, **opts))
