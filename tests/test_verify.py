"""The complete verifier against exact oracles on tiny random networks, and its soundness pieces.

Oracle: ``verify.exact_min_margins`` (big-M MILP, scipy.optimize.milp), itself checked against
exhaustive enumeration of activation patterns with one LP each. Radii are chosen around each
network's exact robustness radius (bisection with the MILP), so many cases are ones where
DeepPoly alone fails (the test asserts there are such cases, verified and falsified).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linprog
from torch import nn

from mpigls import bounds
from mpigls.evaluation import verify as V
from mpigls.nn import models
from mpigls.nn.models import Normalize


def _tiny(seed: int, n_in: int, hidden: list[int], k: int) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = [Normalize([0.0], [1.0]), nn.Flatten()]
    d = n_in
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    layers.append(nn.Linear(d, k))
    m = nn.Sequential(*layers)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return m


def _case(seed: int):
    rng = np.random.default_rng(seed)
    n_in = int(rng.integers(2, 5))
    hidden = [int(rng.integers(2, 5)) for _ in range(int(rng.integers(1, 3)))]
    k = int(rng.integers(2, 4))
    m = _tiny(seed, n_in, hidden, k)
    x = torch.rand(1, 1, n_in, generator=torch.Generator().manual_seed(seed + 1000))
    with torch.no_grad():
        y = int(m(x[None]).argmax())
    net = V.dense_network(m, (1, 1, n_in))
    # exact robustness radius by bisection on the MILP, then a radius just inside or outside
    lo_e, hi_e = 0.0, 1.0
    if V.exact_min_margins(net, x, y, hi_e).min() > 0:
        return None
    for _ in range(8):
        mid = (lo_e + hi_e) / 2
        lo_e, hi_e = (mid, hi_e) if V.exact_min_margins(net, x, y, mid).min() > 0 else (lo_e, mid)
    eps = float(lo_e * rng.uniform(0.9, 0.995) if seed % 2 else hi_e * rng.uniform(1.01, 1.2))
    return m, net, x, y, eps


def _enumerate_min(net: V.DenseNet, x, y, eps) -> float:
    """min over the box of min_i margin_i by enumerating every activation pattern (one LP each)."""
    lo, hi = (t.numpy() for t in V._box(x, eps))
    sizes = [w.shape[0] for w in net.weights[:-1]]
    sw, sb = (t.numpy() for t in V._spec(net, y))
    best = np.inf
    for bits in itertools.product([0, 1], repeat=sum(sizes)):
        m_mat, c_vec = net.weights[0].numpy(), net.biases[0].numpy()
        a_rows, b_rows, pos = [], [], 0
        for j, s in enumerate(sizes):
            d = np.array(bits[pos : pos + s], dtype=float)
            pos += s
            sign = np.where(d > 0, -1.0, 1.0)  # active: -z <= 0, inactive: z <= 0
            a_rows.append(sign[:, None] * m_mat)
            b_rows.append(-sign * c_vec)
            w, b = (net.weights[j + 1].numpy(), net.biases[j + 1].numpy()) if j + 1 < len(sizes) else (sw, sb)
            m_mat, c_vec = (w * d) @ m_mat, (w * d) @ c_vec + b
        for row in range(m_mat.shape[0]):
            res = linprog(
                m_mat[row],
                A_ub=np.concatenate(a_rows),
                b_ub=np.concatenate(b_rows),
                bounds=list(zip(lo, hi)),
                method="highs",
            )
            if res.status == 0:
                best = min(best, res.fun + c_vec[row])
    return best


@pytest.mark.slow
def test_milp_oracle_equals_enumeration():
    checked = 0
    for seed in range(40):
        case = _case(seed)
        if case is None:
            continue
        _, net, x, y, eps = case
        if sum(w.shape[0] for w in net.weights[:-1]) > 6:
            continue
        assert V.exact_min_margins(net, x, y, eps).min() == pytest.approx(_enumerate_min(net, x, y, eps), abs=1e-6)
        checked += 1
        if checked == 4:
            break
    assert checked == 4


@pytest.mark.slow
def test_verifier_equals_exact_oracle_on_random_tiny_networks():
    """verify() answers exactly like the MILP, also where DeepPoly alone fails; no unknowns."""
    seen = {"deeppoly-fails-verified": 0, "deeppoly-fails-falsified": 0}
    cases = 0
    for seed in range(60):
        case = _case(seed)
        if case is None:
            continue
        m, net, x, y, eps = case
        exact = float(V.exact_min_margins(net, x, y, eps).min())
        if abs(exact) < 1e-5:
            continue  # inside the documented tolerance band: either answer or unknown is allowed
        truth = "verified" if exact > 0 else "falsified"
        dp = float(V.deeppoly_margins(net, x, y, eps).min())
        assert dp <= exact + 1e-9  # DeepPoly is sound
        # relu branching without PGD: falsification must come from the exact LP leaves
        for branching, restarts in (("relu", 0), ("input", 0), ("auto", 1)):
            res = V.verify(
                m,
                x,
                y,
                eps,
                branching=branching,
                pgd_restarts=restarts,
                pgd_steps=10,
                max_domains=50_000,
                time_limit=None,
            )
            assert res.status == truth, (seed, branching, exact, dp, res)
            if res.status == "falsified":
                cex = torch.as_tensor(res.counterexample)
                lo, hi = V._box(x, eps)
                assert bool(((cex.reshape(-1) >= lo) & (cex.reshape(-1) <= hi)).all())
                assert int(m.double()(cex[None]).argmax()) != y
                m.float()
        if dp <= 0:
            seen[f"deeppoly-fails-{truth}"] += 1
        cases += 1
    assert cases >= 20, cases
    assert seen["deeppoly-fails-verified"] >= 4 and seen["deeppoly-fails-falsified"] >= 4, seen


def test_dense_network_and_deeppoly_match_the_bound_engine_on_cnn3():
    torch.manual_seed(0)
    model = models.build("cnn3", (1, 8, 8), 10, mean=[0.3], std=[0.4])
    x = torch.rand(3, 1, 8, 8)
    y = torch.tensor([1, 4, 7])
    net = V.dense_network(model, (1, 8, 8))
    with torch.no_grad():
        ref = model.double()(x.double())
    model.float()
    assert torch.allclose(net.forward(x.reshape(3, -1).double()), ref, atol=1e-10)
    with torch.no_grad():
        engine = bounds.margin_lower_bounds(model, x, y, 0.02, "deeppoly").double()
    ours = torch.stack([V.deeppoly_margins(net, x[i], int(y[i]), 0.02) for i in range(3)])
    assert torch.allclose(ours, engine, atol=1e-4)


def test_split_bounds_are_sound_for_their_branch():
    """Every point of the box sampled into a branch satisfies that branch's DeepPoly bounds."""
    m = _tiny(3, 3, [6, 5], 3)
    net = V.dense_network(m, (1, 1, 3))
    x = torch.full((1, 1, 3), 0.5)
    spec = V._spec(net, 0)
    root = V._root(net, x, 0.4)
    V._bound(net, spec, root)
    pts = root.lo + (root.hi - root.lo) * torch.rand(4000, 3, dtype=torch.float64)
    z0 = pts @ net.weights[0].T + net.biases[0]
    z1 = z0.clamp(min=0) @ net.weights[1].T + net.biases[1]
    out = z1.clamp(min=0) @ spec[0].T + spec[1]
    for j, neuron in ((0, 0), (0, 3), (1, 2)):
        for side in (1, -1):
            dom = V._root(net, x, 0.4)
            dom.splits[j][0, neuron] = side
            b = V._bound(net, spec, dom)
            z = (z0, z1)[j]
            inside = (z[:, neuron] >= 0) if side > 0 else (z[:, neuron] <= 0)
            if not inside.any():
                continue
            assert bool((out[inside] >= b.margins[0] - 1e-9).all())
            for jj, zz in enumerate((z0, z1)):
                assert bool((zz[inside] >= dom.lower[jj][0] - 1e-9).all())
                assert bool((zz[inside] <= dom.upper[jj][0] + 1e-9).all())


def test_verify_on_trained_like_cnn3_is_consistent_with_bounds_and_pgd():
    torch.manual_seed(1)
    model = models.build("cnn3", (1, 8, 8), 10)
    x = torch.rand(1, 8, 8)
    with torch.no_grad():
        y = int(model(x[None]).argmax())
    res = V.verify(model, x, y, 0.0, time_limit=None, max_domains=10)
    assert res.status == "verified"  # eps 0: only the clean point, correctly classified
    res = V.verify(model, x, (y + 1) % 10, 0.01, time_limit=None, max_domains=10)
    assert res.status == "falsified" and res.reason == "clean"


def test_verify_rejects_bad_arguments():
    m = _tiny(0, 2, [2], 2)
    with pytest.raises(ValueError, match="branching"):
        V.verify(m, torch.zeros(1, 1, 2), 0, 0.1, branching="best")
    with pytest.raises(ValueError, match="eps"):
        V.verify(m, torch.zeros(1, 1, 2), 0, -0.1)
