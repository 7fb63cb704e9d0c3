"""The bound engine: certified lower bounds on the logit margins of (populations of) networks.

``margin_lower_bounds(model, x, y, eps, method, params=None, **opts)`` bounds, for every example,
the margins z_y - z_i (i != y, ascending) over [x - eps, x + eps] ∩ [0, 1] (pixel space) with
one of ``METHODS``:

- ``ibp``: interval bounds (``ibp.py``);
- ``hbox``: hybrid zonotope / box (``hbox.py``), never looser than ibp;
- ``crown-ibp``: IBP intermediate bounds + one CROWN back-substitution (``crown.py``);
- ``deeppoly`` (alias ``crown``): back-substitution for every layer (``crown.py``);
- ``alpha-crown``: DeepPoly with optimised lower ReLU slopes (``alpha_crown.py``; detached);
- ``sabr``: IBP over a small box around a PGD point (``sabr.py``; sound for that box only).

Options: ``memory_budget_mb`` (all back-substitution methods and hbox; chunking never changes
the result beyond float rounding and identical calls give identical bits); ``population``
("auto", "batched": all members in one pass, "loop": member by member; same results); deeppoly
and alpha-crown: ``conv_mode`` ("auto", "patches", "dense"), ``rows`` ("auto", "packed",
"groups", "padded"; see ``crown.intermediate_bounds``); alpha-crown: ``alpha_steps``,
``alpha_lr``; sabr: ``sabr_lambda``, ``pgd_steps``, ``pgd_step_size``, ``generator``.

Shapes: P population, D parameters, B batch, K classes.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..population import stack
from . import alpha_crown, crown, hbox, ibp, patches, sabr
from .common import DEFAULT_MEMORY_BUDGET_MB, Problem, input_box, plan_chunks

__all__ = ["METHODS", "SOUND_METHODS", "margin_lower_bounds", "make_problem"]

METHODS = ("ibp", "hbox", "crown-ibp", "deeppoly", "crown", "alpha-crown", "sabr")
# Sound over the whole eps box, so they may certify; sabr bounds only a small box around a PGD
# point (a training loss, never a certificate).
SOUND_METHODS = tuple(m for m in METHODS if m != "sabr")

_OPTIONS = {
    "ibp": (),
    "hbox": (),
    "crown-ibp": (),
    "deeppoly": ("conv_mode", "rows"),
    "crown": ("conv_mode", "rows"),
    "alpha-crown": ("alpha_steps", "alpha_lr", "conv_mode", "rows"),
    "sabr": ("sabr_lambda", "pgd_steps", "pgd_step_size", "generator"),
}


POPULATION_MODES = ("auto", "batched", "loop")


def _member_loop(method: str, population: str, num_members: int) -> bool:
    """Whether to bound member by member. "auto" is batched: measured on CPU (CNN3 MNIST, P=8,
    B=128, tools/bench_generation.py --options population=loop|batched) the two are within
    noise for deeppoly, whose row work runs per member anyway (rows.py); batched keeps ibp and
    crown-ibp in single passes. Not measured on GPU."""
    if population != "auto":
        return population == "loop"
    return False


# Share of memory_budget_mb for the per-(member, example) state that lives through a whole call
# (pre-activation bounds, relaxations, window tables); the engines chunk their rows in the rest.
_STATE_SHARE = 0.4
# Floats of state per hidden neuron and (member, example): IBP and refined bounds (4), the
# relaxation (3), IBP temporaries (4) and one spare.
_STATE_PER_NEURON = 12


def _state_chunks(prob: Problem, method: str) -> tuple[int, int]:
    """(members, examples) per chunk so that the state of a chunk fits its share of the budget."""
    net = prob.net
    hidden = sum(math.prod(layer.out_shape) for layer in net.layers[:-1])
    per_pair = _STATE_PER_NEURON * hidden + 4 * math.prod(prob.x.shape[1:])
    if method in ("deeppoly", "crown", "alpha-crown"):
        for k in range(1, len(net.layers) - 1):
            if all(layer.is_conv for layer in net.layers[:k + 1]):
                per_pair += 3 * math.prod(net.layers[k].out_shape[1:]) * patches.patch_numel(net, k)[1]
    pc, bc, _ = plan_chunks(net.num_members, prob.x.shape[0], 1, per_pair,
                            prob.memory_budget_mb * _STATE_SHARE, work_factor=1)
    return pc, bc


def _chunked(model, x, y, eps, method, params, prob: Problem, pc: int, bc: int, budget: float, opts):
    """The bounds of (member, example) chunks, each computed alone (bounds are per pair)."""
    eps_b = prob.eps.view(-1)
    num_p, num_b = prob.net.num_members, x.shape[0]
    out_p = []
    for p0 in range(0, num_p, pc):
        sub_params = None if params is None else (params if params.ndim == 1 else params[p0:p0 + pc])
        out_b = []
        for b0 in range(0, num_b, bc):
            res = margin_lower_bounds(model, x[b0:b0 + bc], y[b0:b0 + bc], eps_b[b0:b0 + bc], method,
                                      sub_params, memory_budget_mb=budget, population="batched", **opts)
            out_b.append(res if res.ndim == 3 else res[None])
        out_p.append(torch.cat(out_b, 1))
    return torch.cat(out_p, 0)


def make_problem(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, eps, params=None,
                 memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB) -> Problem:
    """Validate the inputs and build the normalised input box."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"x must be a (B, C, H, W) tensor of pixels in [0, 1], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    batch = x.shape[0]
    y = torch.as_tensor(y, device=x.device)
    if y.shape != (batch,) or y.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"y must be an integer tensor of shape ({batch},), got {tuple(y.shape)} {y.dtype}")
    eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    if eps_t.ndim == 0:
        eps_t = eps_t.expand(batch)
    if eps_t.shape != (batch,):
        raise ValueError(f"eps must be a float or a tensor of shape ({batch},), got shape {tuple(eps_t.shape)}")
    if bool((eps_t < 0).any()) or not bool(torch.isfinite(eps_t).all()):
        raise ValueError(f"eps must be finite and non-negative, got {eps_t.tolist()}")
    if memory_budget_mb is None or not float(memory_budget_mb) > 0:
        raise ValueError(f"memory_budget_mb must be positive, got {memory_budget_mb}; use e.g. 1024")
    net = stack(model, params, tuple(x.shape[1:]))
    num_k = net.layers[-1].out_shape[0]
    if batch and (int(y.min()) < 0 or int(y.max()) >= num_k):
        raise ValueError(f"labels y must lie in [0, {num_k}), got min {int(y.min())} max {int(y.max())}")
    eps_t = eps_t.view(batch, 1, 1, 1)
    lo, hi = input_box(x, eps_t, net)
    return Problem(net, x, y.long(), eps_t, lo, hi, float(memory_budget_mb))


