"""Complete l_inf robustness verification: branch and bound over DeepPoly bounds with exact LP leaves.

Question per sample (x, y, eps): is argmax f(x') = y for every x' in [x - eps, x + eps] ∩ [0, 1]?
Answers: ``verified`` (proved), ``falsified`` (a concrete counterexample x' in the box that the
network misclassifies, checked by a float64 forward pass of the network) or ``unknown`` (time or
domain limit reached, or a leaf whose LP optimum lies inside the tolerance band).

Method (all arithmetic in float64 on a dense copy of the network, ``DenseNet``):

1. Falsification first: the clean input, then PGD with restarts (``attacks.pgd``, margin and CE
   losses); every candidate is clipped into the float64 box and checked in float64.
2. DeepPoly (= CROWN, adaptive lower slopes) bounds every pre-activation and the margins
   z_y - z_i of a *domain*: an input box plus, per hidden neuron, a split state (+1 active:
   z >= 0, -1 inactive: z <= 0, 0 free). A split neuron's relaxation is exact for its side and its
   pre-activation bounds are clamped at 0 on that side; bounds of a child domain are intersected
   with its parent's (a child is a subset of its parent). Every bound is sound for the points of
   the box that satisfy the domain's split constraints.
3. Branching: the worst domains (lowest margin bound) first; a domain is split on the unstable
   neuron with the largest score |a| * u (-l) / (u - l) (a = the back-substitution coefficient of
   the worst margin row at that neuron, BaBSR-like), or, for tiny input dimensions (``auto`` with
   <= ``INPUT_SPLIT_MAX_DIMS`` inputs, a bounded number of times), bisected along the input
   dimension with the largest width * |coefficient|.
4. A domain with no unstable neuron left is linear: it is decided EXACTLY by linear programs
   (``scipy.optimize.linprog``, HiGHS) over the box and the activation-pattern constraints of its
   split neurons (stable neurons are implied by the bounds), one LP per margin. Never a box bound
   alone. Optimum > ``LP_TOL``: the leaf is safe; LP infeasible: the leaf is empty; optimum < 0
   with an LP solution that the network misclassifies (float64): falsified; anything else leaves
   the leaf undecided (the sample ends ``unknown`` unless a counterexample is found elsewhere).

Tolerances (on the safe side): a DeepPoly margin bound proves a domain only if > ``BOUND_TOL``
(float64 rounding of the bound computation is orders of magnitude below it); an LP optimum only if
> ``LP_TOL`` (above HiGHS's feasibility/optimality tolerances, ~1e-7); a domain is empty only if
some lower bound exceeds its upper bound by more than ``EMPTY_TOL``. What is verified is the
network's real-valued function with its float32 weights read exactly into float64.

``max_domains`` bounds the work deterministically (results then do not depend on the machine);
``time_limit`` (seconds) bounds the wall time.

Shapes: N domains, n_j neurons of affine layer j, n_0 input pixels, K classes.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from mpigls.nn import attacks
from mpigls.nn.models import Normalize
from mpigls.numerics import noise

__all__ = [
    "DenseNet",
    "VerifyResult",
    "dense_network",
    "deeppoly_margins",
    "verify",
    "STATUSES",
    "BOUND_TOL",
    "LP_TOL",
    "EMPTY_TOL",
    "INPUT_SPLIT_MAX_DIMS",
    "exact_min_margins",
]

STATUSES = ("verified", "falsified", "unknown")
BOUND_TOL = 1e-9
LP_TOL = 1e-6
EMPTY_TOL = 1e-9
INPUT_SPLIT_MAX_DIMS = 4
_DT = torch.float64


@dataclass(frozen=True)
class DenseNet:
    """f(x) = W_m relu(... relu(W_0 x + b_0) ...) + b_m on flat pixels x (normalisation folded in)."""

    weights: tuple[torch.Tensor, ...]  # (n_{j}, n_{j-1}) float64
    biases: tuple[torch.Tensor, ...]  # (n_j,) float64
    in_shape: tuple[int, ...]

    @property
    def num_hidden(self) -> int:
        return len(self.weights) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, n_0) float64 -> (N, K) logits."""
        h = x
        for j, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = h @ w.T + b
            if j < self.num_hidden:
                h = h.clamp(min=0)
        return h


