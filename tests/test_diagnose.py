"""Gradient diagnostics on a quadratic, where the smoothed loss and its gradient are analytic:
L(θ) = ½ θᵀAθ + bᵀθ gives L_σ(θ) = L(θ) + σ²/2 tr(A) and ∇L_σ(θ) = Aθ + b (= ∇L(θ))."""

import math

import pytest
import torch

from mpigls.studies import diagnose

D = 20


def _quadratic():
    gen = torch.Generator().manual_seed(0)
    a = torch.linspace(1.0, 3.0, D, dtype=torch.float64)  # diagonal of A
    b = torch.randn(D, generator=gen, dtype=torch.float64)
    theta = torch.randn(D, generator=gen, dtype=torch.float64).float()

    def loss_fn(points):  # (n, D) -> (n,)
        p = points.double()
        return 0.5 * (p * p * a).sum(-1) + p @ b

    def grad_fn(points):  # (n, D) -> (n, D)
        return points.double() * a + b

    return loss_fn, grad_fn, theta, a * theta.double() + b, a


def test_rgs_reference_is_the_exact_smoothed_gradient_on_a_quadratic():
    _, grad_fn, theta, exact, _ = _quadratic()
    ref = diagnose.rgs_estimate(grad_fn, theta, 0.1, 8, seed=3)
    # antithetic pairs cancel the noise exactly; only float32 rounding of the points remains
    assert torch.allclose(ref, exact, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shaping", ["raw", "centered_ranks"])
def test_pgpe_estimate_agrees_with_the_gradient_more_as_popsize_grows(shaping):
    loss_fn, _, theta, exact, _ = _quadratic()
    mean_cos = []
    for popsize in (8, 64, 1024):
        cos = [
            diagnose.cosine(diagnose.pgpe_estimate(loss_fn, theta, 0.05, popsize, 1, shaping=shaping, repeat=r), exact)
            for r in range(6)
        ]
        mean_cos.append(sum(cos) / len(cos))
    assert mean_cos[0] < mean_cos[1] < mean_cos[2]
    assert mean_cos[2] > 0.95  # 512 pairs in D = 20: E cos ~ (1 + D / n)^-1/2 ~ 0.98 with raw losses
    assert mean_cos[0] < 0.9


def test_raw_pgpe_is_unbiased_for_the_smoothed_gradient():
    loss_fn, _, theta, exact, _ = _quadratic()
    # the mean of many independent estimates converges to grad L_sigma (here exactly A theta + b)
    mean = torch.stack(
        [diagnose.pgpe_estimate(loss_fn, theta, 0.05, 64, 2, shaping="raw", repeat=r) for r in range(120)]
    ).mean(0)
    assert diagnose.cosine(mean, exact) > 0.99
    assert torch.allclose(mean, exact, rtol=0, atol=0.15 * float(exact.abs().max()))


def test_smoothed_loss_estimate_matches_the_closed_form():
    loss_fn, _, theta, _, a = _quadratic()
    sigma = 0.5
    base = float(loss_fn(theta[None])[0])
    mean, se = diagnose.smoothed_loss(loss_fn, theta, sigma, 256, seed=4)
    target = base + 0.5 * sigma**2 * float(a.sum())  # L + sigma^2 / 2 tr(A)
    assert math.isfinite(se) and se > 0
    assert abs(mean - target) < 5 * se
    assert target - base > 10 * se  # the smoothing shift is resolved, not lost in the noise


def test_gradient_agreement_rows():
    loss_fn, grad_fn, theta, _, _ = _quadratic()
    rows = diagnose.gradient_agreement(loss_fn, grad_fn, theta, [8, 256], [1e-2, 1e-1], 0, repeats=2)
    assert [(r["sigma"], r["popsize"]) for r in rows] == [(1e-2, 8), (1e-2, 256), (1e-1, 8), (1e-1, 256)]
    for r in rows:
        assert r["reference_vs_gradient"] == pytest.approx(1.0, abs=1e-6)  # quadratic: grad L_sigma = grad L
        assert -1 <= r["cos_min"] <= r["cos_mean"] <= 1
    assert rows[1]["cos_mean"] > rows[0]["cos_mean"]


def test_control_variate_estimates_side_by_side():
    """At popsize 8 (n = 4 pairs, D = 20) plain PGPE is noise-limited; the control variate with the
    backpropagated gradient is exact on a quadratic (cos 1), the previous generation's estimate as g
    is worse than none when n < D, and the running average (gain n/(n + D)) is better than plain."""
    loss_fn, grad_fn, theta, exact, _ = _quadratic()
    rows = diagnose.gradient_agreement(
        loss_fn, grad_fn, theta, [8], [1e-2], 0, repeats=6, control_variates=("grad", "previous", "running")
    )
    (row,) = rows
    assert set(row["cv"]) == {"grad", "previous", "running"}
    assert row["cv"]["grad"]["cos_min"] > 0.999999
    assert row["cv"]["previous"]["cos_mean"] < row["cos_mean"] < row["cv"]["running"]["cos_mean"]
    est, evals = diagnose.cv_estimate("previous", loss_fn, exact, theta, 1e-2, 8, 0, 0)
    assert evals == 16 and est.shape == (D,)
