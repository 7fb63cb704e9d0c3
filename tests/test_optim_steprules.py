"""Step rules (Adam vs torch.optim.Adam, ClipUp speed limit), fitness shaping and schedules."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mpigls.optim import schedules, shaping, steprules


def test_adam_matches_torch():
    torch.manual_seed(0)
    theta = torch.randn(5)
    ref = theta.clone().requires_grad_(True)
    opt = torch.optim.Adam([ref], lr=0.01, betas=(0.8, 0.99), eps=1e-8)
    state = steprules.init("adam", theta)
    for _ in range(5):
        g = torch.randn(5)
        ref.grad = g.clone()
        opt.step()
        delta, state = steprules.adam(state, g, lr=0.01, beta1=0.8, beta2=0.99, eps=1e-8)
        theta = theta - delta
    assert state.t == 5
    torch.testing.assert_close(theta, ref.detach(), rtol=1e-5, atol=1e-6)


def test_clipup_normalises_and_limits_speed():
    state = steprules.init("clipup", torch.zeros(3))
    delta, state = steprules.clipup(state, torch.tensor([30.0, 40.0, 0.0]), lr=0.1, momentum=0.9, max_speed=0.15)
    torch.testing.assert_close(delta, torch.tensor([0.06, 0.08, 0.0]))  # lr * unit gradient
    for _ in range(20):
        delta, state = steprules.clipup(state, torch.tensor([3.0, 4.0, 0.0]), lr=0.1, momentum=0.9, max_speed=0.15)
        assert float(delta.norm()) <= 0.15 * (1 + 1e-6)
    torch.testing.assert_close(float(delta.norm()), 0.15)
    delta, _ = steprules.clipup(steprules.init("clipup", torch.zeros(3)), torch.zeros(3), lr=0.1)
    assert torch.equal(delta, torch.zeros(3))
    # default max_speed is 2 * lr
    state = steprules.init("clipup", torch.zeros(1))
    for _ in range(50):
        delta, state = steprules.clipup(state, torch.ones(1), lr=0.1, momentum=0.9)
    torch.testing.assert_close(float(delta.abs()), 0.2)


def test_clip_grad_norm():
    g, norm = steprules.clip_grad_norm(torch.tensor([3.0, 4.0]), 1.0)
    assert norm == 5.0
    torch.testing.assert_close(g, torch.tensor([0.6, 0.8]))
    g, _ = steprules.clip_grad_norm(torch.tensor([3.0, 4.0]), None)
    assert torch.equal(g, torch.tensor([3.0, 4.0]))


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(-1000, 1000), min_size=1, max_size=40, unique=True), st.sampled_from(["affine", "cube", "exp"])
)
def test_centered_ranks_invariant_under_increasing_transforms(values, transform):
    x = torch.tensor(values, dtype=torch.float64)
    y = {"affine": 3 * x + 7, "cube": x**3, "exp": torch.exp(x / 100)}[transform]
    u = shaping.centered_ranks(x)
    assert torch.equal(u, shaping.centered_ranks(y))
    if len(values) > 1:
        assert float(u.min()) == -0.5 and float(u.max()) == 0.5
        assert float(u[x.argmin()]) == -0.5
    assert abs(float(u.sum())) < 1e-9


def test_shaping_nonfinite_and_normalized():
    u = shaping.centered_ranks(torch.tensor([1.0, float("nan"), 0.0, float("inf")]))
    assert float(u[2]) == -0.5 and float(u[0]) == pytest.approx(-1 / 6)
    assert sorted(u[[1, 3]].tolist()) == pytest.approx([1 / 6, 0.5])  # non-finite: worst ranks
    n = shaping.normalized(torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(n, torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) * math.sqrt(1.5))
    assert torch.equal(shaping.normalized(torch.ones(4)), torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="fitness_shaping"):
        shaping.shape(torch.ones(2), "ranks")


def test_eps_schedules():
    kw = dict(eps_max=0.3, start=100, length=400)
    for kind in ("linear", "smooth"):
        assert schedules.eps_at(0, kind=kind, **kw) == 0.0
        assert schedules.eps_at(100, kind=kind, **kw) == 0.0
        assert schedules.eps_at(500, kind=kind, **kw) == 0.3
        assert schedules.eps_at(10_000, kind=kind, **kw) == 0.3
        values = [schedules.eps_at(t, kind=kind, **kw) for t in range(0, 600)]
        assert all(b >= a for a, b in zip(values, values[1:]))
    assert schedules.eps_at(300, kind="linear", **kw) == pytest.approx(0.15)
    assert schedules.eps_at(7, kind="constant", eps_max=0.1) == 0.1
    # smooth: polynomial (slow) start, then C^1 junction at start + mid * length
    assert schedules.eps_at(150, kind="smooth", **kw) < schedules.eps_at(150, kind="linear", **kw)
    mid, h = 200.0, 1e-4
    left = (schedules.eps_at(mid, kind="smooth", **kw) - schedules.eps_at(mid - h, kind="smooth", **kw)) / h
    right = (schedules.eps_at(mid + h, kind="smooth", **kw) - schedules.eps_at(mid, kind="smooth", **kw)) / h
    assert left == pytest.approx(right, rel=1e-3)
    with pytest.raises(ValueError, match="kind"):
        schedules.eps_at(0, eps_max=0.1, kind="cosine")


def test_lr_step_decay():
    kw = dict(lr=3e-4, milestones=(110, 130), factor=0.4)
    assert schedules.lr_at(0, **kw) == 3e-4
    assert schedules.lr_at(109, **kw) == 3e-4
    assert schedules.lr_at(110, **kw) == pytest.approx(1.2e-4)
    assert schedules.lr_at(149, **kw) == pytest.approx(4.8e-5)
    with pytest.raises(ValueError, match="increasing"):
        schedules.lr_at(0, lr=1.0, milestones=(5, 3), factor=0.5)


@pytest.mark.parametrize("rule", ["adam", "clipup", "sgd"])
def test_decoupled_weight_decay(rule):
    from mpigls.optim import grad as gradopt

    params = gradopt.GRADParams(lr=0.1, step_rule=rule, weight_decay=0.5)
    state = gradopt.init(params, torch.tensor([2.0, -4.0]))
    new, _ = gradopt.tell(state, params, torch.zeros(2))
    torch.testing.assert_close(new.center, torch.tensor([2.0, -4.0]) * (1 - 0.1 * 0.5))
