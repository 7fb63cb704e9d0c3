"""HBox: hybrid zonotope propagation (Mirman et al. 2018, DiffAI, "hybrid zonotope" domain).

A layer's values are c + G e + diag(r) d with e, d in [-1, 1]: the input box is an exact
zonotope (one generator per pixel, G = diag(rad)), affine layers map the zonotope part exactly
(G' = W G) and the box part as IBP does (r' = |W| r). At a ReLU with bounds l, u (from c, G, r):
stably active neurons keep their terms, stably inactive ones become 0, and crossing ones become
the box [0, u] (centre u/2, box radius u/2, generators dropped). Each layer's bounds are inside
IBP's (|W G| + |W| r <= |W| (|G| + r)), so hbox is never looser than ibp. The final layer is
merged with the margin matrix C. Generators cost E = C*H*W rows per example, chunked over
(members x batch) to the memory budget by the shared loop ``common.over_pairs``.

Shapes: P population, B batch, E generators (input pixels), S rows, K classes.
"""

from __future__ import annotations

import math

import torch

from mpigls.bounds.common import Problem, margin_spec, over_pairs, plan_chunks

__all__ = ["bound"]


def _chunk(net, lo: torch.Tensor, hi: torch.Tensor, w_c: torch.Tensor, b_c: torch.Tensor) -> torch.Tensor:
    p = net.num_members
    b = lo.shape[1]
    in_shape = lo.shape[2:]
    num_e = math.prod(in_shape)
    c = (hi + lo) / 2
    rad = ((hi - lo) / 2).reshape(lo.shape[0], b, num_e)
    # generators (P|1, B, E, *in): generator j moves pixel j by rad_j
    g = torch.diag_embed(rad).reshape(lo.shape[0], b, num_e, *in_shape)
    r = torch.zeros_like(c)
    for layer in net.layers[:-1]:
        pg = g.shape[0]
        c = layer.apply(c)
        g = layer.apply(g.reshape(pg, b * num_e, *g.shape[3:]), bias=False).reshape(p, b, num_e, *layer.out_shape)
        r = layer.apply(r, bias=False, absolute=True)
        spread = g.abs().sum(2) + r
        lower, upper = c - spread, c + spread
        active = lower >= 0
        crossing = (lower < 0) & (upper > 0)
        half = upper.clamp(min=0) / 2
        c = torch.where(active, c, torch.where(crossing, half, torch.zeros_like(c)))
        r = torch.where(active, r, torch.where(crossing, half, torch.zeros_like(r)))
        g = g * active.unsqueeze(2).to(g.dtype)
    c = c.reshape(c.shape[0], b, -1, 1)
    r = r.reshape(r.shape[0], b, -1, 1)
    g = g.reshape(g.shape[0], b, num_e, -1)
    lb = b_c + torch.matmul(w_c, c).squeeze(-1) - torch.matmul(w_c.abs(), r).squeeze(-1)
    gen = torch.matmul(w_c, g.transpose(2, 3))  # (P, B, S, E)
    return lb - gen.abs().sum(-1)


def bound(prob: Problem) -> torch.Tensor:
    """Margin lower bounds (P, B, K-1)."""
    net = prob.net
    w_c, b_c = margin_spec(net, prob.y)
    num_e = math.prod(prob.lo.shape[2:])
    widest = max(math.prod(layer.in_shape) for layer in net.layers)
    widest = max(widest, max(math.prod(layer.out_shape) for layer in net.layers))
    num_p, num_b = net.num_members, prob.x.shape[0]
    grad = torch.is_grad_enabled() and any(t.requires_grad for layer in net.layers for t in (layer.weight, layer.bias))
    # The budget sizes the forward working set; with autograd a chunk's backward holds about one
    # generator tensor per layer, so chunks are recomputed in backward (see common.over_pairs)
    # whenever they do not all fit at once, and the peak is a few budgets.
    pc, bc, _ = plan_chunks(num_p, num_b, 1, widest * num_e, prob.memory_budget_mb)

    def chunk(sub: Problem, p0: int, p1: int, b0: int, b1: int) -> torch.Tensor:
        return _chunk(sub.net, sub.lo, sub.hi, w_c[p0:p1, b0:b1], b_c[p0:p1, b0:b1])

    return over_pairs(prob, pc, bc, chunk, recompute=grad and (pc, bc) != (num_p, num_b))
