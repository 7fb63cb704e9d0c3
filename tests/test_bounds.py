"""Soundness, tightness order, eps = 0, population stacking, chunking and determinism of the bounds."""

import itertools

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mpigls.bounds import METHODS, margin_lower_bounds
from mpigls.bounds.sabr import bound_at, small_box
from mpigls.nn import models
from mpigls.nn.attacks import margins, pgd

SOUND = ["ibp", "hbox", "crown-ibp", "deeppoly", "alpha-crown"]
SMALL = [("cnn3", (1, 8, 8)), ("cnn5", (1, 8, 8)), ("mlp-tiny", (1, 3, 3)), ("mlp-tiny", (2, 4, 4))]


def make(name, shape, seed, k=5, batch=3):
    torch.manual_seed(seed)
    model = models.build(name, shape, k, mean=[0.4] * shape[0], std=[0.3] * shape[0])
    return model, torch.rand(batch, *shape), torch.randint(0, k, (batch,))


def worst_margin(model, x, y, eps, lo=None, hi=None, num=256, seed=0):
    """Smallest margin seen over samples, box corners (if few pixels) and a PGD attack: (B, K-1)."""
    lo = (x - eps).clamp(0, 1) if lo is None else lo
    hi = (x + eps).clamp(0, 1) if hi is None else hi
    g = torch.Generator().manual_seed(seed)
    pts = [lo + (hi - lo) * torch.rand(num, *x.shape, generator=g)]
    n = x[0].numel()
    if n <= 9:
        corners = torch.tensor(list(itertools.product([0.0, 1.0], repeat=n))).view(-1, 1, *x.shape[1:])
        pts.append(lo + (hi - lo) * corners)
    pts = torch.cat(pts)
    with torch.no_grad():
        logits = model(pts.flatten(0, 1)).view(pts.shape[0], x.shape[0], -1)
    worst = margins(logits, y).min(0).values
    eps_box = (hi - lo) / 2
    adv = pgd(model, (hi + lo) / 2, y, eps_box, 20, 0.25 * float(eps_box.max()), loss="margin")
    with torch.no_grad():
        worst = torch.minimum(worst, margins(model(adv), y))
    return worst


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(case=st.sampled_from(SMALL), seed=st.integers(0, 10_000), eps=st.sampled_from([0.01, 0.05, 0.2]))
def test_sound_small(case, seed, eps):
    model, x, y = make(*case, seed)
    worst = worst_margin(model, x, y, eps)
    for method in SOUND:
        lb = margin_lower_bounds(model, x, y, eps, method).detach()
        assert (lb <= worst + 1e-5).all(), (method, (lb - worst).max())


@pytest.mark.parametrize(
    "name,shape", [("cnn3", (1, 28, 28)), pytest.param("cnn5", (3, 32, 32), marks=pytest.mark.slow)]
)
def test_sound_real_sizes(name, shape):
    model, x, y = make(name, shape, 0, k=10, batch=2)
    eps = 2 / 255
    worst = worst_margin(model, x, y, eps, num=64)
    for method in SOUND:
        lb = margin_lower_bounds(model, x, y, eps, method, memory_budget_mb=64).detach()
        assert (lb <= worst + 1e-5).all(), (method, (lb - worst).max())


@settings(max_examples=25, deadline=None)
@given(case=st.sampled_from(SMALL), seed=st.integers(0, 10_000), lam=st.sampled_from([0.1, 0.4, 1.0]))
def test_sabr_sound_on_its_small_box(case, seed, lam):
    """SABR bounds hold over the small box only (not the full eps-box)."""
    model, x, y = make(*case, seed)
    eps = torch.full((x.shape[0], 1, 1, 1), 0.1)
    x_adv = pgd(model, x, y, 0.1, 5, 0.03)
    lo, hi = small_box(x, eps, x_adv, lam)
    assert (lo >= (x - eps).clamp(0, 1) - 1e-7).all() and (hi <= (x + eps).clamp(0, 1) + 1e-7).all()
    lb = bound_at(model, x, y, 0.1, x_adv, sabr_lambda=lam).detach()
    assert (lb <= worst_margin(model, x, y, 0.1, lo, hi) + 1e-5).all()
    full = margin_lower_bounds(model, x, y, 0.1, "sabr", sabr_lambda=lam, pgd_steps=3).detach()
    assert full.shape == lb.shape
    if lam == 1.0:  # the small box is the whole box: plain IBP
        assert torch.allclose(lb, margin_lower_bounds(model, x, y, 0.1, "ibp").detach(), atol=1e-6)


@settings(max_examples=10, deadline=None)
@given(case=st.sampled_from(SMALL), seed=st.integers(0, 10_000), eps=st.sampled_from([0.01, 0.05, 0.2]))
def test_guaranteed_tightness_order(case, seed, eps):
    model, x, y = make(*case, seed)
    lb = {m: margin_lower_bounds(model, x, y, eps, m).detach() for m in SOUND}
    # guaranteed in exact arithmetic; float32 rounding of bounds of magnitude |b| is ~1e-7 |b|
    assert (lb["ibp"] <= lb["hbox"] + 1e-5 * (1 + lb["hbox"].abs())).all()
    assert (lb["deeppoly"] <= lb["alpha-crown"] + 1e-6 * (1 + lb["alpha-crown"].abs())).all()


