"""Packed-row back-substitution: bound exactly the rows that are needed, with no padding.

DeepPoly refines the pre-activation bounds of the neurons that IBP leaves unstable; each such
neuron needs two back-substitution rows (its lower bound and, negated, its upper bound). The
padded engine (``common.run_chunked`` / ``patches.backsubstitute``) gives every (member, example)
as many rows as the worst one and gathers the relaxation windows element by element. Here the
rows are one packed list of (member, example, neuron, sign) sorted by member, so the work is
proportional to the number of unstable neurons, and each row meets the data it needs through
row copies (``index_select``) from tables built once per layer and member chunk:

- patch mode (every layer up to k a convolution): a row of neuron (o, loc) is, at every earlier
  ReLU i, a patch on that layer's grid (see ``patches.geometry``). The relaxation tensors are cut
  into windows once per layer, one table row per (member, example, loc); the same is done for the
  centre and radius of the input box. Between ReLUs the patch goes through layer i's transposed
  convolution (stride s, no padding; the geometry carries offsets), applied per member to its
  contiguous rows either as a small dense matrix (precomputed once per member) or as a plain
  ``conv_transpose2d`` (no groups=P convolutions).
- dense mode (any layer): rows are full feature maps and go through each member's adjoint.

Arithmetic per row is that of the padded engine (same relaxation, same order of layers), so
the results agree to float rounding; rows are independent, so chunking only changes rounding.

Shapes: P population, B batch, R rows, E elements of a row at one level, L window positions.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from ..population import Stack
from . import patches
from .common import Relax

__all__ = ["bound_rows", "PATCH_MATRIX_MAX"]

# A patch-to-patch map with at most this many entries is applied as one dense matrix per member
# (a matmul); larger ones as a transposed convolution. Measured on CPU (tools/bench_generation.py):
# CNN3/CNN5 first-level maps (<= 256 x 121) are several times faster as matrices.
PATCH_MATRIX_MAX = 2**17
# Live row-sized float tensors of a row chunk (a, its negative part, three gathered relaxation
# rows, the next level's rows and a temporary), for the memory budget.
_ROW_WORK = 8


def _transfer_patch(a: torch.Tensor, weight: torch.Tensor, stride, mat: torch.Tensor | None) -> torch.Tensor:
    """One member's patches (r, O, K, K) through its conv layer (weight (O, C, k, k)) -> (r, C*K'*K')."""
    if mat is not None:
        return a.reshape(a.shape[0], -1) @ mat
    out = F.conv_transpose2d(a.contiguous(memory_format=torch.channels_last), weight, None, stride)
    return out.reshape(a.shape[0], -1)


def _patch_matrix(weight: torch.Tensor, k_in: tuple[int, int], stride) -> torch.Tensor:
    """Dense (O*K*K, C*K'*K') map of one member's transposed convolution on patches of size K."""
    o = weight.shape[0]
    n_in = o * k_in[0] * k_in[1]
    eye = torch.eye(n_in, dtype=weight.dtype, device=weight.device).view(n_in, o, *k_in)
    return F.conv_transpose2d(eye, weight, None, stride).reshape(n_in, -1)


def _dense_adjoint(layer, m: int, a: torch.Tensor) -> torch.Tensor:
    """Rows (r, *out_shape) of member m through the layer's adjoint -> (r, N_in)."""
    sub = layer.members(m, m + 1)
    return sub.adjoint(a.reshape(1, a.shape[0], *layer.out_shape))[0].reshape(a.shape[0], -1)


def _segments(member: torch.Tensor, p0: int, p1: int) -> list[tuple[int, int, int]]:
    """(m, start, stop) row ranges of members p0..p1-1 in a member-sorted index vector."""
    bounds = torch.searchsorted(member, torch.arange(p0, p1 + 1, device=member.device)).tolist()
    return [(p0 + j, bounds[j], bounds[j + 1]) for j in range(p1 - p0) if bounds[j + 1] > bounds[j]]


