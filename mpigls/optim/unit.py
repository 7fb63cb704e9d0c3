"""What an optimizer is to the training loop: one record of a few functions (``Optimizer``).

The loop (mpigls.run.train) knows no optimizer by name. Per generation it calls, on every rank,

    local                    = opt.evaluate(work, state, params, my_blocks)  # this rank's blocks only
    all_losses, red, agreed  = opt.exchange(comm, work, state, params, local, control)  # collectives
    state, metrics           = opt.tell(work, state, params, all_losses, red, lr)

where ``my_blocks`` are this rank's indices among ``ceil(num_items / block_size)`` fixed-size
blocks of the generation's work items (``num_items``: PGPE pairs, RGS samples, GRAD examples).
The blocks do not depend on the number of ranks, and ``exchange`` must combine the ranks' parts
exactly (fixed-point / integer sums, gathers in global order), so every rank gets the same bits
for any world size. ``tell`` is pure and the same on every rank.

``control`` (``Control``) carries the loop's per-generation flags (a rank's evaluation was cut short
by a stop signal; a stop was requested). ``exchange`` agrees on them in its FIRST collective, the
one all-gather of the losses (``gather_losses``: ``comm.allgather_head``), so a generation's scalars
cost one collective however many flags ride along. When the agreed ``cut_short`` is set, the
generation is dropped: ``exchange`` makes no further collective and returns ``red = None``.

State: one frozen dataclass per optimizer with at least ``center`` (θ, (D,) float32) and
``generation``; ``sigma`` (D,) when the optimizer has one. ``state_to_dict`` returns a flat dict of
numpy arrays and scalars holding ``center``, ``generation``, ``sigma`` (if any) and the rest of the
state; the checkpoint stores θ, σ and the generation once and the rest under /optimizer.

Hyperparameters (``params`` everywhere in optim/ and train.py): one frozen, kw-only dataclass per
optimizer whose fields carry ONE default, whose ``__post_init__`` is the ONE validation, and whose
field metadata "help" documents the key. The config section ``optimizer`` is ``name`` +
``LoopParams`` + the chosen optimizer's Params fields (mpigls.config builds it from these classes).

This module imports neither mpigls.parallel nor mpigls.run.checkpoint; ``comm`` is anything with the
collectives the optimizer uses (allgather_concat, allreduce_sum_exact, allreduce_sum_int, ...).

Shapes: D parameters, n points.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mpigls.optim.params import LoopParams, help_of, param

__all__ = [
    "param",
    "help_of",
    "LoopParams",
    "Work",
    "Control",
    "Optimizer",
    "block_items",
    "num_blocks",
    "exact_row_sum",
    "gather_losses",
    "split_state",
    "join_state",
]


@dataclass(frozen=True)
class Work:
    """What an optimizer's ``evaluate`` may use in one generation (built by the loop).

    ``loss(points, examples=slice(None))``: losses (n,) of the parameter vectors ``points`` (n, D)
    on the generation's batch examples ``examples``, without gradients. ``chunks``: example chunks
    per member (``optimizer.batch_chunks``, mpigls.parallel.work). ``grad(points, examples)``: per-row
    loss gradients (n, D) and losses (n,) at ``points`` on the batch examples ``examples`` (a slice; ``slice(None)``: all).
    ``resource``: what the optimizer's ``open`` returned (e.g. PGPE's noise source), or None.
    """

    seed: int
    device: torch.device
    block_size: int
    batch_size: int
    loss: Callable[..., torch.Tensor]
    grad: Callable[[torch.Tensor, slice], tuple[torch.Tensor, torch.Tensor]]
    resource: Any = None
    chunks: int = 1


@dataclass(frozen=True)
class Control:
    """The loop's flags of one generation; ``gather_losses`` ORs them over the ranks.

    ``cut_short``: this rank's evaluation ended early on a stop signal (the generation is dropped).
    ``stop``: a stop was requested on this rank (the generation completes, is checkpointed, the run
    ends). ``extra`` are the optimizer's own scalars agreed in the same collective (their max).
    """

    cut_short: bool = False
    stop: bool = False

    def head(self) -> list[float]:
        return [float(self.cut_short), float(self.stop)]

    @classmethod
    def from_head(cls, head: Sequence[float]) -> Control:
        return cls(cut_short=head[0] > 0, stop=head[1] > 0)


def _no_resource(seed: int, device: torch.device, params: Any) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Optimizer:
    """An optimizer as one unit: its Params class and the functions the loop calls (module docstring).

    ``open(seed, device, params)`` is a context manager kept open for the whole run; what it yields
    is ``Work.resource``. The loop keeps the state on the training device (``to_device``), so
    ``tell`` runs there. Register a new one with one line in ``mpigls.optim.registry.OPTIMIZERS``.
    """

    name: str
    Params: type
    init: Callable[[Any, torch.Tensor], Any]  # (params, theta0 (D,)) -> state
    num_items: Callable[[Any, int], int]  # (params, batch_size) -> work items
    evaluate: Callable[[Work, Any, Any, Sequence[int]], Any]  # (work, state, params, blocks) -> local
    # (comm, work, state, params, local, control) -> (all_losses, reduced or None, agreed control)
    exchange: Callable[[Any, Work, Any, Any, Any, Control], tuple[torch.Tensor, Any, Control]]
    tell: Callable[[Work, Any, Any, torch.Tensor, Any, float], tuple[Any, dict]]
    state_to_dict: Callable[[Any], dict]
    state_from_dict: Callable[[dict], Any]
    open: Callable[[int, torch.device, Any], contextlib.AbstractContextManager] = _no_resource


def to_device(state: Any, device: torch.device | str) -> Any:
    """``state`` (a frozen dataclass, possibly nested) with every tensor moved to ``device``."""
    changes = {}
    for f in dataclasses.fields(state):
        value = getattr(state, f.name)
        if isinstance(value, torch.Tensor):
            changes[f.name] = value.to(device)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            changes[f.name] = to_device(value, device)
    return dataclasses.replace(state, **changes)


def block_items(block: int, block_size: int, num_items: int) -> range:
    """The work items of ``block``: [block * block_size, min((block + 1) * block_size, num_items))."""
    return range(block * block_size, min((block + 1) * block_size, num_items))


def num_blocks(num_items: int, block_size: int) -> int:
    return math.ceil(num_items / block_size)


def exact_row_sum(comm: Any, rows: list[torch.Tensor], num_params: int) -> torch.Tensor:
    """Sum (D,) of all ranks' rows (each (k, D) float32 CPU), bitwise independent of how the rows
    are split over ranks (``comm.allreduce_sum_exact``: fixed point)."""
    stacked = torch.cat(rows) if rows else torch.zeros(0, num_params)
    return comm.allreduce_sum_exact(stacked.reshape(-1, num_params))


def gather_losses(
    comm: Any, parts: list[torch.Tensor] | torch.Tensor, control: Control, extra: Sequence[float] = ()
) -> tuple[torch.Tensor, Control, list[float]]:
    """ONE all-gather: (all ranks' float64 losses concatenated in global (block) order, the agreed
    ``control``, the max over ranks of each ``extra`` scalar)."""
    if isinstance(parts, torch.Tensor):
        body = parts
    else:
        body = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    top, losses = comm.allgather_head([*control.head(), *extra], body.to(torch.float64))
    return losses, Control.from_head(top[:2]), top[2:]


def split_state(opt: Optimizer, state: Any) -> tuple[np.ndarray, np.ndarray | None, int, dict]:
    """(θ, σ or None, generation, the rest) of a state: what a checkpoint stores once each."""
    d = dict(opt.state_to_dict(state))
    theta = np.asarray(d.pop("center"), dtype=np.float32)
    sigma = d.pop("sigma", None)
    return theta, None if sigma is None else np.asarray(sigma, dtype=np.float32), int(d.pop("generation")), d


def join_state(opt: Optimizer, theta: np.ndarray, sigma: np.ndarray | None, generation: int, rest: dict) -> Any:
    """Inverse of ``split_state``."""
    d = {**rest, "center": theta, "generation": int(generation)}
    if sigma is not None:
        d["sigma"] = sigma
    return opt.state_from_dict(d)
