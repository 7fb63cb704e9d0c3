"""Exactness of ibp / crown-ibp / deeppoly against a dense float64 reference written here.

The reference builds explicit layer matrices by identity probing and implements the same
semantics as the engine: exact first-layer bounds, IBP-unstable neurons refined by
back-substitution and intersected with IBP, adaptive lower slope, C merged with the last layer.
"""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mpigls.bounds import margin_lower_bounds
from mpigls.nn import models

CASES = [("cnn3", (1, 8, 8)), ("cnn5", (1, 8, 8)), ("mlp-tiny", (1, 4, 4)), ("cnn3", (2, 6, 6))]


def dense_layers(model, in_shape):
    """[(W (N_out, N_in), b (N_out,))] for every affine layer, in float64, plus Normalize stats."""
    layers, mods = [], list(model)
    shape = in_shape
    norm = mods[0]
    for m in mods:
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            n_in = int(torch.tensor(shape).prod())
            eye = torch.eye(n_in, dtype=torch.float64).reshape(n_in, *shape)
            with torch.no_grad():
                if isinstance(m, torch.nn.Linear):
                    out = eye.reshape(n_in, -1) @ m.weight.double().T
                else:
                    out = torch.nn.functional.conv2d(eye, m.weight.double(), None, m.stride, m.padding)
            shape = tuple(out.shape[1:])
            b = m.bias.double()
            if isinstance(m, torch.nn.Conv2d):
                b = b.view(-1, 1, 1).expand(*shape).reshape(-1)
            layers.append((out.reshape(n_in, -1).T.contiguous(), b.clone()))
        elif isinstance(m, torch.nn.Flatten):
            shape = (int(torch.tensor(shape).prod()),)
    return norm, layers


def interval(w, b, lo, hi):
    return w.clamp(min=0) @ lo + w.clamp(max=0) @ hi + b, w.clamp(min=0) @ hi + w.clamp(max=0) @ lo + b


def reference(model, x, y, eps, method):
    norm, layers = dense_layers(model, tuple(x.shape[1:]))
    out = []
    for xb, yb in zip(x.double(), y):
        lo = (((xb - eps).clamp(0, 1) - norm.mean.double()) / norm.std.double()).reshape(-1)
        hi = (((xb + eps).clamp(0, 1) - norm.mean.double()) / norm.std.double()).reshape(-1)
        bounds = []

        def backsub(a, const, k):
            for i in range(k - 1, -1, -1):
                l, u = bounds[i]
                unst = (l < 0) & (u > 0)
                s = torch.where(unst, u / torch.where(unst, u - l, torch.ones_like(u)), (l >= 0).double())
                t = torch.where(unst, -s * l, torch.zeros_like(u))
                al = torch.where(unst, (u > -l).double(), (l >= 0).double())
                pos, neg = a.clamp(min=0), a.clamp(max=0)
                const = const + neg @ t
                a = pos * al + neg * s
                w, b = layers[i]
                const = const + a @ b
                a = a @ w
            return const + a.clamp(min=0) @ lo + a.clamp(max=0) @ hi

        for k, (w, b) in enumerate(layers[:-1]):
            if k == 0:
                bounds.append(interval(w, b, lo, hi))
                continue
            l, u = interval(w, b, bounds[-1][0].clamp(min=0), bounds[-1][1].clamp(min=0))
            if method == "deeppoly":
                l, u = l.clone(), u.clone()
                for j in torch.nonzero((l < 0) & (u > 0)).flatten().tolist():
                    lb = backsub(w[j : j + 1], b[j : j + 1], k)[0]
                    ub = -backsub(-w[j : j + 1], -b[j : j + 1], k)[0]
                    l[j], u[j] = max(l[j], lb), min(u[j], ub)
            bounds.append((l, u))
        w, b = layers[-1]
        others = [i for i in range(w.shape[0]) if i != int(yb)]
        wc, bc = w[int(yb)] - w[others], b[int(yb)] - b[others]
        if method == "ibp":
            if bounds:
                lo_a, hi_a = bounds[-1][0].clamp(min=0), bounds[-1][1].clamp(min=0)
            else:
                lo_a, hi_a = lo, hi
            out.append(interval(wc, bc, lo_a, hi_a)[0])
        else:
            out.append(backsub(wc, bc, len(layers) - 1))
    return torch.stack(out)


@pytest.mark.slow
@settings(max_examples=14, deadline=None)
@given(
    case=st.sampled_from(CASES),
    seed=st.integers(0, 10_000),
    eps=st.sampled_from([0.0, 0.02, 0.1, 0.3]),
    method=st.sampled_from(["ibp", "crown-ibp", "deeppoly", "deeppoly-patches", "deeppoly-dense"]),
)
def test_matches_dense_reference(case, seed, eps, method):
    name, shape = case
    torch.manual_seed(seed)
    model = models.build(name, shape, 5, mean=[0.3] * shape[0], std=[0.4] * shape[0]).double()
    x = torch.rand(3, *shape, dtype=torch.float64)
    y = torch.randint(0, 5, (3,))
    opts = {"conv_mode": method.split("-")[1]} if method.startswith("deeppoly-") else {}
    method = method.split("-")[0] if method.startswith("deeppoly") else method
    got = margin_lower_bounds(model, x, y, eps, method, memory_budget_mb=0.05, **opts).detach()
    ref = reference(model, x, y, eps, method)
    tol = 1e-9 if method == "ibp" else 1e-5
    assert torch.allclose(got, ref, rtol=tol, atol=tol * ref.abs().max().item() + 1e-12), (got - ref).abs().max()


def test_float32_close_to_reference():
    torch.manual_seed(1)
    model = models.build("cnn3", (1, 8, 8), 4)
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 4, (4,))
    got = margin_lower_bounds(model, x, y, 0.05, "deeppoly").detach().double()
    ref = reference(model.double(), x, y, 0.05, "deeppoly")
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4)
