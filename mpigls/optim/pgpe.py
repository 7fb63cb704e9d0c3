"""PGPE: Policy Gradients with Parameter-based Exploration on the Gaussian-smoothed loss.

Sehnke et al. 2010, "Parameter-exploring policy gradients" (Neural Networks 23(4)); used as the
zeroth-order Gaussian Loss Smoothing optimizer in Zhang et al., "Gaussian Loss Smoothing Enables
Certified Training with Tight Convex Relaxations" (arXiv 2403.07095, Sec. 3.1, Eq. for
grad_theta / grad_sigma). We MINIMISE the loss L; L_sigma(theta) = E_z L(theta + sigma*z).

One generation with n = popsize/2 antithetic pairs j, z_j ~ N(0, I_D) and eps_j = sigma * z_j:
    r+_j = L(theta + eps_j),   r-_j = L(theta - eps_j)          losses ordered [+0,-0,+1,-1,...]
    u = shaping(r)  (centered ranks / normalized / raw, over the valid members)
    g_theta = 1/n * sum_j (u+_j - u-_j) / (2 sigma) * z_j         (raw: unbiased for grad L_sigma)
    g_sigma = 1/n * sum_j ((u+_j + u-_j)/2 - b) * (z_j^2 - 1) / sigma,   b = mean of all u
The centre takes a step-rule step (Adam or ClipUp) along g_theta, plus decoupled weight decay.
sigma takes the paper's step sigma <- sigma - sigma_lr * sum_j (...)(eps_j^2 - sigma^2)/sigma / n,
which equals sigma - sigma_lr * sigma^2 * g_sigma: the scale-free (natural-gradient-like) form of
the paper and EvoTorch, so that sigma_lr means a relative change whatever the size of sigma. The
relative change per step is bounded by sigma_max_change (EvoTorch: 0.2), then sigma is clamped
to [sigma_min, sigma_max].

Non-finite losses (an overflowing bound): a pair with a non-finite member gets zero weight in
both gradients and is left out of the shaping, the baseline and the 1/n normalisation (n counts
the valid pairs). The count is reported as "pgpe/num_nonfinite". If no pair is valid the step
is skipped ("pgpe/skipped" = 1): centre, sigma and optimizer moments stay, but the generation
still advances, so the next call draws fresh noise and generation == number of tell calls.

Identical bits on every rank: tell regenerates z_j for ALL j from mpigls.noise in fixed-size
chunks of NOISE_CHUNK members (a constant, independent of the world size) and accumulates
sequentially in float64 with separate multiply and add (no fused or reordered reductions).

Shapes: P population (popsize), n pairs (P/2), D parameters.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mpigls import noise
from mpigls.optim import shaping, steprules

__all__ = ["NOISE_CHUNK", "PGPEParams", "PGPEState", "init", "ask", "gradients", "tell",
           "state_to_dict", "state_from_dict"]

NOISE_CHUNK = 64


@dataclass(frozen=True, kw_only=True)
class PGPEParams(steprules.StepRuleParams):
    """PGPE hyperparameters (defaults: the GLS paper, Sec. 4 and App. B.2, and EvoTorch)."""

    popsize: int = 256                 # P, even: P/2 antithetic pairs
    lr: float = 3e-4                   # centre step size (Adam lr, or ClipUp step size)
    sigma_init: float = 1e-3           # initial per-parameter standard deviation
    sigma_lr: float = 0.1              # sigma learning rate (relative, see module docstring)
    sigma_max_change: float | None = 0.2   # max relative change of sigma per step; None: unbounded
    sigma_min: float = 1e-8            # lower clamp of sigma (> 0)
    sigma_max: float = math.inf        # upper clamp of sigma
    fixed_sigma: bool = False          # keep sigma at sigma_init
    fitness_shaping: str = "centered_ranks"   # "centered_ranks" | "normalized" | "raw"

    def __post_init__(self):
        if not isinstance(self.popsize, int) or self.popsize < 2 or self.popsize % 2:
            raise ValueError(f"optimizer.popsize must be an even integer >= 2 for antithetic sampling, "
                             f"got {self.popsize!r}; use e.g. {max(2, int(self.popsize) + int(self.popsize) % 2)}")
        steprules.check_positive("sigma_init", self.sigma_init)
        steprules.check_positive("sigma_min", self.sigma_min)
        if self.sigma_lr < 0:
            raise ValueError(f"optimizer.sigma_lr must be >= 0, got {self.sigma_lr}")
        if self.sigma_max_change is not None and not self.sigma_max_change > 0:
            raise ValueError(f"optimizer.sigma_max_change must be > 0 or None (unbounded), got {self.sigma_max_change}")
        if not self.sigma_min <= self.sigma_init <= self.sigma_max:
            raise ValueError(f"optimizer.sigma_init={self.sigma_init} must lie in [sigma_min, sigma_max] = "
                             f"[{self.sigma_min}, {self.sigma_max}]; change one of the three")
        steprules.check_params(self)
        shaping.check_shaping(self.fitness_shaping)


@dataclass(frozen=True)
class PGPEState:
    center: torch.Tensor            # (D,) float32, theta
    sigma: torch.Tensor             # (D,) float32
    step_state: steprules.StepState
    generation: int


def init(params: PGPEParams, center: torch.Tensor) -> PGPEState:
    """Initial state around ``center`` (D,) (copied, float32)."""
    if center.ndim != 1 or center.numel() == 0:
        raise ValueError(f"PGPE centre must be a non-empty flat vector (D,), got shape {tuple(center.shape)}")
    center = center.detach().to(torch.float32).clone()
    return PGPEState(center, torch.full_like(center, params.sigma_init),
                     steprules.init(params.step_rule, center), 0)


def ask(state: PGPEState, params: PGPEParams, seed: int, pairs: Sequence[int]) -> torch.Tensor:
    """Population rows for the given pairs: (2*len(pairs), D), rows [theta+eps_j, theta-eps_j] per j."""
    pairs = [int(j) for j in pairs]
    bad = [j for j in pairs if not 0 <= j < params.popsize // 2]
    if bad:
        raise ValueError(f"PGPE pair indices must be in [0, {params.popsize // 2}), got {bad[:5]}")
    num_params = state.center.numel()
    z = noise.noise_block(seed, state.generation, pairs, num_params, noise.STREAM_PGPE).to(state.center.device)
    eps = state.sigma * z
    return torch.stack([state.center + eps, state.center - eps], dim=1).reshape(-1, num_params)


def _check_losses(losses: torch.Tensor, params: PGPEParams) -> torch.Tensor:
    losses = torch.as_tensor(losses)
    if losses.shape != (params.popsize,):
        raise ValueError(f"PGPE tell needs one loss per member, shape ({params.popsize},), got {tuple(losses.shape)}")
    return losses.detach().to("cpu", torch.float64)


def gradients(state: PGPEState, params: PGPEParams, seed: int, losses: torch.Tensor, with_sigma: bool = True):
    """Estimates (g_theta (D,), g_sigma (D,), num_valid_pairs) as float64 CPU tensors.

    With fitness_shaping="raw", g_theta is an unbiased estimate of grad L_sigma(theta) and g_sigma
    one of dL_sigma/dsigma (up to the O(1/n) effect of the sample-mean baseline). Returns
    (None, None, 0) when no pair has two finite losses; g_sigma is None when not ``with_sigma``.
    """
    r = _check_losses(losses, params)
    num_pairs = params.popsize // 2
    valid = (torch.isfinite(r[0::2]) & torch.isfinite(r[1::2]))          # (n,)
    num_valid = int(valid.sum())
    if num_valid == 0:
        return None, None, 0
    member_valid = valid.repeat_interleave(2)                            # (P,)
    u = torch.zeros_like(r)
    u[member_valid] = shaping.shape(r[member_valid], params.fitness_shaping).to(torch.float64)
    baseline = u[member_valid].mean()
    zero = torch.zeros((), dtype=torch.float64)
    w_center = torch.where(valid, (u[0::2] - u[1::2]) / 2, zero)         # (n,)
    w_sigma = torch.where(valid, (u[0::2] + u[1::2]) / 2 - baseline, zero)
    num_params = state.center.numel()
    acc_center = torch.zeros(num_params, dtype=torch.float64)
    acc_sigma = torch.zeros(num_params, dtype=torch.float64)
    for start in range(0, num_pairs, NOISE_CHUNK):
        members = range(start, min(num_pairs, start + NOISE_CHUNK))
        block = noise.noise_block(seed, state.generation, members, num_params, noise.STREAM_PGPE)
        for row, j in enumerate(members):
            if not bool(valid[j]):
                continue
            z = block[row].to(torch.float64)
            # product rounded, then sum rounded: plain IEEE elementwise ops, same bits everywhere
            acc_center += float(w_center[j]) * z
            if with_sigma:
                acc_sigma += float(w_sigma[j]) * z.mul_(z).sub_(1.0)
    sigma = state.sigma.detach().to("cpu", torch.float64)
    return (acc_center / (num_valid * sigma), acc_sigma / (num_valid * sigma) if with_sigma else None, num_valid)


def _sigma_step(sigma: torch.Tensor, grad_sigma: torch.Tensor, params: PGPEParams):
    """New sigma (float64) and the fraction of entries held by the relative-change bound."""
    proposed = sigma - params.sigma_lr * sigma * sigma * grad_sigma
    clipped = 0.0
    if params.sigma_max_change is not None:
        low = sigma * (1.0 - params.sigma_max_change)
        high = sigma * (1.0 + params.sigma_max_change)
        clipped = float(((proposed < low) | (proposed > high)).double().mean())
        proposed = torch.minimum(torch.maximum(proposed, low), high)
    return proposed.clamp(min=params.sigma_min, max=params.sigma_max), clipped


def tell(state: PGPEState, params: PGPEParams, seed: int, losses: torch.Tensor,
         lr: float | None = None) -> tuple[PGPEState, dict]:
    """Update from the full population's losses (P,) ordered [+0,-0,+1,-1,...].

    ``lr`` overrides params.lr (schedules). Returns (new state, metrics); inputs are not mutated.
    """
    r = _check_losses(losses, params)
    lr = params.lr if lr is None else float(lr)
    finite = r[torch.isfinite(r)]
    metrics = {"pgpe/num_nonfinite": int(r.numel() - finite.numel()), "pgpe/lr": lr,
               "pgpe/loss_mean": float(finite.mean()) if finite.numel() else math.nan,
               "pgpe/loss_min": float(finite.min()) if finite.numel() else math.nan}
    grad_center, grad_sigma, num_valid = gradients(state, params, seed, r, with_sigma=not params.fixed_sigma)
    metrics["pgpe/num_valid_pairs"] = num_valid
    if num_valid == 0:
        metrics.update({"pgpe/skipped": 1, "pgpe/grad_norm": math.nan, "pgpe/grad_sigma_norm": math.nan,
                        "pgpe/step_norm": 0.0, "pgpe/sigma_clipped_frac": 0.0, **_sigma_metrics(state.sigma)})
        return dataclasses.replace(state, generation=state.generation + 1), metrics
    device = state.center.device
    grad = grad_center.to(torch.float32).to(device)
    delta, step_state = steprules.step(params, state.step_state, grad, lr)
    center = steprules.decay(state.center, delta, lr, params.weight_decay)
    sigma, clipped = state.sigma, 0.0
    if not params.fixed_sigma:
        new_sigma, clipped = _sigma_step(state.sigma.detach().to("cpu", torch.float64), grad_sigma, params)
        sigma = new_sigma.to(torch.float32).to(device)
    metrics.update({"pgpe/skipped": 0, "pgpe/grad_norm": float(torch.linalg.vector_norm(grad)),
                    "pgpe/grad_sigma_norm": (math.nan if grad_sigma is None
                                             else float(torch.linalg.vector_norm(grad_sigma))),
                    "pgpe/step_norm": float(torch.linalg.vector_norm(delta)),
                    "pgpe/sigma_clipped_frac": clipped, **_sigma_metrics(sigma)})
    return PGPEState(center, sigma, step_state, state.generation + 1), metrics


def _sigma_metrics(sigma: torch.Tensor) -> dict:
    return {"pgpe/sigma_mean": float(sigma.mean()), "pgpe/sigma_min": float(sigma.min()),
            "pgpe/sigma_max": float(sigma.max())}


def state_to_dict(state: PGPEState) -> dict:
    """Flat dict of numpy arrays and Python scalars (for the HDF5 checkpoint)."""
    return {"center": state.center.detach().cpu().numpy().copy(),
            "sigma": state.sigma.detach().cpu().numpy().copy(),
            "generation": int(state.generation), **steprules.state_to_dict(state.step_state)}


def state_from_dict(d: dict, device: torch.device | str = "cpu") -> PGPEState:
    """Inverse of state_to_dict; tensors are placed on ``device``."""
    missing = {"center", "sigma", "generation", "step/t", "step/m", "step/v"} - set(d)
    if missing:
        raise ValueError(f"PGPE state dict lacks keys {sorted(missing)}; was it written by a different optimizer?")
    return PGPEState(torch.as_tensor(np.asarray(d["center"], dtype=np.float32)).to(device),
                     torch.as_tensor(np.asarray(d["sigma"], dtype=np.float32)).to(device),
                     steprules.state_from_dict(d, device=device), int(d["generation"]))
