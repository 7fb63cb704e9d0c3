"""RGS: Randomized Gradient Smoothing, the first-order Gaussian Loss Smoothing optimizer.

GLS paper (arXiv 2403.07095), the RGS variant: the gradient of the smoothed loss
L_sigma(theta) = E_z L(theta + sigma*z) equals E_z grad L(theta + sigma*z) wherever L is
differentiable almost everywhere with integrable gradient, so
    g = 1/n * sum_i grad L(theta + sigma * z_i),   z_i ~ N(0, I_D)
is unbiased. Note what this needs: L must be differentiable a.e. AND its a.e. gradient must carry
the information. For a step function the a.e. gradient is 0 and RGS sees nothing (PGPE does);
this is why RGS backpropagates through a differentiable relaxation. We MINIMISE the loss.

Antithetic (optional): samples 2k and 2k+1 share the noise +z_k and -z_k.
z comes from mpigls.numerics.noise with stream STREAM_RGS, keyed by (seed, generation, k).

Division of labour: the training loop evaluates, on each rank, the backprop gradient at its slice
of ``sample_points``, sums them, and all-reduces the sum exactly (parallel.allreduce_sum_exact);
``tell`` receives that sum (D,) and divides by num_samples. Then: global-norm clipping,
weight decay, and an Adam / ClipUp / SGD step (steprules). A non-finite grad_sum skips the step
("rgs/skipped" = 1; the generation still advances).

Shapes: D parameters, n samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mpigls.numerics import noise
from mpigls.optim import grad as grad_opt, unit
from mpigls.optim.params import RGSParams

__all__ = ["RGSParams", "RGSState", "UNIT", "init", "sample_points", "tell", "state_to_dict", "state_from_dict"]


RGSState = grad_opt.GRADState  # centre, step-rule state, generation: the same as GRAD's


def init(params: RGSParams, center: torch.Tensor) -> RGSState:
    return grad_opt.init(params, center, name="RGS")


def sample_points(state: RGSState, params: RGSParams, seed: int, indices: Sequence[int]) -> torch.Tensor:
    """theta + sigma * z_i for the given sample indices: (len(indices), D)."""
    indices = [int(i) for i in indices]
    bad = [i for i in indices if not 0 <= i < params.num_samples]
    if bad:
        raise ValueError(f"RGS sample indices must be in [0, {params.num_samples}), got {bad[:5]}")
    num_params = state.center.numel()
    keys = [i // 2 for i in indices] if params.antithetic else indices
    z = noise.noise_block(seed, state.generation, keys, num_params, noise.STREAM_RGS, params.noise, state.center.device)
    if params.antithetic:
        signs = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in indices], device=z.device)
        z = z * signs[:, None]
    return state.center + params.sigma * z


def tell(state: RGSState, params: RGSParams, grad_sum: torch.Tensor, lr: float | None = None) -> tuple[RGSState, dict]:
    """Step with the mean gradient grad_sum / num_samples; returns (new state, metrics)."""
    if grad_sum.shape != state.center.shape:
        raise ValueError(f"RGS tell needs grad_sum of shape {tuple(state.center.shape)}, got {tuple(grad_sum.shape)}")
    return grad_opt.tell(state, params, grad_sum.detach().to(torch.float32) / params.num_samples, lr, prefix="rgs")


state_to_dict = grad_opt.state_to_dict


def state_from_dict(d: dict, device: torch.device | str = "cpu") -> RGSState:
    return grad_opt.state_from_dict(d, device, name="RGS")


# ----------------------------------------------------------------------------- the loop's unit


def _num_items(params: RGSParams, batch_size: int) -> int:
    return params.num_samples


def _evaluate(work: unit.Work, state: RGSState, params: RGSParams, blocks) -> grad_opt.Local:
    """Per-sample gradients (rows) and losses of this rank's blocks of samples."""
    rows, losses = [], []
    for block in blocks:
        points = sample_points(state, params, work.seed, unit.block_items(block, work.block_size, params.num_samples))
        g, loss = work.grad(points.to(work.device), slice(None))
        rows.append(g.to("cpu", torch.float32))
        losses.append(loss.to("cpu", torch.float64))
    return grad_opt.Local(rows, losses)


def _exchange(comm, work: unit.Work, state: RGSState, params: RGSParams, local: grad_opt.Local, control):
    return grad_opt.exchange_rows(comm, local, state.center.numel(), control)


def _tell(work: unit.Work, state: RGSState, params: RGSParams, all_losses, grad_sum: torch.Tensor, lr: float):
    return tell(state, params, grad_sum, lr=lr)


UNIT = unit.Optimizer(
    name="rgs",
    Params=RGSParams,
    init=init,
    num_items=_num_items,
    evaluate=_evaluate,
    exchange=_exchange,
    tell=_tell,
    state_to_dict=state_to_dict,
    state_from_dict=state_from_dict,
)
