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
- dense mode (any layer): rows are full feature maps in channels-last (HWC) order and go
  through each member's own transposed convolution, read and written as channels-last images
  (no layout copies); a transposed convolution onto one channel (the MNIST input) runs on ATen's
  native kernel, 2-3x faster there than oneDNN on CPU (``_conv_transpose``).
- ``bound_spec``: the final margin rows (``crown.final_bound`` on CPU without autograd), dense,
  member by member, examples in cache-sized chunks (no groups=P convolutions).

On CPU a chunk's widest row tensor is capped at ``CPU_CHUNK_BYTES`` so its elementwise passes run
in cache.

Arithmetic per row is that of the padded engine (same relaxation, same order of layers), so
the results agree to float rounding; rows are independent, so chunking only changes rounding.

Shapes: P population, B batch, R rows, E elements of a row at one level, L window positions.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from mpigls.bounds import patches
from mpigls.bounds.common import Relax
from mpigls.nn.population import Stack

__all__ = ["bound_rows", "bound_groups", "bound_spec", "PATCH_MATRIX_MAX", "CPU_CHUNK_BYTES"]

# A patch-to-patch map with at most this many entries is applied as one dense matrix per member
# (a matmul); larger ones as a transposed convolution. Measured on CPU (benchmarks/bench_generation.py):
# CNN3/CNN5 first-level maps (<= 256 x 121) are several times faster as matrices.
PATCH_MATRIX_MAX = 2**17
# Live row-sized float tensors of a row chunk (a, its negative part, three gathered relaxation
# rows, the next level's rows and a temporary), for the memory budget.
_ROW_WORK = 8
# On CPU a row chunk's widest row tensor is capped at this many bytes so that the elementwise
# passes of a chunk run in cache (the tensors of a budget-sized chunk are memory-bound). Measured
# on CNN3 MNIST, P=16, B=128 (1 thread): intermediate bounds 3.1-4.0 s at budget-sized chunks
# (~30 MB), 2.2-2.4 s at 0.4-4 MB; see docs/bounds-performance.md.
CPU_CHUNK_BYTES = 2**21
# The patch matrix onto the input gets zero columns up to a multiple of this (the input windows
# zeros too, so results are unchanged): alone, sgemm with 128 output columns ran ~1.5x faster than
# with CNN3's 121 (1 thread: 51 vs 34 GFLOP/s for (100000 x 128) @ (128 x N)); in the whole CNN3
# P=16 B=128 intermediate bounds the difference was within noise (2.9-3.2 s CPU either way).
PAD_COLS = 16


def _conv_transpose(x: torch.Tensor, weight: torch.Tensor, stride, padding=(0, 0), out_pad=(0, 0)) -> torch.Tensor:
    """conv_transpose2d(x, weight) without bias, on the fastest CPU kernel for its shape.

    Onto a single channel (the MNIST input) ATen's native im2col kernel is 2-3x faster than
    oneDNN on CPU (CNN5 MNIST: (1024, 16, 14, 14) -> (1024, 1, 28, 28) 54-60 ms vs 118 ms, 1 thread,
    same results to float rounding); everything else runs in oneDNN, channels-last."""
    if x.device.type == "cpu" and weight.shape[1] == 1:
        return torch.ops.aten.slow_conv_transpose2d(
            x, weight, tuple(weight.shape[-2:]), None, tuple(stride), tuple(padding), tuple(out_pad), (1, 1)
        )
    return F.conv_transpose2d(x.contiguous(memory_format=torch.channels_last), weight, None, stride, padding, out_pad)


def _transfer_patch(a: torch.Tensor, weight: torch.Tensor, stride, mat: torch.Tensor | None) -> torch.Tensor:
    """One member's patches (r, O, K, K) through its conv layer (weight (O, C, k, k)) -> (r, C*K'*K')."""
    if mat is not None:
        return a.reshape(a.shape[0], -1) @ mat
    return _conv_transpose(a, weight, stride).reshape(a.shape[0], -1)


