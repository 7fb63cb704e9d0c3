"""Step rules that turn a loss gradient into a parameter change: Adam, ClipUp and plain SGD.

Direction convention for the whole package: we MINIMISE a loss. Every rule here returns a
``delta`` and the caller applies ``theta_new = theta - delta``; ``grad`` is always the gradient
of the loss (or an estimate of it), never of a fitness.

- Adam: Kingma & Ba 2015, "Adam: A Method for Stochastic Optimization" (Algorithm 1, with bias
  correction). The GLS paper trains PGPE with Adam at lr 3e-4.
- ClipUp: Toklu et al. 2020, "ClipUp: A Simple and Powerful Optimizer for Distribution-based
  Policy Evolution" (arXiv 2008.02387), Algorithm 1: the gradient is normalised to unit length,
  accumulated into a velocity with heavy-ball momentum, and the velocity is clipped to
  ``max_speed`` (the paper recommends max_speed = 2 * lr, our default when it is None).
- SGD: delta = lr * grad (for tests and the toy problem).

All functions are pure and elementwise (no reductions other than norms), so the same inputs give
the same bits on every rank and every thread count.

Shapes: D parameters.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from mpigls.optim.params import (
    STEP_RULES,
    StepRuleParams,
    check_params,
    check_positive,
    check_step_rule,
)

__all__ = [
    "STEP_RULES",
    "StepRuleParams",
    "StepState",
    "init",
    "adam",
    "clipup",
    "sgd",
    "apply",
    "step",
    "clip_grad_norm",
    "decay",
    "descend",
    "check_step_rule",
    "check_params",
    "check_positive",
    "state_to_dict",
    "state_from_dict",
    "STATE_KEYS",
]


@dataclass(frozen=True)
class StepState:
    """Optimizer moments of one step rule.

    t: number of steps taken. m, v: Adam's first and second moments (D,). velocity: ClipUp's
    velocity (D,). Slots the rule does not use are empty tensors of shape (0,). The names are the
    checkpoint keys ``step/t``, ``step/m``, ``step/v``, ``step/velocity`` (format 1 kept ClipUp's
    velocity in ``step/m``; mpigls.run.checkpoint migrates it).
    """

    t: int
    m: torch.Tensor
    v: torch.Tensor
    velocity: torch.Tensor


def init(rule: str, like: torch.Tensor) -> StepState:
    """Zero state for ``rule`` with tensors shaped, typed and placed like ``like`` (D,)."""
    check_step_rule(rule)
    empty = like.new_zeros(0)
    if rule == "adam":
        return StepState(0, torch.zeros_like(like), torch.zeros_like(like), empty)
    if rule == "clipup":
        return StepState(0, empty, empty.clone(), torch.zeros_like(like))
    return StepState(0, empty, empty.clone(), empty.clone())


def adam(
    state: StepState, grad: torch.Tensor, *, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8
) -> tuple[torch.Tensor, StepState]:
    """One Adam step: returns (delta (D,), new state); apply as theta - delta."""
    t = state.t + 1
    m = beta1 * state.m + (1.0 - beta1) * grad
    v = beta2 * state.v + (1.0 - beta2) * grad * grad
    m_hat = m / (1.0 - beta1**t)
    v_hat = v / (1.0 - beta2**t)
    return lr * m_hat / (v_hat.sqrt() + eps), StepState(t, m, v, state.velocity)


def clipup(
    state: StepState, grad: torch.Tensor, *, lr: float, momentum: float = 0.9, max_speed: float | None = None
) -> tuple[torch.Tensor, StepState]:
    """One ClipUp step: returns (delta (D,), new state); delta is the clipped velocity."""
    max_speed = 2.0 * lr if max_speed is None else max_speed
    norm = torch.linalg.vector_norm(grad)
    # A zero gradient (e.g. a flat loss) gives no push rather than 0/0.
    unit = grad / norm if float(norm) > 0 else torch.zeros_like(grad)
    velocity = momentum * state.velocity + lr * unit
    speed = float(torch.linalg.vector_norm(velocity))
    if speed > max_speed:
        velocity = velocity * (max_speed / speed)
    return velocity, dataclasses.replace(state, t=state.t + 1, velocity=velocity)


def sgd(state: StepState, grad: torch.Tensor, *, lr: float) -> tuple[torch.Tensor, StepState]:
    """Plain gradient descent: delta = lr * grad."""
    return lr * grad, dataclasses.replace(state, t=state.t + 1)


def apply(
    rule: str,
    state: StepState,
    grad: torch.Tensor,
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    adam_eps: float = 1e-8,
    momentum: float = 0.9,
    max_speed: float | None = None,
) -> tuple[torch.Tensor, StepState]:
    """Dispatch to ``rule``; the keyword names match the optimizer Params fields."""
    if rule == "adam":
        return adam(state, grad, lr=lr, beta1=beta1, beta2=beta2, eps=adam_eps)
    if rule == "clipup":
        return clipup(state, grad, lr=lr, momentum=momentum, max_speed=max_speed)
    if rule == "sgd":
        return sgd(state, grad, lr=lr)
    check_step_rule(rule)
    raise AssertionError("unreachable")


def step(params: StepRuleParams, state: StepState, grad: torch.Tensor, lr: float) -> tuple[torch.Tensor, StepState]:
    """``apply`` with the rule and hyperparameters of an optimizer's Params."""
    return apply(
        params.step_rule,
        state,
        grad,
        lr=lr,
        beta1=params.beta1,
        beta2=params.beta2,
        adam_eps=params.adam_eps,
        momentum=params.momentum,
        max_speed=params.max_speed,
    )


