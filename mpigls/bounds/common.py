"""Shared pieces of the bound engine: input box, margin specification, ReLU relaxation,
linear back-substitution, the memory-budget chunk planner and the one chunk loop over
(member, example) pairs (``over_pairs``) that every relaxation uses.

Every relaxation bounds the margins m_i = z_y - z_i (i != y, ascending) of the logits z over the
box [x - eps, x + eps] intersected with [0, 1] in pixel space. Normalize is monotone per pixel,
so the box is mapped exactly to a box in normalised space and bounds start there. The final
Linear layer is merged with the margin matrix C (rows e_y - e_i) before bounding, as auto_LiRPA
does: C W and C b are bounded directly instead of subtracting logit bounds.

Back-substitution (CROWN, Zhang et al. 2018; DeepPoly, Singh et al. 2019) keeps a lower linear
bound A . h + c of the specification in terms of an earlier layer h and walks it to the input:
through an affine layer A <- A W, c <- c + A b; through a ReLU with pre-activation bounds [l, u]
A <- A+ diag(alpha) + A- diag(s), c <- c + A- t, where the upper line is s (v - l), s = u / (u - l),
t = -s l for unstable neurons and alpha is the lower slope; finally min over the input box is
A+ x_L + A- x_U = A mid - |A| rad.

Shapes: P population, B batch, S specification rows, N neurons of a layer (flattened), K classes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import nn

from mpigls.nn.margins import other_classes
from mpigls.nn.population import Stack, stack

__all__ = [
    "Problem",
    "Relax",
    "input_box",
    "margin_spec",
    "relu_relax",
    "backsubstitute",
    "concretize",
    "ibp_layer",
    "plan_chunks",
    "over_pairs",
    "run_chunked",
    "pair_state",
    "DEFAULT_MEMORY_BUDGET_MB",
]

DEFAULT_MEMORY_BUDGET_MB = 1024.0
# Working tensors alive per back-substitution row element (A, its positive/negative parts, the
# transposed-convolution input/output copies); calibrated with benchmarks/bench_bounds.py.
_WORK_FACTOR = 6


@dataclass(frozen=True)
class Problem:
    """One bounding task: network, pixel inputs, labels, radii and the normalised input box.

    ``model`` and ``weights`` are what ``net`` was built from (``population.stack``), for the
    relaxations that also run the network itself (sabr's attack).
    """

    net: Stack
    x: torch.Tensor  # (B, C, H, W) pixels
    y: torch.Tensor  # (B,)
    eps: torch.Tensor  # (B, 1, 1, 1)
    lo: torch.Tensor  # (1, B, C, H, W) normalised lower corner
    hi: torch.Tensor  # (1, B, C, H, W)
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB
    model: nn.Sequential | None = None
    weights: torch.Tensor | None = None  # None (the model's own), (D,) or (P, D)

    def members(self, p0: int, p1: int) -> Problem:
        """Members p0:p1 (every relaxation bounds each member on its own)."""
        lo = self.lo[p0:p1] if self.lo.shape[0] > 1 else self.lo
        hi = self.hi[p0:p1] if self.hi.shape[0] > 1 else self.hi
        weights = self.weights if self.weights is None or self.weights.ndim == 1 else self.weights[p0:p1]
        return dataclasses.replace(self, net=self.net.members(p0, p1), lo=lo, hi=hi, weights=weights)

    def examples(self, b0: int, b1: int) -> Problem:
        """Examples b0:b1 (every relaxation bounds each example on its own)."""
        return dataclasses.replace(
            self, x=self.x[b0:b1], y=self.y[b0:b1], eps=self.eps[b0:b1], lo=self.lo[:, b0:b1], hi=self.hi[:, b0:b1]
        )


@dataclass(frozen=True)
class Relax:
    """Linear relaxation of one ReLU layer for the lower bound: lower slope alpha, upper line s v + t.

    Tensors are (P, B, 1|S, *shape): a row axis of size 1 is shared by all specification rows.
    """

    alpha: torch.Tensor
    slope: torch.Tensor
    shift: torch.Tensor

    def rows(self, start: int, stop: int) -> Relax:
        if self.alpha.shape[2] == 1:
            return self
        return Relax(self.alpha[:, :, start:stop], self.slope, self.shift)

    def members(self, p0: int, p1: int, b0: int, b1: int) -> Relax:
        return Relax(*(t[p0:p1, b0:b1] for t in (self.alpha, self.slope, self.shift)))


def input_box(x: torch.Tensor, eps: torch.Tensor, net: Stack) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised corners (1, B, C, H, W) of [x - eps, x + eps] ∩ [0, 1]."""
    lo = net.normalize((x - eps).clamp(0.0, 1.0))
    hi = net.normalize((x + eps).clamp(0.0, 1.0))
    return lo[None], hi[None]


def margin_spec(net: Stack, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Last layer merged with C: weight (P, B, K-1, I) and bias (P, B, K-1)."""
    last = net.layers[-1]
    k = last.out_shape[0]
    others = other_classes(y, k)  # (B, K-1): i != y ascending
    w, b = last.weight, last.bias  # (P, K, I), (P, K)
    w_c = w[:, y].unsqueeze(2) - w[:, others]
    b_c = b[:, y].unsqueeze(2) - b[:, others]
    return w_c, b_c


def ibp_layer(layer, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Interval image of an affine layer: (P|1, B, *in) bounds -> (P, B, *out)."""
    mid = layer.apply((hi + lo) / 2)
    rad = layer.apply((hi - lo) / 2, bias=False, absolute=True)
    return mid - rad, mid + rad


def relu_relax(lower: torch.Tensor, upper: torch.Tensor, alpha: torch.Tensor | None = None) -> Relax:
    """CROWN relaxation from pre-activation bounds (P, B, *shape); adaptive lower slope by default.

    Unstable neurons (l < 0 < u) get the upper line u (v - l) / (u - l) and lower slope 1 if
    u > -l else 0 (or ``alpha`` given per neuron / per row); stable ones are exact.
    """
    active = lower >= 0
    unstable = (lower < 0) & (upper > 0)
    denom = torch.where(unstable, upper - lower, torch.ones_like(upper))
    slope_u = torch.where(unstable, upper / denom, active.to(upper.dtype))
    shift = torch.where(unstable, -slope_u * lower, torch.zeros_like(upper))
    if alpha is None:
        alpha = torch.where(unstable, (upper > -lower).to(upper.dtype), active.to(upper.dtype))
    return Relax(alpha.unsqueeze(2) if alpha.ndim == lower.ndim else alpha, slope_u.unsqueeze(2), shift.unsqueeze(2))


def concretize(a: torch.Tensor, const: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """min over the box of A h + c: A (P, B, S, *shape), box (P|1, B, *shape) -> (P, B, S)."""
    p, b, s = a.shape[:3]
    mid = ((hi + lo) / 2).reshape(lo.shape[0], b, -1, 1)
    rad = ((hi - lo) / 2).reshape(lo.shape[0], b, -1, 1)
    a = a.reshape(p, b, s, -1)
    return const + torch.matmul(a, mid).squeeze(-1) - torch.matmul(a.abs(), rad).squeeze(-1)


def backsubstitute(
    net: Stack, k: int, a: torch.Tensor, const: torch.Tensor, relax: list[Relax], lo: torch.Tensor, hi: torch.Tensor
) -> torch.Tensor:
    """Lower bound of A . h + c where h is the input of affine layer ``k``.

    a (P, B, S, *layers[k].in_shape), const (P, B, S); relax[i] relaxes the ReLU after layer i.
    """
    p, b, s = a.shape[:3]
    for i in range(k - 1, -1, -1):
        r = relax[i]
        a = a.reshape(p, b, s, *r.slope.shape[3:])
        neg = a.clamp(max=0)
        const = const + torch.matmul(neg.reshape(p, b, s, -1), r.shift.reshape(p, b, -1, 1)).squeeze(-1)
        # A+ alpha + A- s = A alpha + A- (s - alpha): one pass fewer over the largest tensor
        a = torch.addcmul(a * r.alpha, neg, r.slope - r.alpha)
        layer = net.layers[i]
        flat = a.reshape(p, b * s, *layer.out_shape)
        const = const + layer.bias_dot(flat).view(p, b, s)
        a = layer.adjoint(flat).reshape(p, b, s, *layer.in_shape)
    return concretize(a, const, lo, hi)


def plan_chunks(
    num_members: int, batch: int, rows: int, row_numel: int, budget_mb: float, work_factor: int | None = None
) -> tuple[int, int, int]:
    """Chunk sizes (members, batch, rows) so that chunk rows x ``row_numel`` floats fit the budget.

    Depends only on its arguments, so identical calls chunk (and round) identically.
    """
    if budget_mb <= 0:
        raise ValueError(f"memory_budget_mb must be positive, got {budget_mb}; use e.g. 1024")
    factor = _WORK_FACTOR if work_factor is None else work_factor
    fit = max(1, int(budget_mb * 2**20 // (4 * factor * max(1, row_numel))))
    row_chunk = min(rows, fit)
    units = max(1, fit // row_chunk)
    batch_chunk = min(batch, units)
    member_chunk = min(num_members, max(1, units // batch_chunk))
    return member_chunk, batch_chunk, row_chunk


def over_pairs(
    prob: Problem, members: int, examples: int, fn: Callable[..., torch.Tensor], recompute: bool = False
) -> torch.Tensor:
    """The chunk loop: ``fn(sub, p0, p1, b0, b1)`` -> (p, b, ...) for every chunk of ``members``
    members x ``examples`` examples (``sub = prob.members(p0, p1).examples(b0, b1)``), joined to
    (P, B, ...). A member chunk's weights are sliced once for all its example chunks, so their
    gradients meet in one place (and sum in the same order, run after run).

    ``recompute``: run each chunk under activation checkpointing, so that with autograd only one
    chunk's intermediates are alive at a time (they are recomputed in backward).
    """
    num_p, num_b = prob.net.num_members, prob.x.shape[0]

    def run(part: Problem, p0, p1, b0, b1):
        sub = part.examples(b0, b1)
        if recompute:
            return torch.utils.checkpoint.checkpoint(fn, sub, p0, p1, b0, b1, use_reentrant=False)
        return fn(sub, p0, p1, b0, b1)

    out_p = []
    for p0 in range(0, num_p, members):
        p1 = min(num_p, p0 + members)
        part = prob.members(p0, p1)
        out_b = [run(part, p0, p1, b0, min(num_b, b0 + examples)) for b0 in range(0, num_b, examples)]
        out_p.append(torch.cat(out_b, 1) if len(out_b) > 1 else out_b[0])
    return torch.cat(out_p, 0) if len(out_p) > 1 else out_p[0]


def run_chunked(
    prob: Problem, k: int, rows: int, relax: list[Relax], make_rows, solve=None, row_numel: int | None = None
) -> torch.Tensor:
    """Back-substitute ``rows`` specification rows per (member, example) from layer ``k``, chunked.

    ``make_rows(net, p0, p1, b0, b1, r0, r1)`` returns (A (p, b, r, *layers[k].in_shape), c (p, b, r))
    for that chunk (``net`` restricted to members p0:p1); the result is (P, B, rows). ``solve``,
    if given, replaces make_rows + backsubstitute: solve(net, relax, lo, hi, p0, p1, b0, b1, r0, r1).
    """
    net = prob.net
    if row_numel is None:
        sizes = [layer.in_shape for layer in net.layers[: k + 1]] + [net.layers[k].out_shape]
        row_numel = max(int(torch.Size(s).numel()) for s in sizes)
    num_p, num_b = net.num_members, prob.x.shape[0]
    grad = torch.is_grad_enabled() and any(t.requires_grad for layer in net.layers for t in (layer.weight, layer.bias))
    # backward keeps every level's intermediates of a chunk, not just a working set
    pc, bc, rc = plan_chunks(num_p, num_b, rows, row_numel * (k + 1 if grad else 1), prob.memory_budget_mb)
    # With autograd every chunk's intermediates would stay alive until backward; when the work
    # does not fit in one chunk, recompute each chunk in backward instead so memory stays bounded.
    recompute = grad and (pc, bc, rc) != (num_p, num_b, rows)

    def chunk(sub, rel_r, lo_c, hi_c, p0, p1, b0, b1, r0, r1):
        if solve is not None:
            return solve(sub, rel_r, lo_c, hi_c, p0, p1, b0, b1, r0, r1)
        a, const = make_rows(sub, p0, p1, b0, b1, r0, r1)
        return backsubstitute(sub, k, a, const, rel_r, lo_c, hi_c)

    def pair_chunk(sub: Problem, p0, p1, b0, b1):
        rel = [r.members(p0, p1, b0, b1) for r in relax]
        out_r = []
        for r0 in range(0, rows, rc):
            r1 = min(rows, r0 + rc)
            args = (sub.net, [x.rows(r0, r1) for x in rel], sub.lo, sub.hi, p0, p1, b0, b1, r0, r1)
            if recompute:
                out_r.append(torch.utils.checkpoint.checkpoint(chunk, *args, use_reentrant=False))
            else:
                out_r.append(chunk(*args))
        return torch.cat(out_r, 2) if len(out_r) > 1 else out_r[0]

    return over_pairs(prob, pc, bc, pair_chunk)


# Floats of state per hidden neuron and (member, example): IBP and refined bounds (4), the
# relaxation (3), IBP temporaries (4) and one spare.
_STATE_PER_NEURON = 12


def pair_state(prob: Problem) -> int:
    """Floats of state that live through a whole call per (member, example): pre-activation
    bounds, relaxations and temporaries of every hidden neuron plus the input box (the default
    memory model of a relaxation, see ``bounds.registry``)."""
    hidden = sum(math.prod(layer.out_shape) for layer in prob.net.layers[:-1])
    return _STATE_PER_NEURON * hidden + 4 * math.prod(prob.x.shape[1:])


def make_problem(
    model: nn.Sequential,
    x: torch.Tensor,
    y: torch.Tensor,
    eps,
    weights=None,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
) -> Problem:
    """Validate the inputs and build the normalised input box."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(
            f"x must be a (B, C, H, W) tensor of pixels in [0, 1], got "
            f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
        )
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
    net = stack(model, weights, tuple(x.shape[1:]))
    num_k = net.layers[-1].out_shape[0]
    if batch and (int(y.min()) < 0 or int(y.max()) >= num_k):
        raise ValueError(f"labels y must lie in [0, {num_k}), got min {int(y.min())} max {int(y.max())}")
    eps_t = eps_t.view(batch, 1, 1, 1)
    lo, hi = input_box(x, eps_t, net)
    return Problem(net, x, y.long(), eps_t, lo, hi, float(memory_budget_mb), model, weights)