def _patch_matrix(weight: torch.Tensor, k_in: tuple[int, int], stride, pad: int = 0) -> torch.Tensor:
    """Dense (O*K*K, C*K'*K' + pad) map of one member's transposed convolution on patches of size K
    (``pad`` zero columns: see ``_Plan.pad_in``)."""
    o = weight.shape[0]
    n_in = o * k_in[0] * k_in[1]
    eye = torch.eye(n_in, dtype=weight.dtype, device=weight.device).view(n_in, o, *k_in)
    return F.pad(F.conv_transpose2d(eye, weight, None, stride).reshape(n_in, -1), (0, pad))


def _hwc(t: torch.Tensor, shape) -> torch.Tensor:
    """Rows (..., prod(shape)) of a (C, H, W) map in CHW order -> HWC (channels-last) order.

    Dense-mode rows live in HWC order: a transposed convolution then reads and writes them as
    channels-last images without layout copies. Flat (Linear) shapes are returned unchanged."""
    if len(shape) != 3:
        return t
    lead = t.shape[:-1]
    return t.reshape(*lead, *shape).movedim(-3, -1).reshape(*lead, -1)


def _hwc_map(t: torch.Tensor) -> torch.Tensor:
    """Maps (..., C, H, W) -> (..., H*W*C); anything else (..., N) unchanged."""
    return t if t.ndim < 5 else t.movedim(-3, -1).reshape(*t.shape[:-3], -1)


def _in_map(net: Stack, i: int) -> tuple[int, ...]:
    """Shape of the map entering layer i: a Linear layer's flat input is the previous conv's map."""
    return net.layers[i - 1].out_shape if i > 0 else net.layers[0].in_shape


def _dense_adjoint(layer, m: int, a: torch.Tensor, in_map: tuple[int, ...]) -> torch.Tensor:
    """Rows (r, out) of member m through the layer's adjoint -> (r, N_in), both in HWC order
    (``in_map``: the map entering the layer, see ``_in_map``)."""
    r = a.shape[0]
    if not layer.is_conv:
        return _hwc(a @ layer.weight[m], in_map)
    c, h, w = layer.out_shape
    weight = layer.weight[m]
    kh, kw = weight.shape[-2:]
    h_in, w_in = layer.in_shape[-2:]
    out_pad = (
        h_in - ((h - 1) * layer.stride[0] - 2 * layer.padding[0] + kh),
        w_in - ((w - 1) * layer.stride[1] - 2 * layer.padding[1] + kw),
    )
    out = _conv_transpose(a.reshape(r, h, w, c).permute(0, 3, 1, 2), weight, layer.stride, layer.padding, out_pad)
    return out.permute(0, 2, 3, 1).reshape(r, -1)


def _transfer(net: Stack, i: int, m: int, rows: torch.Tensor, geo, mat: torch.Tensor | None) -> torch.Tensor:
    """Rows (n, ...) at the output of affine layer ``i`` of member ``m`` moved to its input: through
    the member's patch transfer when ``geo`` (the rows' window height and width) is given, with its
    patch matrix ``mat`` if one was built, else through the dense adjoint."""
    layer = net.layers[i]
    if geo is not None:
        c_in = layer.out_shape[0]
        return _transfer_patch(rows.reshape(-1, c_in, geo[0], geo[1]), layer.weight[m], layer.stride, mat)
    return _dense_adjoint(layer, m, rows, _in_map(net, i))


def _over_spans(chunk, lo: int, hi: int, step: int, grad: bool) -> list[torch.Tensor]:
    """``chunk(s0, s1)`` over [lo, hi) in spans of ``step``; with autograd and several spans each
    span is recomputed in the backward pass (activation checkpointing) instead of kept alive."""
    spans = range(lo, hi, step)
    if grad and len(spans) > 1:
        return [torch.utils.checkpoint.checkpoint(chunk, s0, min(hi, s0 + step), use_reentrant=False) for s0 in spans]
    return [chunk(s0, min(hi, s0 + step)) for s0 in spans]


def _per_chan(a: torch.Tensor, c_in: int, hwc: bool) -> torch.Tensor:
    """Sum of rows (..., E) over each channel's positions (patch windows CHW, dense maps HWC)."""
    if hwc:
        return a.reshape(*a.shape[:-1], -1, c_in).sum(-2)
    return a.reshape(*a.shape[:-1], c_in, -1).sum(-1)