def margin_lower_bounds(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, eps, method: str,
                        params: torch.Tensor | None = None, **opts) -> torch.Tensor:
    """Lower bounds on z_y - z_i, i != y ascending: (B, K-1), or (P, B, K-1) for params (P, D)."""
    if method not in _OPTIONS:
        raise ValueError(f"unknown bound method {method!r}; choose one of {list(METHODS)}")
    budget = opts.pop("memory_budget_mb", DEFAULT_MEMORY_BUDGET_MB)
    population = opts.pop("population", "auto")
    if population not in POPULATION_MODES:
        raise ValueError(f"population must be one of {list(POPULATION_MODES)}, got {population!r}")
    unknown = sorted(set(opts) - set(_OPTIONS[method]))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; allowed: "
                         f"{['memory_budget_mb', 'population', *_OPTIONS[method]]}")
    if params is not None and params.ndim == 2 and _member_loop(method, population, params.shape[0]):
        return torch.stack([margin_lower_bounds(model, x, y, eps, method, p, memory_budget_mb=budget, **opts)
                            for p in params])
    prob = make_problem(model, x, y, eps, params, budget)
    pc, bc = _state_chunks(prob, method) if method != "sabr" else (prob.net.num_members, x.shape[0])
    if (pc, bc) != (prob.net.num_members, x.shape[0]):
        out = _chunked(model, x, y, eps, method, params, prob, pc, bc, budget, opts)
        return out[0] if prob.net.single else out
    prob = dataclasses.replace(prob, memory_budget_mb=budget * (1 - _STATE_SHARE))
    if method == "ibp":
        out = ibp.bound(prob)
    elif method == "hbox":
        out = hbox.bound(prob)
    elif method == "crown-ibp":
        out = crown.bound(prob, refine=False)
    elif method in ("deeppoly", "crown"):
        out = crown.bound(prob, refine=True, **opts)
    elif method == "alpha-crown":
        out = alpha_crown.bound(prob, **opts)
    else:
        out = sabr.bound(model, prob, params, **opts)
    return out[0] if prob.net.single else out