class _Plan(NamedTuple):
    """Geometry and memory plan shared by both layouts for rows starting at layer k."""

    levels: list[int]          # layers k-1 .. 0 the rows pass through
    num_l: int                 # window locations per example (1 in dense mode)
    geos: list                 # patch geometry per level (patch mode; empty in dense mode)
    out_hw: tuple[int, int]    # output grid of conv layer k (patch mode)
    sizes: list[int]           # row length entering each level, then the input
    mats: list[bool]           # level j applied as a small dense patch matrix
    e_max: int
    budget: float              # floats
    pc: int                    # member chunk


def _plan(net: Stack, k: int, use_patches: bool, batch: int, budget_mb: float) -> _Plan:
    lay = net.layers[k]
    levels = list(range(k - 1, -1, -1))
    if use_patches:
        out_h, out_w = lay.out_shape[1:]
        geos = patches.geometry(net, k)
        sizes = [net.layers[k - j].in_shape[0] * g[0] * g[1] for j, g in enumerate(geos)]
        mats = [sizes[j] * sizes[j + 1] <= PATCH_MATRIX_MAX for j in range(len(levels))]
        num_l, out_hw = out_h * out_w, (out_h, out_w)
    else:
        geos, num_l, out_hw = [], 1, (1, 1)
        sizes = [math.prod(net.layers[i].in_shape) for i in range(k, -1, -1)]
        mats = [False] * len(levels)
    # member chunk: relaxation window tables (3 per level) + input tables + patch matrices
    table_floats = 3 * batch * num_l * sum(sizes[:-1]) + sum(
        sizes[j] * sizes[j + 1] for j in range(len(levels)) if mats[j])
    budget = budget_mb * 2**20 / 4
    pc = max(1, min(net.num_members, int(budget / 2 // max(1, table_floats))))
    return _Plan(levels, num_l, geos, out_hw, sizes, mats, max(sizes), budget, pc)


def _needs_grad(net: Stack, k: int, relax: list[Relax]) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for layer in net.layers[:k + 1]
                                           for t in (layer.weight, layer.bias)) or any(
        t.requires_grad for r in relax for t in (r.alpha, r.slope, r.shift))


def _window_table(t: torch.Tensor, plan: _Plan, j: int) -> torch.Tensor:
    """(p, b, *shape) -> (p*b*L, E): the window of every location (patch mode) or the whole map."""
    if plan.geos:
        w = patches._windows(t, plan.geos[j], plan.out_hw)
    else:
        w = t.reshape(t.shape[0], t.shape[1], 1, -1)
    return w.reshape(-1, w.shape[-1])


def bound_rows(net: Stack, k: int, relax: list[Relax], lo: torch.Tensor, hi: torch.Tensor,
               member: torch.Tensor, example: torch.Tensor, neuron: torch.Tensor, sign: torch.Tensor,
               use_patches: bool, budget_mb: float) -> torch.Tensor:
    """Lower bounds (R,) of sign * h_k[member, example, neuron] (h_k: output of affine layer k).

    ``member`` must be sorted ascending; relax[i] relaxes the ReLU after layer i with a per-neuron
    lower slope (row axis of size 1); lo/hi (P|1, B, *input) is the normalised input box.
    """
    lay = net.layers[k]
    num_p, batch = net.num_members, lo.shape[1]
    num_r = member.shape[0]
    dtype, device = lo.dtype, lo.device
    if num_r == 0:
        return torch.zeros(0, dtype=dtype, device=device)
    plan = _plan(net, k, use_patches, batch, budget_mb)
    levels, num_l, geos, mats, e_max, budget, pc = (plan.levels, plan.num_l, plan.geos, plan.mats,
                                                    plan.e_max, plan.budget, plan.pc)
    if use_patches:
        chan, loc = neuron // num_l, neuron % num_l
    else:
        chan, loc = neuron, torch.zeros_like(neuron)
    rc = max(1, int(budget / 2 // (_ROW_WORK * e_max)))
    grad = _needs_grad(net, k, relax)
    in_mid, in_rad = (hi + lo) / 2, (hi - lo) / 2
    shared_input = lo.shape[0] == 1

    def windows(t: torch.Tensor, j: int) -> torch.Tensor:
        return _window_table(t, plan, j)

    out = []
    for p0 in range(0, num_p, pc):
        p1 = min(num_p, p0 + pc)
        r_lo, r_hi = torch.searchsorted(member, torch.tensor([p0, p1], device=device)).tolist()
        if r_hi == r_lo:
            continue
        tables = []
        for j, i in enumerate(levels):
            rel = relax[i]
            al = rel.alpha[p0:p1].squeeze(2)
            sl = rel.slope[p0:p1].squeeze(2)
            sh = rel.shift[p0:p1].squeeze(2)
            tables.append((windows(al, j), windows(sl - al, j), windows(sh, j)))
        mid_t = windows(in_mid if shared_input else in_mid[p0:p1], k)
        rad_t = windows(in_rad if shared_input else in_rad[p0:p1], k)
        pmats = {}
        for j, i in enumerate(levels):
            if mats[j]:
                w = net.layers[i].weight
                pmats[j] = [_patch_matrix(w[m], geos[j][:2], net.layers[i].stride) for m in range(p0, p1)]

        def chunk(s0, s1, p0=p0, p1=p1, tables=tables, mid_t=mid_t, rad_t=rad_t, pmats=pmats):
            mem, ex, ch, lc, sg = (t[s0:s1] for t in (member, example, chan, loc, sign))
            segs = _segments(mem, p0, p1)
            group = ((mem - p0) * batch + ex) * num_l + lc
            w0 = lay.weight[p0:p1]
            if use_patches or not lay.is_conv:
                wtab = w0.reshape((p1 - p0) * w0.shape[1], -1)
                a = wtab.index_select(0, (mem - p0) * w0.shape[1] + ch) * sg[:, None]
                const = lay.bias[p0:p1].reshape(-1).index_select(0, (mem - p0) * w0.shape[1] + ch) * sg
            else:  # dense rows of a conv layer: adjoint of signed one-hot rows
                parts = []
                for m, a0, a1 in segs:
                    hot = torch.zeros(a1 - a0, math.prod(lay.out_shape), dtype=dtype, device=device)
                    hot.scatter_(1, ch[a0:a1, None], sg[a0:a1, None])
                    parts.append(_dense_adjoint(lay, m, hot))
                a = torch.cat(parts) if len(parts) > 1 else parts[0]
                const = lay.bias[p0:p1].reshape(-1).index_select(
                    0, (mem - p0) * lay.out_shape[0] + ch // (math.prod(lay.out_shape[1:]))) * sg
            for j, i in enumerate(levels):
                al_t, d_t, sh_t = tables[j]
                neg = a.clamp(max=0)
                const = const + (neg * sh_t.index_select(0, group)).sum(-1)
                a = torch.addcmul(a * al_t.index_select(0, group), neg, d_t.index_select(0, group))
                layer = net.layers[i]
                c_in = layer.out_shape[0]
                per_chan = a.reshape(a.shape[0], c_in, -1).sum(-1)
                bias = layer.bias[p0:p1].index_select(0, mem - p0)
                const = const + (per_chan * bias).sum(-1)
                parts = []
                for m, a0, a1 in segs:
                    rows = a[a0:a1]
                    if use_patches:
                        mat = pmats[j][m - p0] if j in pmats else None
                        parts.append(_transfer_patch(rows.reshape(-1, c_in, geos[j][0], geos[j][1]),
                                                     layer.weight[m], layer.stride, mat))
                    else:
                        parts.append(_dense_adjoint(layer, m, rows))
                a = torch.cat(parts) if len(parts) > 1 else parts[0]
            gin = group if not shared_input else ex * num_l + lc
            mid, rad = mid_t.index_select(0, gin), rad_t.index_select(0, gin)
            return const + (a * mid).sum(-1) - (a.abs() * rad).sum(-1)

        spans = list(range(r_lo, r_hi, rc))
        for s0 in spans:
            s1 = min(r_hi, s0 + rc)
            if grad and len(spans) > 1:
                out.append(torch.utils.checkpoint.checkpoint(chunk, s0, s1, use_reentrant=False))
            else:
                out.append(chunk(s0, s1))
    return torch.cat(out) if len(out) > 1 else out[0]


def bound_groups(net: Stack, k: int, relax: list[Relax], lo: torch.Tensor, hi: torch.Tensor,
                 groups: torch.Tensor, use_patches: bool, budget_mb: float) -> torch.Tensor:
    """Lower bounds (G, 2 N) of +h_k and -h_k for every neuron sharing a window group.

    A group is one (member, example, window location): flat id (p B + b) L + loc with L the
    output positions of conv layer k in patch mode (rows: its O channels), or L = 1 in dense mode
    (rows: all N neurons of layer k). ``groups`` must be ascending. Row n of a group is +h_k,
    row N + n is -h_k. All rows of a group share their relaxation windows, so they meet them by
    broadcasting (no per-row gather) and the first level and the input are matrix products.
    """
    lay = net.layers[k]
    num_p, batch = net.num_members, lo.shape[1]
    dtype, device = lo.dtype, lo.device
    num_n = lay.out_shape[0] if use_patches else math.prod(lay.out_shape)
    num_g = groups.shape[0]
    if num_g == 0:
        return torch.zeros(0, 2 * num_n, dtype=dtype, device=device)
    plan = _plan(net, k, use_patches, batch, budget_mb)
    levels, num_l, geos, sizes, mats, e_max, budget, pc = (plan.levels, plan.num_l, plan.geos, plan.sizes,
                                                            plan.mats, plan.e_max, plan.budget, plan.pc)
    gc = max(1, int(budget / 2 // (_ROW_WORK * e_max * 2 * num_n)))
    grad = _needs_grad(net, k, relax)
    in_mid, in_rad = (hi + lo) / 2, (hi - lo) / 2
    shared_input = lo.shape[0] == 1
    member_of = groups // (batch * num_l)

    def windows(t: torch.Tensor, j: int) -> torch.Tensor:
        return _window_table(t, plan, j)

    out = []
    for p0 in range(0, num_p, pc):
        p1 = min(num_p, p0 + pc)
        g_lo, g_hi = torch.searchsorted(member_of, torch.tensor([p0, p1], device=device)).tolist()
        if g_hi == g_lo:
            continue
        tables = []
        for j, i in enumerate(levels):
            rel = relax[i]
            al, sl, sh = (t[p0:p1].squeeze(2) for t in (rel.alpha, rel.slope, rel.shift))
            tables.append((windows(al, j), windows(sl - al, j), windows(sh, j)))
        mid_t = windows(in_mid if shared_input else in_mid[p0:p1], k)
        rad_t = windows(in_rad if shared_input else in_rad[p0:p1], k)
        pmats = {j: [_patch_matrix(net.layers[i].weight[m], geos[j][:2], net.layers[i].stride)
                     for m in range(p0, p1)] for j, i in enumerate(levels) if mats[j]}
        # signed first rows (p, 2N, E0) and their negative parts
        if use_patches or not lay.is_conv:
            w0 = lay.weight[p0:p1].reshape(p1 - p0, num_n, -1)
        else:
            hot = torch.eye(num_n, dtype=dtype, device=device)
            w0 = torch.stack([_dense_adjoint(lay, m, hot) for m in range(p0, p1)])
        b0 = lay.bias[p0:p1].reshape(p1 - p0, -1)
        if not use_patches and lay.is_conv:
            b0 = b0.repeat_interleave(math.prod(lay.out_shape[1:]), dim=1)
        w0 = torch.cat([w0, -w0], 1)
        b0 = torch.cat([b0, -b0], 1)
        w0_neg = w0.clamp(max=0)

        def chunk(s0, s1, p0=p0, p1=p1, tables=tables, mid_t=mid_t, rad_t=rad_t, pmats=pmats,
                  w0=w0, w0_neg=w0_neg, b0=b0):
            gid = groups[s0:s1]
            mem = member_of[s0:s1]
            local = gid - p0 * batch * num_l
            segs = _segments(mem, p0, p1)
            gin = local if not shared_input else gid % (batch * num_l)
            a = torch.empty(0)  # set by level 0
            for j, i in enumerate(levels):
                al_t, d_t, sh_t = (t.index_select(0, local) for t in tables[j])
                if j == 0 and not grad and len(segs) > 1:  # write members' rows in place (no cat)
                    a = torch.empty(len(gid), *w0.shape[1:], dtype=dtype, device=device)
                    const = torch.empty(len(gid), w0.shape[1], dtype=dtype, device=device)
                    for m, a0, a1 in segs:
                        w, wn = w0[m - p0], w0_neg[m - p0]
                        torch.mul(w, al_t[a0:a1, None], out=a[a0:a1])
                        a[a0:a1].addcmul_(wn, d_t[a0:a1, None])
                        torch.addmm(b0[m - p0], sh_t[a0:a1], wn.T, out=const[a0:a1])
                elif j == 0:
                    parts_a, parts_c = [], []
                    for m, a0, a1 in segs:
                        w, wn = w0[m - p0], w0_neg[m - p0]
                        parts_a.append(torch.addcmul(w * al_t[a0:a1, None], wn, d_t[a0:a1, None]))
                        parts_c.append(sh_t[a0:a1] @ wn.T + b0[m - p0])
                    a = torch.cat(parts_a) if len(parts_a) > 1 else parts_a[0]
                    const = torch.cat(parts_c) if len(parts_c) > 1 else parts_c[0]
                else:
                    neg = a.clamp(max=0)
                    const = const + torch.matmul(neg, sh_t.unsqueeze(-1)).squeeze(-1)
                    a = torch.addcmul(a * al_t.unsqueeze(1), neg, d_t.unsqueeze(1))
                layer = net.layers[i]
                c_in = layer.out_shape[0]
                ng, nr = a.shape[:2]
                per_chan = a.reshape(ng, nr, c_in, -1).sum(-1)
                parts, bias = [], []
                if not grad and j in pmats and len(segs) > 1:  # matrices: write in place (no cat)
                    nxt = torch.empty(ng, nr, sizes[j + 1], dtype=dtype, device=device)
                    for m, a0, a1 in segs:
                        bias.append(per_chan[a0:a1] @ layer.bias[m])
                        torch.matmul(a[a0:a1].reshape((a1 - a0) * nr, -1), pmats[j][m - p0],
                                     out=nxt[a0:a1].view((a1 - a0) * nr, -1))
                    parts = [nxt]
                    segs_t = []
                else:
                    segs_t = segs
                for m, a0, a1 in segs_t:
                    bias.append(per_chan[a0:a1] @ layer.bias[m])
                    rows = a[a0:a1].reshape((a1 - a0) * nr, -1)
                    if use_patches:
                        mat = pmats[j][m - p0] if j in pmats else None
                        parts.append(_transfer_patch(rows.reshape(-1, c_in, geos[j][0], geos[j][1]),
                                                     layer.weight[m], layer.stride, mat))
                    else:
                        parts.append(_dense_adjoint(layer, m, rows))
                const = const + (torch.cat(bias) if len(bias) > 1 else bias[0])
                a = (torch.cat(parts) if len(parts) > 1 else parts[0]).view(ng, nr, -1)
            mid, rad = mid_t.index_select(0, gin), rad_t.index_select(0, gin)
            return const + torch.matmul(a, mid.unsqueeze(-1)).squeeze(-1) \
                - torch.matmul(a.abs(), rad.unsqueeze(-1)).squeeze(-1)

        spans = list(range(g_lo, g_hi, gc))
        for s0 in spans:
            s1 = min(g_hi, s0 + gc)
            if grad and len(spans) > 1:
                out.append(torch.utils.checkpoint.checkpoint(chunk, s0, s1, use_reentrant=False))
            else:
                out.append(chunk(s0, s1))
    return torch.cat(out) if len(out) > 1 else out[0]
