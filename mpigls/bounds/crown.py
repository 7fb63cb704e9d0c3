"""CROWN-IBP (Zhang et al. 2020, arXiv 1906.06316) and DeepPoly / CROWN (Singh et al. 2019;
Zhang et al. 2018, arXiv 1811.00866) by linear back-substitution.

Both bound the merged margin specification C W_last by one back-substitution to the input box
(see ``common``). They differ in the pre-activation bounds [l, u] that shape the ReLU
relaxations: CROWN-IBP takes them from IBP; DeepPoly computes them layer by layer by
back-substitution too. The first layer's bounds are exact from IBP. For a later layer only the
neurons that IBP (from the refined previous bounds) leaves unstable get back-substitution rows
(a lower and an upper row each); a stable neuron's relaxation is exact whatever its bounds. The
refined bounds are intersected with the IBP ones, which keeps them sound and never looser.
Rows are chunked over (members x batch) and rows to the memory budget (``common.run_chunked``).

Shapes: P population, B batch, S rows, N neurons of a layer, K classes.
"""

from __future__ import annotations

import torch

from mpigls.bounds import ibp, matrix, patches, rows as packed_rows
from mpigls.bounds.common import Problem, Relax, ibp_layer, margin_spec, relu_relax, run_chunked

__all__ = ["intermediate_bounds", "bound", "final_bound"]


CONV_MODES = ("auto", "patches", "dense", "matrix")
ROW_MODES = ("auto", "packed", "groups", "padded")


def _check(conv_mode: str, rows: str) -> None:
    if conv_mode not in CONV_MODES:
        raise ValueError(f"conv_mode must be one of {list(CONV_MODES)}, got {conv_mode!r}")
    if rows not in ROW_MODES:
        raise ValueError(f"rows must be one of {list(ROW_MODES)}, got {rows!r}")


def use_matrix(prob: Problem, conv_mode: str = "auto", rows: str = "auto") -> bool:
    """Whether back-substitution runs in matrix mode (``matrix.py``): when asked for, or under
    "auto" (both options) on CPU for a network whose layers are small as dense matrices
    (``matrix.fits``). Measured on CPU, 1 thread (benchmarks/bench_deeppoly_generation.py for
    CNN3 digits, P=64, B=128): several times faster than the row engines on CNN3 and CNN5 digits,
    about twice as fast on the MLPs (8x8 and MNIST inputs); not measured on GPU."""
    if conv_mode == "matrix":
        return True
    return conv_mode == "auto" and rows == "auto" and prob.lo.device.type == "cpu" and matrix.fits(prob.net)


def _use_patches(prob: Problem, k: int, conv_mode: str) -> bool:
    net = prob.net
    if conv_mode == "dense" or not all(layer.is_conv for layer in net.layers[: k + 1]):
        return False
    if conv_mode == "patches":
        return True
    dense = sum(torch.Size(layer.in_shape).numel() for layer in net.layers[: k + 1])
    return patches.patch_numel(net, k)[1] < dense


# Group layout (every neuron of a window group gets its rows, no gathers) when at least this
# fraction of the rows in groups that hold an unstable neuron is needed; packed rows otherwise.
# Measured with benchmarks/bench_generation.py --fill on CNN3/CNN5 MNIST (CPU).
GROUP_FILL = 0.35