def trained_ish(seed):
    """A CNN3 given 40 Adam steps of IBP training on a tiny synthetic task (class = brightest quadrant)."""
    model, x, _ = make("cnn3", (1, 12, 12), seed, batch=32)
    y = x.view(32, 1, 2, 6, 2, 6).mean((1, 3, 5)).flatten(1).argmax(1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        lb = margin_lower_bounds(model, x, y, 0.01, "ibp")
        loss = torch.nn.functional.softplus(-lb).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, x[:8], y[:8]


def test_typical_tightness_order():
    """Not guaranteed per example: CROWN-IBP beats IBP and DeepPoly beats CROWN-IBP on average."""
    wins_ci, wins_dp = [], []
    for seed in range(6):
        model, x, y = make("cnn3", (1, 12, 12), seed, batch=8) if seed % 2 else trained_ish(seed)
        ibp_lb, ci, dp = (margin_lower_bounds(model, x, y, 0.03, m).detach() for m in ("ibp", "crown-ibp", "deeppoly"))
        wins_ci.append((ci >= ibp_lb).float().mean())
        wins_dp.append((dp >= ci - 1e-6).float().mean())
    assert torch.stack(wins_ci).mean() > 0.5 and torch.stack(wins_dp).mean() > 0.5


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name,shape", [("cnn3", (1, 8, 8)), ("cnn5", (3, 8, 8)), ("mlp-tiny", (1, 4, 4))])
def test_eps_zero_gives_true_margin(method, name, shape):
    model, x, y = make(name, shape, 3)
    with torch.no_grad():
        true = margins(model(x), y)
    lb = margin_lower_bounds(model, x, y, 0.0, method).detach()
    assert torch.allclose(lb, true, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_population_equals_loop_and_is_deterministic(method):
    model, x, y = make("cnn3", (1, 8, 8), 5, batch=4)
    theta = models.flat_params(model)
    params = theta + 0.05 * torch.randn(3, theta.numel(), generator=torch.Generator().manual_seed(0))
    eps = torch.tensor([0.0, 0.02, 0.05, 0.1])
    stacked = margin_lower_bounds(model, x, y, eps, method, params).detach()
    again = margin_lower_bounds(model, x, y, eps, method, params).detach()
    assert torch.equal(stacked, again)
    loop = torch.stack([margin_lower_bounds(model, x, y, eps, method, p).detach() for p in params])
    assert stacked.shape == (3, 4, 4)
    assert torch.allclose(stacked, loop, atol=1e-5, rtol=1e-5)
    sub = margin_lower_bounds(model, x, y, eps, method, params[1:]).detach()
    assert torch.allclose(sub, stacked[1:], atol=1e-5, rtol=1e-5)
    chunked = margin_lower_bounds(model, x, y, eps, method, params, memory_budget_mb=0.02).detach()
    assert torch.allclose(chunked, stacked, atol=1e-5, rtol=1e-5)
    models.load_flat_(model, params[2])
    assert torch.allclose(margin_lower_bounds(model, x, y, eps, method).detach(), loop[2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["ibp", "hbox", "crown-ibp", "deeppoly", "sabr"])
def test_differentiable(method):
    model, x, y = make("cnn3", (1, 8, 8), 6)
    params = models.flat_params(model).repeat(2, 1).requires_grad_(True)
    lb = margin_lower_bounds(model, x, y, 0.05, method, params)
    (grad,) = torch.autograd.grad(lb.sum(), params)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    lb_model = margin_lower_bounds(model, x, y, 0.05, method)
    lb_model.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_input_validation():
    model, x, y = make("mlp-tiny", (1, 4, 4), 0)
    with pytest.raises(ValueError, match="unknown bound method"):
        margin_lower_bounds(model, x, y, 0.1, "zonotope")
    with pytest.raises(ValueError, match="eps"):
        margin_lower_bounds(model, x, y, torch.ones(7), "ibp")
    with pytest.raises(ValueError, match="non-negative"):
        margin_lower_bounds(model, x, y, -0.1, "ibp")
    with pytest.raises(ValueError, match="unknown option"):
        margin_lower_bounds(model, x, y, 0.1, "ibp", alpha_steps=3)
    with pytest.raises(ValueError, match="labels"):
        margin_lower_bounds(model, x, y + 10, 0.1, "ibp")
    with pytest.raises(ValueError, match="memory_budget_mb"):
        margin_lower_bounds(model, x, y, 0.1, "deeppoly", memory_budget_mb=0)


@pytest.mark.parametrize("method", ["hbox", "deeppoly", "crown-ibp"])
def test_chunked_gradient_matches_unchunked(method):
    """Small budgets chunk and recompute chunks in backward; the gradient stays the same."""
    model, x, y = make("cnn3", (1, 10, 10), 7, batch=4)
    params = models.flat_params(model).repeat(2, 1) + 0.01 * torch.randn(2, models.num_params(model))
    grads = []
    for budget in (1024, 0.02):
        p = params.clone().requires_grad_(True)
        lb = margin_lower_bounds(model, x, y, 0.05, method, p, memory_budget_mb=budget)
        grads.append(torch.autograd.grad(lb.sum(), p)[0])
    assert torch.allclose(grads[0], grads[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["patches", "dense"])
def test_conv_modes_agree_on_real_sizes(mode):
    model, x, y = make("cnn5", (3, 32, 32), 2, k=10, batch=2)
    auto = margin_lower_bounds(model, x, y, 2 / 255, "deeppoly").detach()
    other = margin_lower_bounds(model, x, y, 2 / 255, "deeppoly", conv_mode=mode).detach()
    assert torch.allclose(auto, other, atol=1e-4, rtol=1e-4)