def _input_box(net: Stack, lo: torch.Tensor, hi: torch.Tensor, use_patches: bool):
    """Centre and radius of the input box: maps (patch mode), or flat (P|1, B, E) in the order of
    the dense rows reaching the input (HWC through a conv layer 0, CHW through a Linear one)."""
    mid, rad = (hi + lo) / 2, (hi - lo) / 2
    if use_patches:
        return mid, rad
    return tuple(_hwc(t.reshape(*t.shape[:2], -1), _in_map(net, 0)) for t in (mid, rad))


def _cpu_cap(device: torch.device, row_floats: int) -> int:
    """Most rows of ``row_floats`` floats per chunk on CPU (cache-sized); no cap elsewhere."""
    if device.type != "cpu":
        return 2**62
    return max(1, CPU_CHUNK_BYTES // (4 * max(1, row_floats)))


def _segments(member: torch.Tensor, p0: int, p1: int) -> list[tuple[int, int, int]]:
    """(m, start, stop) row ranges of members p0..p1-1 in a member-sorted index vector."""
    bounds = torch.searchsorted(member, torch.arange(p0, p1 + 1, device=member.device)).tolist()
    return [(p0 + j, bounds[j], bounds[j + 1]) for j in range(p1 - p0) if bounds[j + 1] > bounds[j]]


class _Plan(NamedTuple):
    """Geometry and memory plan shared by both layouts for rows starting at layer k."""

    levels: list[int]  # layers k-1 .. 0 the rows pass through
    num_l: int  # window locations per example (1 in dense mode)
    geos: list  # patch geometry per level (patch mode; empty in dense mode)
    out_hw: tuple[int, int]  # output grid of conv layer k (patch mode)
    sizes: list[int]  # row length entering each level, then the input
    mats: list[bool]  # level j applied as a small dense patch matrix
    e_max: int
    pad_in: int  # zero columns appended to the rows reaching the input (see PAD_COLS)
    budget: float  # floats
    pc: int  # member chunk


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
        sizes[j] * sizes[j + 1] for j in range(len(levels)) if mats[j]
    )
    budget = budget_mb * 2**20 / 4
    pc = max(1, min(net.num_members, int(budget / 2 // max(1, table_floats))))
    pad_in = (-sizes[-1]) % PAD_COLS if levels and mats[-1] else 0
    return _Plan(levels, num_l, geos, out_hw, sizes, mats, max(sizes), pad_in, budget, pc)


def _needs_grad(net: Stack, k: int, relax: list[Relax]) -> bool:
    return (
        torch.is_grad_enabled()
        and any(t.requires_grad for layer in net.layers[: k + 1] for t in (layer.weight, layer.bias))
        or any(t.requires_grad for r in relax for t in (r.alpha, r.slope, r.shift))
    )


def _window_table(t: torch.Tensor, plan: _Plan, j: int) -> torch.Tensor:
    """(p, b, *shape) -> (p*b*L, E): the window of every location (patch mode) or the whole map."""
    if plan.geos:
        w = patches._windows(t, plan.geos[j], plan.out_hw)
    else:  # dense mode: whole maps in HWC order (see ``_hwc``)
        w = _hwc_map(t).reshape(t.shape[0], t.shape[1], 1, -1)
    return w.reshape(-1, w.shape[-1])


class _Tables(NamedTuple):
    """What the rows of one member chunk meet, built once per chunk (shared by both layouts)."""

    relax: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # per level: alpha, slope - alpha, shift windows
    mid: torch.Tensor  # input box centre windows (padded by ``_Plan.pad_in``)
    rad: torch.Tensor
    pmats: dict[int, list[torch.Tensor]]  # level -> per-member patch matrix (levels with ``_Plan.mats``)


def _member_tables(
    net: Stack, k: int, relax: list[Relax], plan: _Plan, in_mid: torch.Tensor, in_rad: torch.Tensor, p0: int, p1: int
) -> _Tables:
    """Window tables of members p0:p1: relaxations per level, the input box, the patch matrices."""
    tables = []
    for j, i in enumerate(plan.levels):
        rel = relax[i]
        al, sl, sh = (t[p0:p1].squeeze(2) for t in (rel.alpha, rel.slope, rel.shift))
        tables.append((_window_table(al, plan, j), _window_table(sl - al, plan, j), _window_table(sh, plan, j)))
    shared = in_mid.shape[0] == 1
    mid = F.pad(_window_table(in_mid if shared else in_mid[p0:p1], plan, k), (0, plan.pad_in))
    rad = F.pad(_window_table(in_rad if shared else in_rad[p0:p1], plan, k), (0, plan.pad_in))
    last = len(plan.levels) - 1
    pmats = {
        j: [
            _patch_matrix(
                net.layers[i].weight[m], plan.geos[j][:2], net.layers[i].stride, plan.pad_in if j == last else 0
            )
            for m in range(p0, p1)
        ]
        for j, i in enumerate(plan.levels)
        if plan.mats[j]
    }
    return _Tables(tables, mid, rad, pmats)


def bound_rows(
    net: Stack,
    k: int,
    relax: list[Relax],
    lo: torch.Tensor,
    hi: torch.Tensor,
    member: torch.Tensor,
    example: torch.Tensor,
    neuron: torch.Tensor,
    sign: torch.Tensor,
    use_patches: bool,
    budget_mb: float,
) -> torch.Tensor:
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
    levels, num_l, geos, e_max, budget, pc = plan.levels, plan.num_l, plan.geos, plan.e_max, plan.budget, plan.pc
    if use_patches:
        chan, loc = neuron // num_l, neuron % num_l
    else:
        chan, loc = neuron, torch.zeros_like(neuron)
    rc = max(1, min(int(budget / 2 // (_ROW_WORK * e_max)), _cpu_cap(device, e_max)))
    grad = _needs_grad(net, k, relax)
    in_mid, in_rad = _input_box(net, lo, hi, use_patches)
    shared_input = lo.shape[0] == 1

    out = []
    for p0 in range(0, num_p, pc):
        p1 = min(num_p, p0 + pc)
        r_lo, r_hi = torch.searchsorted(member, torch.tensor([p0, p1], device=device)).tolist()
        if r_hi == r_lo:
            continue
        tab = _member_tables(net, k, relax, plan, in_mid, in_rad, p0, p1)

        def chunk(s0, s1, p0=p0, p1=p1, tab=tab):
            mem, ex, ch, lc, sg = (t[s0:s1] for t in (member, example, chan, loc, sign))
            segs = _segments(mem, p0, p1)
            group = ((mem - p0) * batch + ex) * num_l + lc
            w0 = lay.weight[p0:p1]
            if use_patches or not lay.is_conv:
                wtab = w0.reshape((p1 - p0) * w0.shape[1], -1)
                if not use_patches:
                    wtab = _hwc(wtab, _in_map(net, k))
                a = wtab.index_select(0, (mem - p0) * w0.shape[1] + ch) * sg[:, None]
                const = lay.bias[p0:p1].reshape(-1).index_select(0, (mem - p0) * w0.shape[1] + ch) * sg
            else:  # dense rows of a conv layer: adjoint of signed one-hot rows
                parts = []
                for m, a0, a1 in segs:
                    hot = torch.zeros(a1 - a0, math.prod(lay.out_shape), dtype=dtype, device=device)
                    hot.scatter_(1, ch[a0:a1, None], sg[a0:a1, None])
                    parts.append(_dense_adjoint(lay, m, _hwc(hot, lay.out_shape), _in_map(net, k)))
                a = torch.cat(parts) if len(parts) > 1 else parts[0]
                const = (
                    lay.bias[p0:p1]
                    .reshape(-1)
                    .index_select(0, (mem - p0) * lay.out_shape[0] + ch // (math.prod(lay.out_shape[1:])))
                    * sg
                )
            for j, i in enumerate(levels):
                al_t, d_t, sh_t = tab.relax[j]
                neg = a.clamp(max=0)
                const = const + (neg * sh_t.index_select(0, group)).sum(-1)
                a = torch.addcmul(a * al_t.index_select(0, group), neg, d_t.index_select(0, group))
                layer = net.layers[i]
                c_in = layer.out_shape[0]
                per_chan = _per_chan(a, c_in, not use_patches)
                bias = layer.bias[p0:p1].index_select(0, mem - p0)
                const = const + (per_chan * bias).sum(-1)
                geo, mats_j = (geos[j] if use_patches else None), tab.pmats.get(j)
                parts = [_transfer(net, i, m, a[a0:a1], geo, mats_j[m - p0] if mats_j else None) for m, a0, a1 in segs]
                a = torch.cat(parts) if len(parts) > 1 else parts[0]
            gin = group if not shared_input else ex * num_l + lc
            mid, rad = tab.mid.index_select(0, gin), tab.rad.index_select(0, gin)
            return const + (a * mid).sum(-1) - (a.abs() * rad).sum(-1)

        out.extend(_over_spans(chunk, r_lo, r_hi, rc, grad))
    return torch.cat(out) if len(out) > 1 else out[0]


class _FirstRows(NamedTuple):
    """Signed rows of every neuron of layer k for members p0:p1: [+h_k; -h_k] on its input."""

    w: torch.Tensor  # (p, 2N, E0)
    neg: torch.Tensor  # its negative part
    bias: torch.Tensor  # (p, 2N)


def _first_rows(net: Stack, k: int, use_patches: bool, p0: int, p1: int, num_n: int, dtype, device) -> _FirstRows:
    lay = net.layers[k]
    if use_patches or not lay.is_conv:
        w0 = lay.weight[p0:p1].reshape(p1 - p0, num_n, -1)
        if not use_patches:
            w0 = _hwc(w0, _in_map(net, k))
    else:  # dense rows of a conv layer: the adjoint of one-hot rows
        hot = torch.eye(num_n, dtype=dtype, device=device)
        w0 = torch.stack([_dense_adjoint(lay, m, _hwc(hot, lay.out_shape), _in_map(net, k)) for m in range(p0, p1)])
    b0 = lay.bias[p0:p1].reshape(p1 - p0, -1)
    if not use_patches and lay.is_conv:
        b0 = b0.repeat_interleave(math.prod(lay.out_shape[1:]), dim=1)
    w0 = torch.cat([w0, -w0], 1)
    return _FirstRows(w0, w0.clamp(max=0), torch.cat([b0, -b0], 1))


class _GroupChunk(NamedTuple):
    """Everything a span of groups of one member chunk needs (``_bound_group_span``)."""

    net: Stack
    plan: _Plan
    groups: torch.Tensor
    member_of: torch.Tensor
    batch: int
    p0: int
    p1: int
    tables: _Tables
    first: _FirstRows
    use_patches: bool
    shared_input: bool
    grad: bool


def _first_level(ctx: _GroupChunk, relax_j, segs, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared first rows through the first ReLU, member by member (rows (G, 2N, E), constants)."""
    al_t, d_t, sh_t = relax_j
    first, p0 = ctx.first, ctx.p0
    if not ctx.grad and len(segs) > 1:  # write the members' rows in place (no cat)
        a = torch.empty(n_groups, *first.w.shape[1:], dtype=first.w.dtype, device=first.w.device)
        const = torch.empty(n_groups, first.w.shape[1], dtype=first.w.dtype, device=first.w.device)
        for m, a0, a1 in segs:
            w, wn = first.w[m - p0], first.neg[m - p0]
            torch.mul(w, al_t[a0:a1, None], out=a[a0:a1])
            a[a0:a1].addcmul_(wn, d_t[a0:a1, None])
            torch.addmm(first.bias[m - p0], sh_t[a0:a1], wn.T, out=const[a0:a1])
        return a, const
    parts_a, parts_c = [], []
    for m, a0, a1 in segs:
        w, wn = first.w[m - p0], first.neg[m - p0]
        parts_a.append(torch.addcmul(w * al_t[a0:a1, None], wn, d_t[a0:a1, None]))
        parts_c.append(sh_t[a0:a1] @ wn.T + first.bias[m - p0])
    return _joined(parts_a), _joined(parts_c)


def _relu_level(a: torch.Tensor, const: torch.Tensor, relax_j) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (G, R, E) through a later ReLU whose windows are shared by a group's rows."""
    al_t, d_t, sh_t = relax_j
    neg = a.clamp(max=0)
    const = const + torch.matmul(neg, sh_t.unsqueeze(-1)).squeeze(-1)
    return torch.addcmul(a * al_t.unsqueeze(1), neg, d_t.unsqueeze(1)), const


def _affine_level(ctx: _GroupChunk, j: int, i: int, a: torch.Tensor, segs) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (G, R, E) through affine layer i, member by member: (next rows, bias terms (G, R))."""
    net, p0 = ctx.net, ctx.p0
    layer = net.layers[i]
    ng, nr = a.shape[:2]
    per_chan = _per_chan(a, layer.out_shape[0], not ctx.use_patches)
    pmats = ctx.tables.pmats.get(j)
    bias = [per_chan[a0:a1] @ layer.bias[m] for m, a0, a1 in segs]
    if pmats is not None and not ctx.grad and len(segs) > 1:  # matrices: write in place (no cat)
        nxt = torch.empty(ng, nr, pmats[0].shape[1], dtype=a.dtype, device=a.device)
        for m, a0, a1 in segs:
            torch.matmul(a[a0:a1].reshape((a1 - a0) * nr, -1), pmats[m - p0], out=nxt[a0:a1].view((a1 - a0) * nr, -1))
        return nxt, _joined(bias)
    geo = ctx.plan.geos[j] if ctx.use_patches else None
    parts = [
        _transfer(net, i, m, a[a0:a1].reshape((a1 - a0) * nr, -1), geo, pmats[m - p0] if pmats else None)
        for m, a0, a1 in segs
    ]
    return _joined(parts).view(ng, nr, -1), _joined(bias)


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _bound_group_span(ctx: _GroupChunk, s0: int, s1: int) -> torch.Tensor:
    """Lower bounds (s1 - s0, 2N) of the groups s0:s1 (all of member chunk ctx.p0:ctx.p1)."""
    gid = ctx.groups[s0:s1]
    segs = _segments(ctx.member_of[s0:s1], ctx.p0, ctx.p1)
    cells = ctx.batch * ctx.plan.num_l  # groups per member
    local = gid - ctx.p0 * cells
    a = const = torch.empty(0)
    for j, i in enumerate(ctx.plan.levels):
        relax_j = tuple(t.index_select(0, local) for t in ctx.tables.relax[j])
        if j == 0:
            a, const = _first_level(ctx, relax_j, segs, len(gid))
        else:
            a, const = _relu_level(a, const, relax_j)
        a, bias = _affine_level(ctx, j, i, a, segs)
        const = const + bias
    gin = gid % cells if ctx.shared_input else local
    mid, rad = ctx.tables.mid.index_select(0, gin), ctx.tables.rad.index_select(0, gin)
    return const + torch.matmul(a, mid.unsqueeze(-1)).squeeze(-1) - torch.matmul(a.abs(), rad.unsqueeze(-1)).squeeze(-1)


def bound_groups(
    net: Stack,
    k: int,
    relax: list[Relax],
    lo: torch.Tensor,
    hi: torch.Tensor,
    groups: torch.Tensor,
    use_patches: bool,
    budget_mb: float,
) -> torch.Tensor:
    """Lower bounds (G, 2 N) of +h_k and -h_k for every neuron sharing a window group.

    A group is one (member, example, window location): flat id (p B + b) L + loc with L the
    output positions of conv layer k in patch mode (rows: its O channels), or L = 1 in dense mode
    (rows: all N neurons of layer k). ``groups`` must be ascending. Row n of a group is +h_k,
    row N + n is -h_k. All rows of a group share their relaxation windows, so they meet them by
    broadcasting (no per-row gather) and the first level and the input are matrix products.
    Member chunk by member chunk: the window tables (``_member_tables``) and signed first rows
    (``_first_rows``) once, then spans of groups (``_bound_group_span``) sized to the budget.
    """
    lay = net.layers[k]
    num_p, batch = net.num_members, lo.shape[1]
    dtype, device = lo.dtype, lo.device
    num_n = lay.out_shape[0] if use_patches else math.prod(lay.out_shape)
    if groups.shape[0] == 0:
        return torch.zeros(0, 2 * num_n, dtype=dtype, device=device)
    plan = _plan(net, k, use_patches, batch, budget_mb)
    row_floats = plan.e_max * 2 * num_n
    gc = max(1, min(int(plan.budget / 2 // (_ROW_WORK * row_floats)), _cpu_cap(device, row_floats)))
    grad = _needs_grad(net, k, relax)
    in_mid, in_rad = _input_box(net, lo, hi, use_patches)
    member_of = groups // (batch * plan.num_l)
    out = []
    for p0 in range(0, num_p, plan.pc):
        p1 = min(num_p, p0 + plan.pc)
        g_lo, g_hi = torch.searchsorted(member_of, torch.tensor([p0, p1], device=device)).tolist()
        if g_hi == g_lo:
            continue
        ctx = _GroupChunk(
            net,
            plan,
            groups,
            member_of,
            batch,
            p0,
            p1,
            _member_tables(net, k, relax, plan, in_mid, in_rad, p0, p1),
            _first_rows(net, k, use_patches, p0, p1, num_n, dtype, device),
            use_patches,
            lo.shape[0] == 1,
            grad,
        )
        out.extend(_over_spans(functools.partial(_bound_group_span, ctx), g_lo, g_hi, gc, grad))
    return _joined(out)


def bound_spec(
    net: Stack,
    k: int,
    relax: list[Relax],
    lo: torch.Tensor,
    hi: torch.Tensor,
    a: torch.Tensor,
    const: torch.Tensor,
    budget_mb: float,
) -> torch.Tensor:
    """Lower bounds (P, B, S) of A . h + c, h the input of affine layer k: A (P, B, S, *in_shape), c (P, B, S).

    Dense rows (e.g. the merged margin specification) member by member, in HWC order through each
    member's own transposed convolutions (no groups=P convolutions), examples in cache-sized
    chunks on CPU. Same arithmetic as ``common.backsubstitute``; relaxations may carry a row axis.
    """
    num_p, batch, num_s = a.shape[:3]
    dtype, device = lo.dtype, lo.device
    sizes = [math.prod(net.layers[i].in_shape) for i in range(k, -1, -1)]
    fit = int(budget_mb * 2**20 / 4 / 2 // (_ROW_WORK * max(sizes) * num_s))
    bc = max(1, min(batch, fit, _cpu_cap(device, max(sizes) * num_s)))
    in_mid, in_rad = _input_box(net, lo, hi, False)  # (P|1, B, E)
    out = torch.empty(num_p, batch, num_s, dtype=dtype, device=device)
    for m in range(num_p):
        mi = m if in_mid.shape[0] > 1 else 0
        for b0 in range(0, batch, bc):
            b1 = min(batch, b0 + bc)
            rows = _hwc(a[m, b0:b1].reshape(b1 - b0, num_s, -1), _in_map(net, k))
            c = const[m, b0:b1]
            for i in range(k - 1, -1, -1):
                rel, layer = relax[i], net.layers[i]
                al, sl, sh = (_hwc_map(t[m, b0:b1]) for t in (rel.alpha, rel.slope, rel.shift))
                neg = rows.clamp(max=0)
                c = c + torch.matmul(neg, sh.transpose(1, 2)).squeeze(-1)
                rows = torch.addcmul(rows * al, neg, sl - al)
                c = c + _per_chan(rows, layer.out_shape[0], True) @ layer.bias[m]
                rows = _dense_adjoint(layer, m, rows.reshape((b1 - b0) * num_s, -1), _in_map(net, i))
                rows = rows.view(b1 - b0, num_s, -1)
            mid, rad = in_mid[mi, b0:b1].unsqueeze(-1), in_rad[mi, b0:b1].unsqueeze(-1)
            out[m, b0:b1] = c + torch.matmul(rows, mid).squeeze(-1) - torch.matmul(rows.abs(), rad).squeeze(-1)
    return out