def _refine_packed(
    prob: Problem, k: int, relax: list[Relax], lo_ibp: torch.Tensor, hi_ibp: torch.Tensor, conv_mode: str, rows: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_refine`` with rows for the unstable neurons only (``rows.py``): packed row pairs, or
    whole window groups (member, example, location) that hold an unstable neuron."""
    p, b = lo_ibp.shape[:2]
    lo_f, hi_f = lo_ibp.reshape(-1), hi_ibp.reshape(-1)
    mask = (lo_f < 0) & (hi_f > 0)
    flat = torch.nonzero(mask).squeeze(1)  # ascending: sorted by member
    if flat.numel() == 0:
        return lo_ibp, hi_ibp
    use_patches = _use_patches(prob, k, conv_mode)
    shape = prob.net.layers[k].out_shape
    if use_patches:  # group (p, b, loc), rows: channels
        per_group = mask.view(p * b, shape[0], -1).transpose(1, 2)
    else:  # group (p, b), rows: all neurons
        per_group = mask.view(p * b, 1, -1)
    per_group = per_group.reshape(-1, per_group.shape[-1])
    active = torch.nonzero(per_group.any(-1)).squeeze(1)
    fill = flat.numel() / (active.numel() * per_group.shape[-1])
    if rows == "groups" or (rows == "auto" and fill >= GROUP_FILL):
        res = packed_rows.bound_groups(
            prob.net, k, relax, prob.lo, prob.hi, active, use_patches, prob.memory_budget_mb
        )  # (G, 2n)
        n = per_group.shape[-1]
        low, up = res[:, :n], -res[:, n:]
        # neuron flat index of (group, row): patches (p, b, c, loc); dense (p, b, n)
        if use_patches:
            num_l = per_group.shape[0] // (p * b)
            pb, loc = active // num_l, active % num_l
            idx = (pb[:, None] * shape[0] + torch.arange(n, device=active.device)) * num_l + loc[:, None]
        else:
            idx = active[:, None] * n + torch.arange(n, device=active.device)
        keep = mask.index_select(0, idx.reshape(-1))
        flat_g = idx.reshape(-1)[keep]
        low, up = low.reshape(-1)[keep], up.reshape(-1)[keep]
        return (
            lo_f.index_put((flat_g,), torch.maximum(lo_f.index_select(0, flat_g), low)).view_as(lo_ibp),
            hi_f.index_put((flat_g,), torch.minimum(hi_f.index_select(0, flat_g), up)).view_as(hi_ibp),
        )
    num_n = lo_f.shape[0] // max(1, p * b)
    flat2 = flat.repeat_interleave(2)
    sign = torch.tensor([1.0, -1.0], dtype=lo_ibp.dtype, device=lo_ibp.device).repeat(flat.numel())
    res = packed_rows.bound_rows(
        prob.net,
        k,
        relax,
        prob.lo,
        prob.hi,
        flat2 // (b * num_n),
        (flat2 // num_n) % b,
        flat2 % num_n,
        sign,
        use_patches,
        prob.memory_budget_mb,
    )
    new_lo = torch.maximum(lo_f.index_select(0, flat), res[0::2])
    new_hi = torch.minimum(hi_f.index_select(0, flat), -res[1::2])
    return (lo_f.index_put((flat,), new_lo).view_as(lo_ibp), hi_f.index_put((flat,), new_hi).view_as(hi_ibp))


def _refine(
    prob: Problem,
    k: int,
    relax: list[Relax],
    lo_ibp: torch.Tensor,
    hi_ibp: torch.Tensor,
    conv_mode: str = "auto",
    rows: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Back-substitution bounds of layer k's unstable neurons, intersected with the IBP ones."""
    # rows == "auto" used to pick the padded engine for dense rows into a conv layer (small feature
    # maps, e.g. 8x8 digits); since dense rows run channels-last (rows.py) groups are faster there
    # too: CNN3 digits, P=16, B=128, eps 0.1, CPU seconds (median of 5): groups 0.50, padded 0.85,
    # packed 0.84.
    if rows != "padded":
        return _refine_packed(prob, k, relax, lo_ibp, hi_ibp, conv_mode, rows)
    p, b = lo_ibp.shape[:2]
    lo_f, hi_f = lo_ibp.reshape(p, b, -1), hi_ibp.reshape(p, b, -1)
    unstable = (lo_f < 0) & (hi_f > 0)
    s = int(unstable.sum(-1).max())
    if s == 0:
        return lo_ibp, hi_ibp
    # unstable neurons first (stable sort keeps ascending index order), padded to s per example
    order = torch.argsort((~unstable).to(torch.int8), dim=-1, stable=True)[..., :s]
    valid = torch.gather(unstable, -1, order)
    num_n = lo_f.shape[-1]

    def make_rows(net, p0, p1, b0, b1, r0, r1):
        lay = net.layers[k]
        rows = torch.arange(r0, r1, device=order.device)
        idx = order[p0:p1, b0:b1][:, :, rows % s]  # (p, b, r)
        sign = torch.where(rows < s, 1.0, -1.0).to(lo_ibp.dtype)
        pc, bc, rc = idx.shape
        if not lay.is_conv:
            w = lay.weight.unsqueeze(1).expand(pc, bc, *lay.weight.shape[1:])
            a = torch.gather(w, 2, idx.unsqueeze(-1).expand(pc, bc, rc, w.shape[-1])) * sign[:, None]
            const = torch.gather(lay.bias.unsqueeze(1).expand(pc, bc, -1), 2, idx) * sign
            return a.reshape(pc, bc, rc, *lay.in_shape), const
        onehot = torch.zeros(pc, bc, rc, num_n, dtype=lo_ibp.dtype, device=lo_ibp.device)
        onehot.scatter_(3, idx.unsqueeze(-1), sign.view(1, 1, rc, 1).expand(pc, bc, rc, 1))
        flat = onehot.view(pc, bc * rc, *lay.out_shape)
        const = lay.bias_dot(flat).view(pc, bc, rc)
        return lay.adjoint(flat).reshape(pc, bc, rc, *lay.in_shape), const

    def solve(net, rel, lo, hi, p0, p1, b0, b1, r0, r1):
        rows = torch.arange(r0, r1, device=order.device)
        sign = torch.where(rows < s, 1.0, -1.0).to(lo_ibp.dtype)
        return patches.backsubstitute(net, k, order[p0:p1, b0:b1][:, :, rows % s], sign, rel, lo, hi)

    if _use_patches(prob, k, conv_mode):
        res = run_chunked(prob, k, 2 * s, relax, None, solve, patches.patch_numel(prob.net, k)[0])
    else:
        res = run_chunked(prob, k, 2 * s, relax, make_rows)  # (P, B, 2s)
    lo_g, hi_g = torch.gather(lo_f, -1, order), torch.gather(hi_f, -1, order)
    new_lo = torch.where(valid, torch.maximum(lo_g, res[..., :s]), lo_g)
    new_hi = torch.where(valid, torch.minimum(hi_g, -res[..., s:]), hi_g)
    lo_out = lo_f.scatter(-1, order, new_lo).view_as(lo_ibp)
    hi_out = hi_f.scatter(-1, order, new_hi).view_as(hi_ibp)
    return lo_out, hi_out


def intermediate_bounds(
    prob: Problem, refine: bool = True, conv_mode: str = "auto", rows: str = "auto"
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pre-activation bounds (P, B, *shape) of every hidden layer: DeepPoly (refine) or IBP.

    ``rows``: "packed" (one row pair per unstable neuron, ``rows.py``), "groups" (every neuron of
    a window group holding an unstable one), "padded" (every (member, example) padded to the
    most unstable one, the original engine) or "auto" (groups when they are mostly unstable, else
    packed).
    """
    _check(conv_mode, rows)
    if not refine:
        return ibp.activation_bounds(prob)
    if use_matrix(prob, conv_mode, rows):
        return matrix.intermediate_bounds(prob, refine)
    layers = prob.net.layers
    bounds = [ibp_layer(layers[0], prob.lo, prob.hi)] if len(layers) > 1 else []
    relax = [relu_relax(*bounds[0])] if bounds else []
    for k in range(1, len(layers) - 1):
        lo, hi = bounds[-1]
        lo_i, hi_i = ibp_layer(layers[k], lo.clamp(min=0), hi.clamp(min=0))
        bounds.append(_refine(prob, k, relax, lo_i, hi_i, conv_mode, rows))
        relax.append(relu_relax(*bounds[-1]))
    return bounds


def final_bound(prob: Problem, relax: list[Relax], conv_mode: str = "auto", rows: str = "auto") -> torch.Tensor:
    """Margin lower bounds (P, B, K-1) by back-substituting C W_last with the given relaxations
    (in matrix mode when ``use_matrix``)."""
    if use_matrix(prob, conv_mode, rows):
        return matrix.final_bound(prob, relax)
    net = prob.net
    k = len(net.layers) - 1
    w_c, b_c = margin_spec(net, prob.y)
    shape = net.layers[k].in_shape
    grad = torch.is_grad_enabled() and (
        any(t.requires_grad for layer in net.layers for t in (layer.weight, layer.bias))
        or any(t.requires_grad for r in relax for t in (r.alpha, r.slope, r.shift))
    )
    if prob.lo.device.type == "cpu" and not grad and k > 0:
        # CPU, no autograd: members one by one, channels-last, cache-sized example chunks
        # (grouped convolutions over members are slower than a loop of plain ones on CPU)
        return packed_rows.bound_spec(net, k, relax, prob.lo, prob.hi, w_c, b_c, prob.memory_budget_mb)

    def make_rows(sub, p0, p1, b0, b1, r0, r1):
        a = w_c[p0:p1, b0:b1, r0:r1]
        return a.reshape(*a.shape[:3], *shape), b_c[p0:p1, b0:b1, r0:r1]

    return run_chunked(prob, k, w_c.shape[2], relax, make_rows)


def bound(prob: Problem, refine: bool = True, conv_mode: str = "auto", rows: str = "auto") -> torch.Tensor:
    """Margin lower bounds (P, B, K-1): DeepPoly when ``refine`` else CROWN-IBP.

    conv_mode picks how rows starting at conv layers are back-substituted: "patches" (receptive
    fields only), "dense" (full feature maps), "matrix" (every layer as an explicit matrix,
    ``matrix.py``) or "auto" (matrix mode when ``use_matrix``, else whichever of patches and
    dense touches fewer elements).
    """
    _check(conv_mode, rows)
    if refine and use_matrix(prob, conv_mode, rows):
        return matrix.bound(prob, refine)
    relax = [relu_relax(lo, hi) for lo, hi in intermediate_bounds(prob, refine, conv_mode, rows)]
    return final_bound(prob, relax, conv_mode if refine else "dense", rows)
