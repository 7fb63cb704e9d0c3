"""Matrix-mode back-substitution for small networks: every affine layer as an explicit matrix.

When each affine layer of a network is small as a dense matrix (at most ``MATRIX_MAX`` entries,
e.g. CNN3 on the 8x8 digits: 128 x 64, 32 x 128 and 10 x 32), the layer is written out once per
member as its matrix M_i (N_out x N_in, neurons in CHW order; a convolution applied to the
identity) and its bias per neuron. Back-substitution is then nothing but matrix products and a
few elementwise passes:

- the rows of layer k's pre-activation bounds are [M_k; -M_k] (every neuron, both signs), shared
  by the examples of a member until the first ReLU relaxation meets them; the constant terms that
  only need those shared rows (the relaxation shifts and, for k = 1, the image M_0 mid + b_0 of
  the box centre) are small products for all pairs at once (``_layer_rows``);
- through the ReLU after layer i: A <- A alpha + A- (s - alpha), c <- c + A- t (``common``);
  through layer i: c <- c + A b_i, A <- A M_i;
- at the input: min over the box of A x + c = A mid - |A| rad + c.

The arithmetic per row is that of the other engines (same relaxations, same order of layers), so
the bounds agree with them to float rounding. Every neuron of a layer gets its rows (the row
engines bound the IBP-unstable ones only); as there, only IBP-unstable neurons take the
back-substituted bound (intersected with the IBP one), so the results are the same. The rows of
the stable neurons are wasted work, but with a few hundred neurons the products are cheaper than
any selection of rows.

Pairs (member, example) are independent: they are cut into chunks (``common.over_pairs``) that
fit the memory budget, and a chunk's row work into tiles (``_Tiles``): on CPU one member at a
time (a plain matrix product runs several times faster than a batched one) with the rows of a
tile capped at ``CPU_CHUNK_BYTES`` so that its elementwise passes run in cache. Chunks and tiles
change nothing but float rounding. With autograd a chunked call recomputes each chunk in backward.

Shapes: P population, B batch, R rows, N neurons of a layer (flattened, CHW), S specification rows.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from mpigls.bounds.common import Problem, Relax, margin_spec, over_pairs, plan_chunks
from mpigls.nn.population import Stack

__all__ = ["MATRIX_MAX", "CPU_CHUNK_BYTES", "fits", "layer_matrices", "intermediate_bounds", "final_bound", "bound"]

# Largest dense layer matrix (N_out x N_in entries) matrix mode accepts under conv_mode "auto".
MATRIX_MAX = 2**17
# On CPU a chunk's widest row tensor is capped at this many bytes so that its elementwise passes
# run in cache.
CPU_CHUNK_BYTES = 2**21
# Live row-sized tensors per chunk (rows, negative part, product with alpha, next level, |A|) for
# the memory budget.
_ROW_WORK = 6


def fits(net: Stack) -> bool:
    """Whether every affine layer of ``net`` has at most ``MATRIX_MAX`` entries as a dense matrix."""
    return all(math.prod(layer.in_shape) * math.prod(layer.out_shape) <= MATRIX_MAX for layer in net.layers)


def layer_matrices(net: Stack) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: the dense matrix (P, N_out, N_in) and the bias per neuron (P, N_out), CHW order.

    A convolution's matrix is the layer applied to the identity (one ordinary convolution for all
    members, differentiable in the weights)."""
    mats, biases = [], []
    for layer in net.layers:
        p = layer.num_members
        if not layer.is_conv:
            mats.append(layer.weight)
            biases.append(layer.bias)
            continue
        n_in = math.prod(layer.in_shape)
        w = layer.weight
        eye = torch.eye(n_in, dtype=w.dtype, device=w.device).view(1, n_in, *layer.in_shape)
        cols = layer.apply(eye, bias=False).reshape(p, n_in, -1)  # (P, N_in, N_out): M^T
        mats.append(cols.transpose(1, 2))
        biases.append(layer.bias.repeat_interleave(math.prod(layer.out_shape[1:]), dim=1))
    return mats, biases