def dense_network(model: nn.Sequential, in_shape) -> DenseNet:
    """Dense float64 affine layers of a Normalize/Conv2d/Linear/Flatten/ReLU ``Sequential``."""
    shape = tuple(int(s) for s in in_shape)
    n = int(np.prod(shape))
    w = torch.eye(n, dtype=_DT)
    b = torch.zeros(n, dtype=_DT)
    weights, biases = [], []
    for m in model:
        if isinstance(m, Normalize):
            mean = m.mean.to(_DT).expand(shape).reshape(-1)
            std = m.std.to(_DT).expand(shape).reshape(-1)
            w, b = w / std[:, None], (b - mean) / std
        elif isinstance(m, nn.Conv2d):
            kw: dict[str, Any] = dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)
            wt, bias = m.weight.detach().to("cpu", _DT), m.bias.detach().to("cpu", _DT) if m.bias is not None else None
            cols = torch.nn.functional.conv2d(w.T.reshape(w.shape[1], *shape), wt, None, **kw)
            b = torch.nn.functional.conv2d(b.reshape(1, *shape), wt, bias, **kw)
            shape = tuple(cols.shape[1:])
            w, b = cols.reshape(cols.shape[0], -1).T.contiguous(), b.reshape(-1)
        elif isinstance(m, nn.Linear):
            wt = m.weight.detach().to("cpu", _DT)
            w = wt @ w
            b = wt @ b + (m.bias.detach().to("cpu", _DT) if m.bias is not None else 0)
            shape = (wt.shape[0],)
        elif isinstance(m, nn.Flatten):
            shape = (int(np.prod(shape)),)
        elif isinstance(m, nn.ReLU):
            weights.append(w)
            biases.append(b)
            n = int(np.prod(shape))
            w, b = torch.eye(n, dtype=_DT), torch.zeros(n, dtype=_DT)
        else:
            raise TypeError(
                f"the verifier supports Normalize, Conv2d, Linear, Flatten and ReLU layers, got {type(m).__name__}"
            )
    if not weights and len(shape) != 1:
        raise ValueError("the network has no ReLU and no output layer")
    weights.append(w)
    biases.append(b)
    return DenseNet(tuple(weights), tuple(biases), tuple(int(s) for s in in_shape))


