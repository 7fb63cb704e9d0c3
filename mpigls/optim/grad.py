"""GRAD: the plain backprop baseline (the paper's GRAD columns), as a pure state -> state update.

The training loop backpropagates the certified loss of the current batch through the chosen
relaxation (data-parallel: each rank its share, then an exact all-reduce), and hands the mean
gradient (D,) to ``tell``, which clips it to a global L2 norm, adds weight decay and takes an
Adam / ClipUp / SGD step (steprules). We MINIMISE the loss. Paper App. B.1: Adam, lr 5e-5, decay
x0.2 after epochs 50 and 60 on MNIST (schedules.lr_at). A non-finite gradient skips the step
("grad/skipped" = 1; the generation still advances).

Shapes: D parameters.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from mpigls.optim import steprules

__all__ = ["GRADParams", "GRADState", "init", "tell", "state_to_dict", "state_from_dict"]


@dataclass(frozen=True, kw_only=True)
class GRADParams:
    lr: float = 5e-5
    step_rule: str = "adam"            # "adam" | "clipup" | "sgd"
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    max_speed: float | None = None     # ClipUp max speed; None: 2 * lr
    momentum: float = 0.9              # ClipUp momentum
    grad_clip: float | None = 10.0     # global L2 norm clip; None/0: off
    weight_decay: float = 0.0          # decoupled: theta -= lr * weight_decay * theta

    def __post_init__(self):
        steprules.check_positive("lr", self.lr)
        if self.grad_clip is not None and self.grad_clip < 0:
            raise ValueError(f"optimizer.grad_clip must be >= 0 or None (off), got {self.grad_clip}")
        steprules.check_params(self)


@dataclass(frozen=True)
class GRADState:
    center: torch.Tensor            # (D,) float32
    step_state: steprules.StepState
    generation: int


def init(params: GRADParams, center: torch.Tensor) -> GRADState:
    if center.ndim != 1 or center.numel() == 0:
        raise ValueError(f"GRAD centre must be a non-empty flat vector (D,), got shape {tuple(center.shape)}")
    center = center.detach().to(torch.float32).clone()
    return GRADState(center, steprules.init(params.step_rule, center), 0)


def tell(state: GRADState, params: GRADParams, grad: torch.Tensor,
         lr: float | None = None) -> tuple[GRADState, dict]:
    """One step with the loss gradient ``grad`` (D,); returns (new state, metrics)."""
    if grad.shape != state.center.shape:
        raise ValueError(f"GRAD tell needs grad of shape {tuple(state.center.shape)}, got {tuple(grad.shape)}")
    lr = params.lr if lr is None else float(lr)
    grad = grad.detach().to(state.center.device, torch.float32)
    if not bool(torch.isfinite(grad).all()):
        return (dataclasses.replace(state, generation=state.generation + 1),
                {"grad/skipped": 1, "grad/grad_norm": math.nan, "grad/grad_clipped": 0, "grad/step_norm": 0.0,
                 "grad/lr": lr})
    center, step_state, metrics = steprules.descend(state.center, state.step_state, grad, params, lr, "grad")
    return GRADState(center, step_state, state.generation + 1), {"grad/skipped": 0, **metrics}


def state_to_dict(state: GRADState) -> dict:
    return {"center": state.center.detach().cpu().numpy().copy(), "generation": int(state.generation),
            **steprules.state_to_dict(state.step_state)}


def state_from_dict(d: dict, device: torch.device | str = "cpu") -> GRADState:
    missing = {"center", "generation", "step/t", "step/m", "step/v"} - set(d)
    if missing:
        raise ValueError(f"GRAD state dict lacks keys {sorted(missing)}; was it written by a different optimizer?")
    return GRADState(torch.as_tensor(np.asarray(d["center"], dtype=np.float32)).to(device),
                     steprules.state_from_dict(d, device=device), int(d["generation"]))