def _rowdot(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Rows a (p, b|1, R, N) dotted with per-example vectors v (p|1, b, N) -> (p, b, R)."""
    if a.shape[1] == 1 and v.shape[1] > 1:
        return torch.matmul(v, a[:, 0].transpose(1, 2))
    if a.shape[0] != v.shape[0]:
        v = v.expand(a.shape[0], *v.shape[1:])
    # einsum: ~2x faster on CPU than a batched matrix-vector product over many small rows
    return torch.einsum("pbrn,pbn->pbr", a, v)


def _member_mm(a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Per-member product (p, n, k) @ (p, k, j); one member as a plain matrix product (on CPU
    several times faster than a batched one of batch size 1)."""
    if a.shape[0] == 1:
        return torch.mm(a[0], m[0]).unsqueeze(0)
    return torch.bmm(a, m)


def _relax(lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``common.relu_relax`` of flat bounds (p, b, N) as (alpha, slope - alpha, shift), with the
    masks multiplied in instead of ``torch.where`` (several times slower on CPU). The values are
    the same: the masks are 0/1 and disjoint, so every product and sum is exact."""
    unstable = ((lower < 0) & (upper > 0)).to(lower.dtype)
    active = (lower >= 0).to(lower.dtype)
    denom = (upper - lower) * unstable + (1 - unstable)
    slope = (upper / denom) * unstable + active
    shift = -slope * lower * unstable
    alpha = (upper > -lower).to(lower.dtype) * unstable + active
    return alpha.unsqueeze(2), (slope - alpha).unsqueeze(2), shift


def _flat_relax(r: Relax, p: int, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """alpha (p, b, 1|S, N), slope - alpha (same) and shift (p, b, N) of a relaxation."""
    alpha = r.alpha.reshape(p, b, r.alpha.shape[2], -1)
    slope = r.slope.reshape(p, b, 1, -1)
    return alpha, slope - alpha, r.shift.reshape(p, b, -1)


def _backsubstitute(mats, biases, relax, k: int, a: torch.Tensor, const: torch.Tensor, mid, rad) -> torch.Tensor:
    """Lower bound (p, b, R) of A h + c, h the input of layer k: a (p, b|1, R, N), const (p, b|1, R).

    ``relax[i]`` = (alpha, slope - alpha, shift) of the ReLU after layer i (``_flat_relax``);
    mid/rad (p|1, b, N_0) the centre and radius of the normalised input box."""
    for i in range(k - 1, -1, -1):
        alpha, diff, shift = relax[i]
        neg = a.clamp(max=0)
        const = const + _rowdot(neg, shift)
        # A+ alpha + A- s = A alpha + A- (s - alpha)
        a = torch.addcmul(a * alpha, neg, diff)
        p, b, r, n = a.shape
        flat = a.reshape(p, b * r, n)
        const = const + _member_mm(flat, biases[i].unsqueeze(-1)).view(p, b, r)
        a = _member_mm(flat, mats[i]).view(p, b, r, -1)
    return const + _rowdot(a, mid) - _rowdot(a.abs(), rad)


def _box(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre and radius (p|1, b, N_0) of the normalised input box (p|1, b, C, H, W)."""
    mid, rad = (hi + lo) / 2, (hi - lo) / 2
    return mid.reshape(*mid.shape[:2], -1), rad.reshape(*rad.shape[:2], -1)


def _ibp(mat: torch.Tensor, bias: torch.Tensor, mid: torch.Tensor, rad: torch.Tensor):
    """Centre and radius (p, b, N_out) of one layer's image of the box mid +- rad (p|1, b, N_in)."""
    return (
        torch.matmul(mid, mat.transpose(1, 2)) + bias.unsqueeze(1),
        torch.matmul(rad, mat.abs().transpose(1, 2)),
    )


def _centre(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (hi + lo) / 2, (hi - lo) / 2


def _interval(mid: torch.Tensor, rad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return mid - rad, mid + rad


class _Tiles(NamedTuple):
    """How one chunk's row work is cut: members per tile, and examples per tile for the rows of a
    hidden layer and for the specification rows (on CPU one member at a time, as plain matrix
    products, with rows sized to the cache; elsewhere the whole chunk at once)."""

    members: int
    layer_examples: int
    spec_examples: int


def _tiled(p: int, b: int, members: int, examples: int, fn) -> torch.Tensor:
    """``fn(j0, j1, b0, b1)`` -> (j1 - j0, b1 - b0, ...) over tiles of a (p, b) chunk, joined."""
    out_p = []
    for j0 in range(0, p, members):
        j1 = min(p, j0 + members)
        out_b = [fn(j0, j1, b0, min(b, b0 + examples)) for b0 in range(0, b, examples)]
        out_p.append(torch.cat(out_b, 1) if len(out_b) > 1 else out_b[0])
    return torch.cat(out_p, 0) if len(out_p) > 1 else out_p[0]


def _slice(t: torch.Tensor, j0: int, j1: int, b0: int, b1: int) -> torch.Tensor:
    """Members j0:j1 (unless shared: leading size 1) and examples b0:b1 of a (p|1, b, ...) tensor."""
    return (t if t.shape[0] == 1 else t[j0:j1])[:, b0:b1]


def _layer_rows(mats, biases, relax, k: int, mid, rad, h_mid, tiles: _Tiles) -> torch.Tensor:
    """Lower bounds (p, b, 2N) of [h_k; -h_k] for every neuron of hidden layer k >= 1.

    The rows [M_k; -M_k] and their negative parts [M_k-; -M_k+] are shared by the examples of a
    member; the constant terms that only need them (the relaxation shifts, and for k = 1 the
    centre h_mid = M_0 mid + b_0 of the input box's image) are products of those with per-pair
    vectors, for all pairs at once. What needs the rows of every pair is formed tile by tile:
    A = rows alpha + negative parts (s - alpha), then A through the layers below (k = 1: only
    -|A M_0| rad remains)."""
    alpha, diff, shift = relax[k - 1]
    alpha, diff = alpha.squeeze(2), diff.squeeze(2)  # (p, b, N'): no row axis here
    m = mats[k]
    rows = torch.cat([m, -m], 1)  # (p, 2N, N')
    negs = torch.cat([m.clamp(max=0), -m.clamp(min=0)], 1)
    const = torch.cat([biases[k], -biases[k]], 1).unsqueeze(1) + torch.matmul(shift, negs.transpose(1, 2))
    if k == 1:  # A (M_0 mid + b_0) = rows (alpha h_mid) + negs ((s - alpha) h_mid)
        const = const + torch.matmul(alpha * h_mid, rows.transpose(1, 2))
        const = const + torch.matmul(diff * h_mid, negs.transpose(1, 2))
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (rows, alpha, diff, const))

    def tile(j0, j1, b0, b1):
        al, df = alpha[j0:j1, b0:b1, None, :], diff[j0:j1, b0:b1, None, :]
        a = rows[j0:j1, None] * al  # (pj, bc, 2N, N')
        a = torch.addcmul(a, negs[j0:j1, None], df) if grad else a.addcmul_(negs[j0:j1, None], df)
        pj, bc, r, n = a.shape
        flat = a.view(pj, bc * r, n)
        if k == 1:
            x = _member_mm(flat, mats[0][j0:j1]).view(pj, bc, r, -1)
            x = x.abs() if grad else x.abs_()
            return const[j0:j1, b0:b1] - _rowdot(x, _slice(rad, j0, j1, b0, b1))
        c = const[j0:j1, b0:b1] + _member_mm(flat, biases[k - 1][j0:j1].unsqueeze(-1)).view(pj, bc, r)
        a = _member_mm(flat, mats[k - 1][j0:j1]).view(pj, bc, r, -1)
        sub = [tuple(t[j0:j1, b0:b1] for t in rel) for rel in relax]
        sub_m, sub_b = [t[j0:j1] for t in mats], [t[j0:j1] for t in biases]
        return _backsubstitute(sub_m, sub_b, sub, k - 1, a, c, _slice(mid, j0, j1, b0, b1), _slice(rad, j0, j1, b0, b1))

    return _tiled(alpha.shape[0], alpha.shape[1], tiles.members, tiles.layer_examples, tile)


def _chunk_bounds(mats, biases, mid, rad, refine: bool, tiles: _Tiles):
    """Pre-activation bounds (p, b, N_i) of every hidden layer of one chunk (DeepPoly or IBP) and
    the flat relaxations (``_flat_relax``) of all but the last of them."""
    n_layers = len(mats)
    if n_layers == 1:
        return [], []
    h_mid, h_rad = _ibp(mats[0], biases[0], mid, rad)
    bounds = [(h_mid - h_rad, h_mid + h_rad)]
    relax: list = []
    for k in range(1, n_layers - 1):
        l_prev, u_prev = bounds[-1]
        l_ibp, u_ibp = _interval(*_ibp(mats[k], biases[k], *_centre(l_prev.clamp(min=0), u_prev.clamp(min=0))))
        if not refine:
            bounds.append((l_ibp, u_ibp))
            continue
        relax.append(_relax(l_prev, u_prev))
        n = mats[k].shape[1]
        res = _layer_rows(mats, biases, relax, k, mid, rad, h_mid, tiles)
        unstable = (l_ibp < 0) & (u_ibp > 0)
        bounds.append(
            (
                torch.where(unstable, torch.maximum(l_ibp, res[..., :n]), l_ibp),
                torch.where(unstable, torch.minimum(u_ibp, -res[..., n:]), u_ibp),
            )
        )
    return bounds, relax


def _chunk_final(mats, biases, relax, mid, rad, w_c: torch.Tensor, b_c: torch.Tensor, tiles: _Tiles) -> torch.Tensor:
    """Margin lower bounds (p, b, S) of one chunk from the merged specification (p, b, S, N_in)."""
    k = len(mats) - 1

    def tile(j0, j1, b0, b1):
        sub = [tuple(t[j0:j1, b0:b1] for t in rel) for rel in relax]
        sub_m, sub_b = [t[j0:j1] for t in mats], [t[j0:j1] for t in biases]
        a, c = w_c[j0:j1, b0:b1], b_c[j0:j1, b0:b1]
        return _backsubstitute(sub_m, sub_b, sub, k, a, c, _slice(mid, j0, j1, b0, b1), _slice(rad, j0, j1, b0, b1))

    return _tiled(w_c.shape[0], w_c.shape[1], tiles.members, tiles.spec_examples, tile)


def _plan(prob: Problem, grad: bool) -> tuple[int, int, _Tiles]:
    """(members, examples) per chunk, so that the widest rows of a pair x their live copies (x the
    layers with autograd, whose graph keeps every level) fit the memory budget, and the tiles of a
    chunk (``_Tiles``)."""
    net = prob.net
    n_max = max(math.prod(layer.in_shape) for layer in net.layers)
    hidden = [math.prod(layer.out_shape) for layer in net.layers[1:-1]]
    spec = net.layers[-1].out_shape[0] - 1
    widest = max([2 * n for n in hidden] + [spec]) * n_max
    factor = _ROW_WORK * (len(net.layers) if grad else 1)
    pc, bc, _ = plan_chunks(net.num_members, prob.x.shape[0], 1, widest, prob.memory_budget_mb, factor)
    if prob.lo.device.type != "cpu":
        return pc, bc, _Tiles(pc, bc, bc)
    layer_rows = max([2 * n for n in hidden] + [1]) * n_max
    cap = CPU_CHUNK_BYTES // 4
    return pc, bc, _Tiles(1, max(1, min(bc, cap // layer_rows)), max(1, min(bc, cap // (spec * n_max))))


def _needs_grad(prob: Problem, relax: list[Relax] | None = None) -> bool:
    tensors = [t for layer in prob.net.layers for t in (layer.weight, layer.bias)]
    tensors += [t for r in relax or [] for t in (r.alpha, r.slope, r.shift)]
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _run(prob: Problem, grad: bool, fn) -> torch.Tensor:
    """``fn(mats, biases, mid, rad, tiles, p0, p1, b0, b1)`` over the chunks of the memory plan
    (each chunk recomputed in backward when autograd meets a chunked call)."""
    net = prob.net
    mats, biases = layer_matrices(net)
    pc, bc, tiles = _plan(prob, grad)

    def chunk(sub: Problem, p0, p1, b0, b1) -> torch.Tensor:
        mid, rad = _box(sub.lo, sub.hi)
        return fn([m[p0:p1] for m in mats], [v[p0:p1] for v in biases], mid, rad, tiles, p0, p1, b0, b1)

    chunked = (pc, bc) != (net.num_members, prob.x.shape[0])
    return over_pairs(prob, pc, bc, chunk, recompute=grad and chunked)


def intermediate_bounds(prob: Problem, refine: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pre-activation bounds (P, B, *shape) of every hidden layer (``crown.intermediate_bounds``)."""
    shapes = [layer.out_shape for layer in prob.net.layers[:-1]]
    if not shapes:
        return []

    def fn(mats, biases, mid, rad, tiles, p0, p1, b0, b1):
        got, _ = _chunk_bounds(mats, biases, mid, rad, refine, tiles)
        return torch.cat([t for pair in got for t in pair], -1)

    packed = _run(prob, _needs_grad(prob), fn)
    parts = packed.split([math.prod(s) for s in shapes for _ in (0, 1)], -1)
    p, b = packed.shape[:2]
    return [(parts[2 * j].view(p, b, *s), parts[2 * j + 1].view(p, b, *s)) for j, s in enumerate(shapes)]


def final_bound(prob: Problem, relax: list[Relax]) -> torch.Tensor:
    """Margin lower bounds (P, B, K-1) with the given relaxations (``crown.final_bound``)."""
    w_c, b_c = margin_spec(prob.net, prob.y)  # (P, B, S, N_in), (P, B, S)

    def fn(mats, biases, mid, rad, tiles, p0, p1, b0, b1):
        rel = [_flat_relax(r.members(p0, p1, b0, b1), p1 - p0, b1 - b0) for r in relax]
        return _chunk_final(mats, biases, rel, mid, rad, w_c[p0:p1, b0:b1], b_c[p0:p1, b0:b1], tiles)

    return _run(prob, _needs_grad(prob, relax), fn)


def bound(prob: Problem, refine: bool = True) -> torch.Tensor:
    """Margin lower bounds (P, B, K-1): DeepPoly when ``refine`` else CROWN-IBP, chunk by chunk
    (the intermediate bounds of a chunk never leave it)."""
    w_c, b_c = margin_spec(prob.net, prob.y)

    def fn(mats, biases, mid, rad, tiles, p0, p1, b0, b1):
        got, relax = _chunk_bounds(mats, biases, mid, rad, refine, tiles)
        if got:
            relax = relax + [_relax(*got[-1])] if refine else [_relax(lo, hi) for lo, hi in got]
        return _chunk_final(mats, biases, relax, mid, rad, w_c[p0:p1, b0:b1], b_c[p0:p1, b0:b1], tiles)

    return _run(prob, _needs_grad(prob), fn)