def clip_grad_norm(grad: torch.Tensor, max_norm: float | None) -> tuple[torch.Tensor, float]:
    """Scale ``grad`` down to global L2 norm ``max_norm`` (None or <= 0: no clipping).

    Returns (clipped grad, norm before clipping).
    """
    norm = float(torch.linalg.vector_norm(grad))
    if max_norm is not None and max_norm > 0 and norm > max_norm:
        return grad * (max_norm / norm), norm
    return grad, norm


def decay(center: torch.Tensor, delta: torch.Tensor, lr: float, weight_decay: float) -> torch.Tensor:
    """theta - delta - lr * weight_decay * theta: decoupled weight decay (Loshchilov & Hutter 2019,
    "Decoupled Weight Decay Regularization"), outside the step rule so Adam's scaling and
    ClipUp's normalisation do not swallow it."""
    new = center - delta
    return new - (lr * weight_decay) * center if weight_decay else new


def descend(
    center: torch.Tensor, step_state: StepState, grad: torch.Tensor, params, lr: float, prefix: str
) -> tuple[torch.Tensor, StepState, dict]:
    """Clip, take one step-rule step, apply weight decay (shared by RGS and GRAD)."""
    grad, norm = clip_grad_norm(grad, params.grad_clip)
    delta, step_state = step(params, step_state, grad, lr)
    clipped = int(params.grad_clip is not None and params.grad_clip > 0 and norm > params.grad_clip)
    metrics = {
        f"{prefix}/grad_norm": norm,
        f"{prefix}/grad_clipped": clipped,
        f"{prefix}/step_norm": float(torch.linalg.vector_norm(delta)),
        f"{prefix}/lr": lr,
    }
    return decay(center, delta, lr, params.weight_decay), step_state, metrics


def state_to_dict(state: StepState, prefix: str = "step/") -> dict:
    return {
        f"{prefix}t": int(state.t),
        f"{prefix}m": state.m.detach().cpu().numpy().copy(),
        f"{prefix}v": state.v.detach().cpu().numpy().copy(),
        f"{prefix}velocity": state.velocity.detach().cpu().numpy().copy(),
    }


STATE_KEYS = ("step/t", "step/m", "step/v", "step/velocity")


def state_from_dict(d: dict, prefix: str = "step/", device: torch.device | str = "cpu") -> StepState:
    return StepState(
        int(d[f"{prefix}t"]), *(torch.as_tensor(d[f"{prefix}{k}"]).to(device) for k in ("m", "v", "velocity"))
    )
