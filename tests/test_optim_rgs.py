"""RGS and GRAD: unbiased smoothed gradients (quadratic, ReLU -> erf, steep sigmoid by quadrature),
antithetic sampling, clipping, skipping and checkpoint round trips."""

import math

import numpy as np
import pytest
import torch

from mpigls.numerics import noise
from mpigls.optim import grad as gradopt, rgs

D = 3
A = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
THETA = torch.tensor([0.05, -1.0, 2.0])
SIGMA = 0.1


def mean_gradient(loss_fn, num_samples, seed, antithetic):
    """RGS estimate via tell with plain SGD at lr 1 (so theta - theta_new is the mean gradient),
    plus the per-sample gradients for a standard error."""
    params = rgs.RGSParams(
        num_samples=num_samples, sigma_init=SIGMA, antithetic=antithetic, lr=1.0, step_rule="sgd", grad_clip=None
    )
    state = rgs.init(params, THETA)
    points = rgs.sample_points(state, params, seed, range(num_samples)).to(torch.float64).requires_grad_(True)
    (per_sample,) = torch.autograd.grad(loss_fn(points).sum(), points)
    new, metrics = rgs.tell(state, params, per_sample.sum(0).float())
    assert metrics["rgs/skipped"] == 0 and new.generation == 1
    estimate = (state.center - new.center).double()
    torch.testing.assert_close(estimate, per_sample.mean(0), rtol=1e-5, atol=1e-6)
    if antithetic:  # pairs are correlated: the pair means are the independent draws
        per_sample = per_sample.view(-1, 2, D).mean(1)
    return per_sample.mean(0), per_sample.std(0) / math.sqrt(per_sample.shape[0]) + 1e-12


def check(loss_fn, true, antithetic, sizes=(32, 256, 2048), seeds=(1, 2, 3)):
    errors = []
    for n in sizes:
        err = 0.0
        for seed in seeds:
            est, stderr = mean_gradient(loss_fn, n, seed, antithetic)
            assert ((est - true).abs() <= 5 * stderr + 1e-6).all(), (n, est, true, stderr)
            err += float(torch.linalg.vector_norm(est - true)) / len(seeds)
        errors.append(err)
    assert errors[-1] < errors[0] / 3 or errors[-1] < 1e-6, errors
    return errors


@pytest.mark.parametrize("antithetic", [False, True])
def test_rgs_quadratic_unbiased(antithetic):
    errors = check(lambda x: 0.5 * (A * x * x).sum(-1), A * THETA.double(), antithetic)
    print("quadratic RGS errors", antithetic, errors)


def test_rgs_relu_gives_erf():
    # relu(x_0) smoothed: theta Phi(theta/s) + s phi(theta/s), whose slope is Phi(theta/s) (an erf);
    # the a.e. gradient 1[x_0 > 0] is what RGS averages. (For a pure step 1[x_0 > 0] the a.e.
    # gradient is 0 and RGS estimates 0, not phi/s: it needs a differentiable relaxation.)
    true = torch.zeros(D, dtype=torch.float64)
    true[0] = 0.5 * (1 + math.erf(float(THETA[0]) / SIGMA / math.sqrt(2)))
    errors = check(lambda x: torch.relu(x[:, 0]), true, antithetic=False)
    print("relu RGS errors", errors)


def test_rgs_steep_sigmoid_by_quadrature():
    tau = 0.02  # sigmoid(x/tau) is a smoothed step 5x narrower than sigma
    grid = np.linspace(-8, 8, 200001)
    pdf = np.exp(-0.5 * grid**2) / math.sqrt(2 * math.pi)
    u = (float(THETA[0]) + SIGMA * grid) / tau
    slope = np.exp(-np.logaddexp(0, u) - np.logaddexp(0, -u)) / tau  # sigmoid'(u)/tau
    true = torch.zeros(D, dtype=torch.float64)
    true[0] = float(np.trapezoid(slope * pdf, grid))
    errors = check(lambda x: torch.sigmoid(x[:, 0] / tau), true, antithetic=True, sizes=(128, 1024, 8192))
    print("steep sigmoid RGS errors", errors)


def test_sample_points_antithetic_and_slices():
    params = rgs.RGSParams(num_samples=6, sigma_init=0.5, antithetic=True)
    state = rgs.init(params, THETA)
    pts = rgs.sample_points(state, params, 7, range(6))
    z1 = noise.member_noise(7, 0, 1, D, noise.STREAM_RGS)
    assert torch.equal(pts[2], THETA + 0.5 * z1) and torch.equal(pts[3], THETA + 0.5 * -z1)
    assert torch.equal(
        torch.cat([rgs.sample_points(state, params, 7, [0, 1, 2]), rgs.sample_points(state, params, 7, [3, 4, 5])]), pts
    )
    with pytest.raises(ValueError, match="even"):
        rgs.RGSParams(num_samples=5, antithetic=True)
    with pytest.raises(ValueError, match="indices"):
        rgs.sample_points(state, params, 7, [6])


def test_clip_skip_and_round_trip():
    params = rgs.RGSParams(num_samples=2, lr=0.1, step_rule="sgd", grad_clip=1.0)
    state = rgs.init(params, THETA)
    new, metrics = rgs.tell(state, params, torch.tensor([6.0, 8.0, 0.0]) * 2)
    assert metrics["rgs/grad_norm"] == pytest.approx(10.0) and metrics["rgs/grad_clipped"] == 1
    torch.testing.assert_close(state.center - new.center, torch.tensor([0.06, 0.08, 0.0]))
    skipped, metrics = rgs.tell(new, params, torch.tensor([1.0, float("nan"), 0.0]))
    assert metrics["rgs/skipped"] == 1 and skipped.generation == 2 and torch.equal(skipped.center, new.center)
    back = rgs.state_from_dict(rgs.state_to_dict(skipped))
    assert back.generation == 2 and torch.equal(back.center, skipped.center)


@pytest.mark.parametrize("rule", ["adam", "clipup", "sgd"])
def test_grad_descends_quadratic_and_round_trips(rule):
    params = gradopt.GRADParams(lr=0.05, step_rule=rule, grad_clip=5.0, weight_decay=1e-3)
    state = gradopt.init(params, THETA)
    f = lambda x: 0.5 * float((A * x.double() ** 2).sum())
    start = f(state.center)
    for _ in range(100):
        state, metrics = gradopt.tell(state, params, (A * state.center.double()).float())
    assert f(state.center) < 0.1 * start and metrics["grad/skipped"] == 0
    d = gradopt.state_to_dict(state)
    back = gradopt.state_from_dict(d)
    g = torch.ones(D)
    a, _ = gradopt.tell(state, params, g)
    b, _ = gradopt.tell(back, params, g)
    assert torch.equal(a.center, b.center) and a.generation == 101
    skipped, m = gradopt.tell(state, params, torch.full((D,), float("inf")))
    assert m["grad/skipped"] == 1 and torch.equal(skipped.center, state.center)


def test_metric_keys_stable_when_skipping():
    p = rgs.RGSParams(num_samples=2)
    s = rgs.init(p, THETA)
    _, ok = rgs.tell(s, p, torch.ones(D))
    _, skip = rgs.tell(s, p, torch.full((D,), float("nan")))
    assert set(ok) == set(skip)
    g = gradopt.GRADParams()
    s = gradopt.init(g, THETA)
    assert set(gradopt.tell(s, g, torch.ones(D))[1]) == set(gradopt.tell(s, g, torch.full((D,), float("nan")))[1])