def _spec(net: DenseNet, y: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Margin rows z_y - z_i (i != y ascending) folded into the last layer: (K-1, n_{m-1}), (K-1,)."""
    w, b = net.weights[-1], net.biases[-1]
    others = [i for i in range(w.shape[0]) if i != y]
    return w[y] - w[others], b[y] - b[others]


@dataclass
class _Domains:
    """A stack of N domains: boxes, split states and the current pre-activation bounds."""

    lo: torch.Tensor  # (N, n_0)
    hi: torch.Tensor  # (N, n_0)
    splits: list[torch.Tensor]  # per hidden layer (N, n_j) int8 in {-1, 0, 1}
    lower: list[torch.Tensor]  # per hidden layer (N, n_j)
    upper: list[torch.Tensor]
    input_splits: torch.Tensor  # (N,) int: input bisections so far
    coef: list[torch.Tensor]  # per hidden layer (N, n_j): branching coefficients from the last bound
    coef_in: torch.Tensor  # (N, n_0)

    def __len__(self) -> int:
        return self.lo.shape[0]

    def select(self, idx: torch.Tensor) -> _Domains:
        return _Domains(
            self.lo[idx],
            self.hi[idx],
            [s[idx] for s in self.splits],
            [s[idx] for s in self.lower],
            [s[idx] for s in self.upper],
            self.input_splits[idx],
            [c[idx] for c in self.coef],
            self.coef_in[idx],
        )

    @staticmethod
    def cat(parts: list[_Domains]) -> _Domains:
        parts = [p for p in parts if len(p)]
        nj = len(parts[0].splits)
        return _Domains(
            torch.cat([p.lo for p in parts]),
            torch.cat([p.hi for p in parts]),
            [torch.cat([p.splits[j] for p in parts]) for j in range(nj)],
            [torch.cat([p.lower[j] for p in parts]) for j in range(nj)],
            [torch.cat([p.upper[j] for p in parts]) for j in range(nj)],
            torch.cat([p.input_splits for p in parts]),
            [torch.cat([p.coef[j] for p in parts]) for j in range(nj)],
            torch.cat([p.coef_in for p in parts]),
        )


@dataclass(frozen=True)
class _Bounds:
    margins: torch.Tensor  # (N, K-1) lower bounds of the margins
    empty: torch.Tensor  # (N,) bool: the domain was proved empty
    coef: list[torch.Tensor]  # per hidden layer (N, n_j): |coefficient| of the worst margin row
    coef_in: torch.Tensor  # (N, n_0) |coefficient| at the input


def _relax(lower, upper, split):
    """DeepPoly relaxation of h = relu(z) from bounds and split states: (alpha, slope, shift)."""
    active = (lower >= 0) | (split > 0)
    inactive = ((upper <= 0) | (split < 0)) & ~active
    unstable = ~active & ~inactive
    denom = torch.where(unstable, upper - lower, torch.ones_like(upper))
    slope = torch.where(unstable, upper / denom, active.to(_DT))
    shift = torch.where(unstable, -slope * lower, torch.zeros_like(upper))
    alpha = torch.where(unstable, (upper > -lower).to(_DT), active.to(_DT))
    return alpha, slope, shift


def _backsub(net: DenseNet, k: int, a: torch.Tensor, const: torch.Tensor, relax, lo, hi, keep: bool = False):
    """Lower bound of a . h_{k-1} + const over the domain; a (N, R, n_{k-1}) at the input of layer k.

    ``keep`` also returns the |coefficients| of row ``argmin`` per layer (filled by the caller).
    """
    coefs = []
    for i in range(k - 1, -1, -1):
        alpha, slope, shift = relax[i]
        neg = a.clamp(max=0)
        const = const + (neg * shift[:, None, :]).sum(-1)
        a = a * alpha[:, None, :] + neg * (slope - alpha)[:, None, :]  # coefficients on z_i
        if keep:
            coefs.append(a)
        const = const + a @ net.biases[i]
        a = a @ net.weights[i]
    mid, rad = (hi + lo) / 2, (hi - lo) / 2
    bound = const + (a @ mid[:, :, None]).squeeze(-1) - (a.abs() @ rad[:, :, None]).squeeze(-1)
    return bound, coefs[::-1], a


def _bound(net: DenseNet, spec: tuple[torch.Tensor, torch.Tensor], dom: _Domains) -> _Bounds:
    """DeepPoly over every domain; tightens ``dom.lower``/``dom.upper`` in place (intersection)."""
    n = len(dom)
    empty = torch.zeros(n, dtype=torch.bool)
    relax: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for j in range(net.num_hidden):
        w, b = net.weights[j], net.biases[j]
        if j == 0:
            mid, rad = (dom.hi + dom.lo) / 2, (dom.hi - dom.lo) / 2
            c = mid @ w.T + b
            r = rad @ w.abs().T
            lo_new, up_new = c - r, c + r
        else:
            a = torch.cat([w, -w])[None].expand(n, -1, -1)
            const = torch.cat([b, -b])[None].expand(n, -1)
            both, _, _ = _backsub(net, j, a, const, relax, dom.lo, dom.hi)
            lo_new, up_new = both[:, : w.shape[0]], -both[:, w.shape[0] :]
        lower = torch.maximum(dom.lower[j], lo_new)
        upper = torch.minimum(dom.upper[j], up_new)
        sp = dom.splits[j]
        lower = torch.where(sp > 0, lower.clamp(min=0), lower)
        upper = torch.where(sp < 0, upper.clamp(max=0), upper)
        empty |= (lower > upper + EMPTY_TOL).any(-1)
        upper = torch.maximum(upper, lower)
        dom.lower[j], dom.upper[j] = lower, upper
        relax.append(_relax(lower, upper, sp))
    sw, sb = spec
    margins, coefs, a_in = _backsub(
        net, net.num_hidden, sw[None].expand(n, -1, -1), sb[None].expand(n, -1), relax, dom.lo, dom.hi, keep=True
    )
    worst = margins.argmin(-1)
    rows = torch.arange(n)
    dom.coef, dom.coef_in = [c[rows, worst].abs() for c in coefs], a_in[rows, worst].abs()
    return _Bounds(margins, empty, dom.coef, dom.coef_in)


def deeppoly_margins(net: DenseNet, x: torch.Tensor, y: int, eps: float) -> torch.Tensor:
    """DeepPoly lower bounds of z_y - z_i (i != y ascending) over the box of one sample: (K-1,)."""
    dom = _root(net, x, eps)
    return _bound(net, _spec(net, y), dom).margins[0]


def _box(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().to("cpu", _DT).reshape(-1)
    return (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)


def _root(net: DenseNet, x: torch.Tensor, eps: float) -> _Domains:
    lo, hi = _box(x, eps)
    sizes = [w.shape[0] for w in net.weights[:-1]]
    return _Domains(
        lo[None],
        hi[None],
        [torch.zeros(1, s, dtype=torch.int8) for s in sizes],
        [torch.full((1, s), -torch.inf, dtype=_DT) for s in sizes],
        [torch.full((1, s), torch.inf, dtype=_DT) for s in sizes],
        torch.zeros(1, dtype=torch.long),
        [torch.zeros(1, s, dtype=_DT) for s in sizes],
        torch.zeros_like(lo[None]),
    )


@dataclass(frozen=True)
class VerifyResult:
    status: str  # verified | falsified | unknown
    reason: str  # clean, pgd, bound, bab, leaf-lp, timeout, domain-limit, undecided-leaf
    root_bound: float  # DeepPoly min margin bound of the whole box (nan if not computed)
    domains: int  # domains bounded (root included)
    lps: int  # leaf LPs solved
    time_s: float
    counterexample: np.ndarray | None = field(default=None, repr=False)  # (C, H, W) float64 pixels

    def to_dict(self) -> dict:
        return {
            "status": self.status,
            "reason": self.reason,
            "root_bound": self.root_bound,
            "domains": self.domains,
            "lps": self.lps,
            "time_s": self.time_s,
        }


def _misclassified(model64: nn.Sequential, cand: torch.Tensor, y: int, lo, hi, in_shape) -> torch.Tensor | None:
    """The first candidate (clipped into the float64 box) the float64 network misclassifies, or None."""
    cand = torch.minimum(torch.maximum(cand.detach().to("cpu", _DT).reshape(cand.shape[0], -1), lo), hi)
    with torch.no_grad():
        logits = model64(cand.reshape(cand.shape[0], *in_shape))
    k = logits.shape[-1]
    others = torch.tensor([i for i in range(k) if i != y])
    margin = logits[:, y] - logits[:, others].max(-1).values
    bad = torch.nonzero(margin < 0).flatten()
    return cand[int(bad[0])] if len(bad) else None


def _model64(model: nn.Sequential) -> nn.Sequential:
    """A float64 CPU copy of the network (counterexamples are checked with it)."""
    return copy.deepcopy(model).to("cpu", _DT).eval()


def _leaf_lp(net: DenseNet, spec, dom: _Domains, i: int):
    """Exact decision of a linear domain: (min margin over the leaf or +inf if empty, argmin x)."""
    from scipy.optimize import linprog

    lo, hi = dom.lo[i].numpy(), dom.hi[i].numpy()
    m_mat, c_vec = net.weights[0].numpy(), net.biases[0].numpy()
    a_rows, b_rows = [], []
    for j in range(net.num_hidden):
        sp = dom.splits[j][i].numpy()
        active = (dom.lower[j][i].numpy() >= 0) | (sp > 0)
        for sign, sel in ((-1.0, sp > 0), (1.0, sp < 0)):  # active: -z <= 0; inactive: z <= 0
            if sel.any():
                a_rows.append(sign * m_mat[sel])
                b_rows.append(-sign * c_vec[sel])
        d = active.astype(np.float64)
        w, b = net.weights[j + 1].numpy(), net.biases[j + 1].numpy()
        if j + 1 < net.num_hidden:
            m_mat, c_vec = (w * d) @ m_mat, (w * d) @ c_vec + b
        else:
            m_mat, c_vec = (spec[0].numpy() * d) @ m_mat, (spec[0].numpy() * d) @ c_vec + spec[1].numpy()
    a_ub = np.concatenate(a_rows) if a_rows else None
    b_ub = np.concatenate(b_rows) if b_rows else None
    best, arg = np.inf, None
    for row in range(m_mat.shape[0]):
        res = linprog(m_mat[row], A_ub=a_ub, b_ub=b_ub, bounds=list(zip(lo, hi)), method="highs")
        if res.status == 2:  # infeasible: the leaf is empty
            return np.inf, None
        if res.status != 0:
            return np.nan, None
        val = float(res.fun + c_vec[row])
        if val < best:
            best, arg = val, res.x
    return best, arg


def _branch(net: DenseNet, dom: _Domains, input_split: torch.Tensor) -> _Domains:
    """Two children per domain: a ReLU split (or an input bisection where ``input_split``)."""
    n = len(dom)
    scores = []
    for j in range(net.num_hidden):
        l, u = dom.lower[j], dom.upper[j]
        unstable = (l < 0) & (u > 0) & (dom.splits[j] == 0)
        gap = torch.where(unstable, u * (-l) / (u - l).clamp(min=1e-300), torch.zeros_like(u))
        scores.append(torch.where(unstable, gap * dom.coef[j] + 1e-12 * gap, torch.full_like(u, -1.0)))
    flat = torch.cat(scores, 1)
    pick = flat.argmax(1)
    sizes = [s.shape[1] for s in scores]
    offsets = np.cumsum([0] + sizes)
    left, right = dom.select(torch.arange(n)), dom.select(torch.arange(n))
    left.splits = [s.clone() for s in left.splits]
    right.splits = [s.clone() for s in right.splits]
    left.lo, left.hi, right.lo, right.hi = left.lo.clone(), left.hi.clone(), right.lo.clone(), right.hi.clone()
    dim_score = (dom.hi - dom.lo) * (dom.coef_in + 1e-12)
    dim = dim_score.argmax(1)
    for r in range(n):
        if bool(input_split[r]):
            d = int(dim[r])
            midpoint = float((dom.lo[r, d] + dom.hi[r, d]) / 2)
            left.hi[r, d] = midpoint
            right.lo[r, d] = midpoint
        else:
            p = int(pick[r])
            j = int(np.searchsorted(offsets, p, side="right") - 1)
            left.splits[j][r, p - offsets[j]] = 1
            right.splits[j][r, p - offsets[j]] = -1
    both = _Domains.cat([left, right])
    both.input_splits = torch.cat([dom.input_splits + input_split.long()] * 2)
    return both


def verify(
    model: nn.Sequential,
    x: torch.Tensor,
    y: int,
    eps: float,
    *,
    net: DenseNet | None = None,
    time_limit: float | None = 60.0,
    max_domains: int | None = None,
    pgd_restarts: int = 5,
    pgd_steps: int = 50,
    seed: int = 0,
    index: int = 0,
    branching: str = "auto",
    batch: int = 64,
    model64: nn.Sequential | None = None,
) -> VerifyResult:
    """Decide robustness of one sample x (C, H, W) pixels with label y at radius eps.

    ``net``/``model64`` may be passed to reuse the dense and float64 copies across samples;
    ``index`` (the sample's global index) keys the PGD restarts' random starts.
    """
    if branching not in ("auto", "relu", "input"):
        raise ValueError(f"branching must be auto, relu or input, got {branching!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be non-negative, got {eps}")
    t0 = time.perf_counter()
    in_shape = tuple(x.shape)
    net = net or dense_network(model, in_shape)
    model64 = model64 or _model64(model)
    lo, hi = _box(x, eps)

    def done(status, reason, root=float("nan"), domains=0, lps=0, cex=None):
        return VerifyResult(
            status,
            reason,
            root,
            domains,
            lps,
            time.perf_counter() - t0,
            None if cex is None else cex.numpy().reshape(in_shape),
        )

    cex = _misclassified(model64, x.reshape(1, -1), y, lo, hi, in_shape)
    if cex is not None:
        return done("falsified", "clean", cex=cex)
    if eps > 0 and pgd_restarts > 0:
        device = next(model.parameters()).device
        xb = x[None].to(device, next(model.parameters()).dtype)
        yb = torch.tensor([y], device=device)
        for r in range(pgd_restarts):
            gen = noise.torch_generator(seed, noise.STREAM_ATTACK, 1 << 31, index * 1024 + r)
            adv = attacks.pgd(
                model,
                xb,
                yb,
                eps,
                pgd_steps,
                attacks.default_step_size(eps, pgd_steps),
                generator=gen,
                loss="margin" if r % 2 == 0 else "ce",
            )
            cex = _misclassified(model64, adv.reshape(1, -1), y, lo, hi, in_shape)
            if cex is not None:
                return done("falsified", "pgd", cex=cex)
    spec = _spec(net, int(y))
    frontier = _root(net, x, eps)
    bnd = _bound(net, spec, frontier)
    root = float(bnd.margins.min())
    if bool(bnd.empty[0]) or root > BOUND_TOL:
        return done("verified", "bound", root, 1, 0)
    use_input = branching == "input" or (branching == "auto" and lo.numel() <= INPUT_SPLIT_MAX_DIMS)
    max_input_splits = 10 * lo.numel() if branching == "auto" else 1 << 30
    n_domains, n_lps, undecided = 1, 0, False
    pending = [(frontier, bnd)]
    frontier_doms: list[_Domains] = []
    frontier_worst: list[torch.Tensor] = []
    while True:
        # settle freshly bounded domains: proved, empty, linear leaves (LP) or kept for branching
        for dom, b in pending:
            worst = b.margins.min(-1).values
            open_ = ~b.empty & ~(worst > BOUND_TOL)
            unstable = torch.zeros(len(dom), dtype=torch.bool)
            for j in range(net.num_hidden):
                unstable |= ((dom.lower[j] < 0) & (dom.upper[j] > 0) & (dom.splits[j] == 0)).any(-1)
            leaves = torch.nonzero(open_ & ~unstable).flatten()
            for i in leaves.tolist():
                n_lps += 1
                val, arg = _leaf_lp(net, spec, dom, i)
                if val > LP_TOL:
                    continue
                if arg is not None:
                    cex = _misclassified(model64, torch.as_tensor(arg)[None], y, lo, hi, in_shape)
                    if cex is not None:
                        return done("falsified", "leaf-lp", root, n_domains, n_lps, cex)
                undecided = True
            keep = torch.nonzero(open_ & unstable).flatten()
            if len(keep):
                frontier_doms.append(dom.select(keep))
                frontier_worst.append(worst[keep])
        pending = []
        if not frontier_doms:
            break
        if time_limit is not None and time.perf_counter() - t0 > time_limit:
            return done("unknown", "timeout", root, n_domains, n_lps)
        if max_domains is not None and n_domains >= max_domains:
            return done("unknown", "domain-limit", root, n_domains, n_lps)
        doms = _Domains.cat(frontier_doms)
        worst = torch.cat(frontier_worst)
        order = torch.argsort(worst, stable=True)
        take = order[:batch]
        rest = order[batch:]
        parents = doms.select(take)
        frontier_doms = [doms.select(rest)] if len(rest) else []
        frontier_worst = [worst[rest]] if len(rest) else []
        input_split = torch.full((len(parents),), use_input) & (parents.input_splits < max_input_splits)
        children = _branch(net, parents, input_split)
        cb = _bound(net, spec, children)
        n_domains += len(children)
        pending = [(children, cb)]
    if undecided:
        return done("unknown", "undecided-leaf", root, n_domains, n_lps)
    return done("verified", "bab", root, n_domains, n_lps)


def exact_min_margins(net: DenseNet, x: torch.Tensor, y: int, eps: float) -> np.ndarray:
    """Exact min over the box of every margin z_y - z_i by a big-M MILP (scipy.optimize.milp).

    The reference oracle for tests on tiny networks: variables x, z_j, h_j and one binary per
    unstable neuron (interval bounds give the big-M constants).
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    lo, hi = (t.numpy() for t in _box(x, eps))
    # interval bounds of every pre-activation for big-M
    l_in, u_in = lo, hi
    pre = []
    for j in range(net.num_hidden):
        w, b = net.weights[j].numpy(), net.biases[j].numpy()
        mid, rad = (u_in + l_in) / 2, (u_in - l_in) / 2
        l, u = w @ mid + b - np.abs(w) @ rad, w @ mid + b + np.abs(w) @ rad
        pre.append((l, u))
        l_in, u_in = np.maximum(l, 0), np.maximum(u, 0)
    n0 = lo.size
    sizes = [w.shape[0] for w in net.weights[:-1]]
    # variable layout: x | (h_j, d_j) per hidden layer
    offs, pos = [], n0
    for s in sizes:
        offs.append((pos, pos + s))
        pos += 2 * s
    nv = pos
    rows, lbs, ubs = [], [], []
    lb_v, ub_v = np.full(nv, -np.inf), np.full(nv, np.inf)
    lb_v[:n0], ub_v[:n0] = lo, hi
    integ = np.zeros(nv)
    prev = (0, n0)
    for j, s in enumerate(sizes):
        w, b = net.weights[j].numpy(), net.biases[j].numpy()
        l, u = pre[j]
        h0, d0 = offs[j]
        lb_v[h0 : h0 + s], ub_v[h0 : h0 + s] = 0, np.maximum(u, 0)
        lb_v[d0 : d0 + s], ub_v[d0 : d0 + s] = 0, 1
        integ[d0 : d0 + s] = 1
        for k in range(s):
            z = np.zeros(nv)
            z[prev[0] : prev[1]] = w[k]
            hk, dk = h0 + k, d0 + k
            # z = w.h_prev + b;  h >= z;  h <= z - l (1 - d);  h <= u d
            for extra, lo_c, hi_c in (({hk: 1.0}, b[k], np.inf), ({hk: 1.0, dk: -l[k]}, -np.inf, b[k] - l[k])):
                r = -z.copy()
                for idx, val in extra.items():
                    r[idx] += val
                rows.append(r)
                lbs.append(lo_c)
                ubs.append(hi_c)
            r = np.zeros(nv)
            r[hk], r[dk] = 1.0, -max(u[k], 0.0)
            rows.append(r)
            lbs.append(-np.inf)
            ubs.append(0.0)
        prev = (h0, h0 + s)
    sw, sb = (t.numpy() for t in _spec(net, int(y)))
    out = []
    cons = LinearConstraint(np.array(rows), np.array(lbs), np.array(ubs)) if rows else None
    for i in range(sw.shape[0]):
        c = np.zeros(nv)
        if sizes:
            c[prev[0] : prev[1]] = sw[i]
        else:
            c[:n0] = sw[i]
        res = milp(c, constraints=cons, integrality=integ, bounds=Bounds(lb_v, ub_v), options={"mip_rel_gap": 1e-9})
        if res.status != 0:
            raise RuntimeError(f"milp failed: {res.message}")
        out.append(res.fun + sb[i])
    return np.array(out)
