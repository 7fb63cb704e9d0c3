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

from mpigls.optim import steprules, unit
from mpigls.optim.params import GRADParams

__all__ = ["GRADParams", "GRADState", "UNIT", "init", "tell", "state_to_dict", "state_from_dict"]


@dataclass(frozen=True)
class GRADState:
    """The state of a first-order optimizer (GRAD, and RGS which reuses it)."""

    center: torch.Tensor  # (D,) float32
    step_state: steprules.StepState
    generation: int


def init(params, center: torch.Tensor, name: str = "GRAD") -> GRADState:
    if center.ndim != 1 or center.numel() == 0:
        raise ValueError(f"{name} centre must be a non-empty flat vector (D,), got shape {tuple(center.shape)}")
    center = center.detach().to(torch.float32).clone()
    return GRADState(center, steprules.init(params.step_rule, center), 0)


def tell(
    state: GRADState, params, grad: torch.Tensor, lr: float | None = None, prefix: str = "grad"
) -> tuple[GRADState, dict]:
    """One step with the loss gradient ``grad`` (D,); returns (new state, metrics named ``prefix/...``)."""
    if grad.shape != state.center.shape:
        raise ValueError(
            f"{prefix.upper()} tell needs a gradient of shape {tuple(state.center.shape)}, got {tuple(grad.shape)}"
        )
    lr = params.lr if lr is None else float(lr)
    grad = grad.detach().to(state.center.device, torch.float32)
    if not bool(torch.isfinite(grad).all()):
        return (
            dataclasses.replace(state, generation=state.generation + 1),
            {
                f"{prefix}/skipped": 1,
                f"{prefix}/grad_norm": math.nan,
                f"{prefix}/grad_clipped": 0,
                f"{prefix}/step_norm": 0.0,
                f"{prefix}/lr": lr,
            },
        )
    center, step_state, metrics = steprules.descend(state.center, state.step_state, grad, params, lr, prefix)
    return GRADState(center, step_state, state.generation + 1), {f"{prefix}/skipped": 0, **metrics}


def state_to_dict(state: GRADState) -> dict:
    return {
        "center": state.center.detach().cpu().numpy().copy(),
        "generation": int(state.generation),
        **steprules.state_to_dict(state.step_state),
    }


def state_from_dict(d: dict, device: torch.device | str = "cpu", name: str = "GRAD") -> GRADState:
    missing = {"center", "generation", *steprules.STATE_KEYS} - set(d)
    if missing:
        raise ValueError(f"{name} state dict lacks keys {sorted(missing)}; was it written by a different optimizer?")
    return GRADState(
        torch.as_tensor(np.asarray(d["center"], dtype=np.float32)).to(device),
        steprules.state_from_dict(d, device=device),
        int(d["generation"]),
    )


# ----------------------------------------------------------------------------- the loop's unit


def _num_items(params: GRADParams, batch_size: int) -> int:
    return batch_size  # the work items are the batch's examples


@dataclass(frozen=True)
class Local:
    """This rank's blocks: their gradient rows (k, D) float32 CPU, each the block's mean gradient
    weighted by its share of the batch, and the weighted block losses (k,) float64."""

    rows: list[torch.Tensor]
    losses: list[torch.Tensor]


def _evaluate(work: unit.Work, state: GRADState, params: GRADParams, blocks) -> Local:
    B, theta = work.batch_size, state.center.to(work.device)
    rows, losses = [], []
    for block in blocks:
        items = unit.block_items(block, work.block_size, B)
        g, loss = work.grad(theta[None], slice(items.start, items.stop))
        rows.append((g * len(items) / B).to("cpu", torch.float32))  # the batch mean = sum of weighted block means
        losses.append((loss * len(items) / B).to("cpu", torch.float64))
    return Local(rows, losses)


def exchange_rows(comm, local: Local, num_params: int, control: unit.Control):
    """(all ranks' losses in block order, the exact sum (D,) of all gradient rows or None when the
    generation was cut short, the agreed control): GRAD's and RGS's exchange."""
    losses, agreed, _ = unit.gather_losses(comm, local.losses, control)
    if agreed.cut_short:  # the generation is dropped: no further collective
        return losses, None, agreed
    return losses, unit.exact_row_sum(comm, local.rows, num_params), agreed


def _exchange(comm, work: unit.Work, state: GRADState, params: GRADParams, local: Local, control):
    losses, grad, agreed = exchange_rows(comm, local, state.center.numel(), control)
    return losses.sum().reshape(1), grad, agreed


def _tell(work: unit.Work, state: GRADState, params: GRADParams, all_losses, grad: torch.Tensor, lr: float):
    return tell(state, params, grad, lr=lr)


UNIT = unit.Optimizer(
    name="grad",
    Params=GRADParams,
    init=init,
    num_items=_num_items,
    evaluate=_evaluate,
    exchange=_exchange,
    tell=_tell,
    state_to_dict=state_to_dict,
    state_from_dict=state_from_dict,
)
