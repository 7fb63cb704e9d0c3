"""PGPE's control variate (mpigls.optim.pgpe, optimizer.control_variate): the estimate
g + 1/n sum_j z_j [(r+_j - r-_j)/2 - eps_j . g] / sigma is unbiased for grad L_sigma for every g (on a
quadratic and on the paper's toy discontinuous loss, against closed forms), its error on a quadratic is
((D + 1)/n) |grad - g|^2 as the algebra predicts, the running average's gain is the one derived in the
module docstring, and the distributed form is bitwise the serial one for 1 to 4 ranks, every block size,
noise budget and chunking, and across a checkpoint round trip."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from mpigls import parallel
from mpigls.optim import pgpe
from mpigls.parallel import pgpe_unit

# ----------------------------------------------------------------------------- a quadratic

D = 12
_gen = torch.Generator().manual_seed(0)
_M = torch.randn(D, D, generator=_gen, dtype=torch.float64)
A = _M @ _M.T / D + torch.eye(D, dtype=torch.float64)
B_VEC = torch.randn(D, generator=_gen, dtype=torch.float64)
THETA = torch.linspace(-1.0, 1.0, D)


def quadratic(points: torch.Tensor) -> torch.Tensor:
    x = points.to(torch.float64)
    return 0.5 * ((x @ A) * x).sum(-1) + x @ B_VEC


def grad_quadratic(theta: torch.Tensor) -> torch.Tensor:
    """grad L = grad L_sigma for a quadratic (the smoothing adds a constant)."""
    return A @ theta.to(torch.float64) + B_VEC


def _estimates(params, loss, theta, g, draws, seed=5, state_cv=None):
    state = pgpe.init(params, theta)
    if state_cv is not None:
        state = dataclasses.replace(state, cv=state_cv)
    out = []
    for r in range(draws):
        st = dataclasses.replace(state, generation=r)
        losses = loss(pgpe.ask(st, params, seed, range(params.popsize // 2)))
        gg = pgpe.control_variate(st, params, g) if params.control_variate != "none" else None
        est, _, _ = pgpe.gradients(st, params, seed, losses, with_sigma=False, g=gg)
        out.append(est)
    return torch.stack(out)


def _assert_unbiased(estimates: torch.Tensor, truth: torch.Tensor, z: float = 4.5):
    """Every coordinate's mean within z standard errors of the truth (z = 4.5: a false alarm in
    about 1e-5 coordinates), and a floor for the (near-)zero-variance estimates."""
    mean = estimates.mean(0)
    se = estimates.std(0) / math.sqrt(estimates.shape[0])
    assert torch.all((mean - truth).abs() <= z * se + 1e-9 * (1 + truth.abs())), (mean - truth, se)


@pytest.mark.parametrize("kind", ["none", "grad", "previous", "running"])
def test_unbiased_on_a_quadratic_for_every_choice_of_g(kind):
    params = pgpe.PGPEParams(popsize=8, sigma_init=0.3, fitness_shaping="raw", control_variate=kind)
    truth = grad_quadratic(THETA)
    # "grad": the exact gradient; the zeroth-order variants: any g independent of the noise
    g = truth if kind == "grad" else None
    cv = None if kind in ("none", "grad") else truth + torch.linspace(-2.0, 2.0, D, dtype=torch.float64)
    est = _estimates(params, quadratic, THETA, g, 1500, state_cv=cv)
    _assert_unbiased(est, truth)


def test_variance_on_a_quadratic_is_the_predicted_one():
    """On a quadratic the antithetic difference is exactly eps_j . grad, so the estimate is
    g + A_n (grad - g) with A_n = 1/n sum z_j z_j^T, and E|est - grad|^2 = ((D + 1)/n) |grad - g|^2."""
    truth = grad_quadratic(THETA)
    n, draws = 4, 1200
    for offset in (truth, 0.3 * truth, 0.05 * truth):  # g = grad - offset: plain (g = 0) first
        params = pgpe.PGPEParams(popsize=2 * n, sigma_init=0.3, fitness_shaping="raw", control_variate="previous")
        est = _estimates(params, quadratic, THETA, None, draws, state_cv=truth - offset)
        mse = float(((est - truth) ** 2).sum(1).mean())
        predicted = (D + 1) / n * float(offset.pow(2).sum())
        # the squared error is a sum of ~D chi-square-like terms: its mean over 1200 draws is within
        # 15 % (about three of its standard errors)
        assert abs(mse / predicted - 1) < 0.15, (mse, predicted)
    exact = pgpe.PGPEParams(popsize=2 * n, sigma_init=0.3, fitness_shaping="raw", control_variate="grad")
    est = _estimates(exact, quadratic, THETA, truth, 50)
    assert float((est - truth).abs().max()) < 1e-6 * float(truth.abs().max())  # g exact: no noise left


def test_plain_raw_estimate_is_the_control_variate_with_g_zero():
    """The control variate with g = 0 is plain raw PGPE, bit for bit."""
    plain = pgpe.PGPEParams(popsize=10, sigma_init=0.2, fitness_shaping="raw")
    cv = dataclasses.replace(plain, control_variate="previous")
    state = dataclasses.replace(pgpe.init(plain, THETA), generation=4)
    losses = quadratic(pgpe.ask(state, plain, 3, range(5)))
    a = pgpe.gradients(state, plain, 3, losses, with_sigma=False)[0]
    b = pgpe.gradients(state, cv, 3, losses, with_sigma=False, g=torch.zeros(D, dtype=torch.float64))[0]
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- the toy discontinuous loss


def toy_loss(points: torch.Tensor) -> torch.Tensor:
    """The GLS paper's toy DeepPoly bound l(w) = 1 + 1[w > 0](w - 1) (tools/toy_discontinuous.py)."""
    w = points[:, 0].to(torch.float64)
    return torch.where(w > 0, w, torch.ones_like(w))


def _phi(t):
    return math.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)


def _cdf(t):
    return 0.5 * (1 + math.erf(t / math.sqrt(2)))


@pytest.mark.parametrize("w", [-0.2, 0.1])
@pytest.mark.parametrize("kind", ["none", "grad", "running"])
def test_unbiased_on_the_toy_discontinuous_loss(kind, w):
    """dL_s/dw = Phi(w/s) - phi(w/s)/s, jump term included; the backpropagated gradient (0 or 1) as g
    does not remove it (RGS's expectation Phi(w/s) would miss it: checked as a sanity bound)."""
    s = 0.3
    truth = _cdf(w / s) - _phi(w / s) / s
    params = pgpe.PGPEParams(popsize=16, sigma_init=s, fitness_shaping="raw", control_variate=kind)
    theta = torch.tensor([w], dtype=torch.float32)
    g = torch.tensor([1.0 if w > 0 else 0.0], dtype=torch.float64) if kind == "grad" else None
    cv = torch.tensor([0.7], dtype=torch.float64) if kind == "running" else None
    est = _estimates(params, toy_loss, theta, g, 1000, state_cv=cv)[:, 0]
    se = float(est.std() / math.sqrt(est.numel()))
    assert abs(float(est.mean()) - truth) <= 4.5 * se, (float(est.mean()), truth, se)
    assert abs(_cdf(w / s) - truth) > 10 * se  # what a first-order estimate converges to is far off


# ----------------------------------------------------------------------------- the running average's gain


def test_running_gain_default_and_the_error_recursion():
    """cv_rate null: a = n/(n + D); the zeroth-order memory m follows m <- (1 - a) m + a est, and with
    that gain its error on a fixed quadratic shrinks (with a = 1, "previous", it grows when n < D)."""
    n = 3
    truth = grad_quadratic(THETA)
    errors = {}
    for kind in ("running", "previous"):
        params = pgpe.PGPEParams(
            popsize=2 * n, sigma_init=0.3, fitness_shaping="raw", control_variate=kind, lr=1e-9, step_rule="sgd"
        )
        state = pgpe.init(params, THETA)
        assert torch.equal(state.cv, torch.zeros(D, dtype=torch.float64))
        first = None
        for _ in range(60):
            losses = quadratic(pgpe.ask(state, params, 11, range(n)))
            before = state.cv.clone()
            est = pgpe.gradients(state, params, 11, losses, with_sigma=False, g=before)[0]
            state, _ = pgpe.tell(state, params, 11, losses)
            a = 1.0 if kind == "previous" else n / (n + D)
            torch.testing.assert_close(state.cv, before * (1 - a) + est * a, rtol=1e-12, atol=1e-12)
            first = first if first is not None else float((state.cv - truth).norm())
        errors[kind] = float((state.cv - truth).norm()) / float(truth.norm())
    assert errors["running"] < 0.5
    assert errors["previous"] > 5


def test_params_refuse_what_means_nothing():
    with pytest.raises(ValueError, match="fitness_shaping=raw"):
        pgpe.PGPEParams(control_variate="grad")  # centered ranks are not linear in the losses
    with pytest.raises(ValueError, match="control_variate must be one of"):
        pgpe.PGPEParams(control_variate="gradient", fitness_shaping="raw")
    for bad in (0.0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="cv_rate"):
            pgpe.PGPEParams(control_variate="running", fitness_shaping="raw", cv_rate=bad)
    with pytest.raises(ValueError, match="needs the gradient"):
        p = pgpe.PGPEParams(control_variate="grad", fitness_shaping="raw")
        pgpe.control_variate(pgpe.init(p, THETA), p)


# ----------------------------------------------------------------------------- exact products, ranks, resume


def test_products_are_exact_and_independent_of_grouping():
    z = torch.randn(9, 5000, generator=torch.Generator().manual_seed(1))
    h = torch.randn(5000, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 1e-3
    together = pgpe.cv_products(z, h)
    alone = torch.cat([pgpe.cv_products(z[i : i + 1], h, column_chunk=777) for i in range(9)])
    assert torch.equal(together, alone)
    exact = (z.to(torch.float64) * h).sum(1)
    assert float((together - exact).abs().max()) <= 5000 * 2.0**-30 * float(z.abs().max() * h.abs().max())


def separable(points: torch.Tensor) -> torch.Tensor:
    """A quadratic whose loss of a row never depends on the other rows evaluated with it (no matrix
    product, whose kernel may group a row's additions by the number of rows)."""
    x = points.to(torch.float64)
    return (0.5 * torch.diagonal(A) * x * x + B_VEC * x).sum(-1)


def _distributed(comm, params, state, seed, block_size, g, keep_bytes=pgpe_unit.KEEP_NOISE_BYTES, chunks=1):
    split = pgpe_unit.split_of(params, block_size, 1, chunks)
    items = parallel.my_blocks(split.num_items, comm.rank, comm.world_size)
    source = pgpe_unit.NoiseSource(seed)
    try:
        local, kept = pgpe_unit.evaluate(
            state, params, items, split, source, lambda p, ex: separable(p), torch.device("cpu"), keep_bytes, g=g
        )
    finally:
        source.close()
    all_losses, _, max_abs, max_c = pgpe_unit.gather_losses(comm, split, local, None, kept.max_abs, kept.max_abs_c)
    summed = pgpe_unit.reduce_sums(comm, state, params, seed, all_losses, kept, max_abs, max_c)
    return pgpe.tell(state, params, seed, all_losses, summed=summed, g=g)


@pytest.mark.parametrize("kind", ["grad", "running"])
def test_distributed_bitwise_equal_to_serial_for_1_to_4_ranks(kind):
    params = pgpe.PGPEParams(
        popsize=14, lr=0.01, sigma_init=0.1, fitness_shaping="raw", control_variate=kind, fixed_sigma=False
    )
    state = dataclasses.replace(pgpe.init(params, THETA), sigma=torch.linspace(0.05, 0.2, D), generation=2)
    if kind == "running":
        state = dataclasses.replace(state, cv=grad_quadratic(THETA) * 0.5)
    g = pgpe.control_variate(state, params, grad_quadratic(THETA).float())
    losses = separable(pgpe.ask(state, params, 9, range(7)))
    ref, ref_metrics = pgpe.tell(state, params, 9, losses, g=g)
    for world in (1, 2, 3, 4):
        for block_size, keep_bytes in [(1, pgpe_unit.KEEP_NOISE_BYTES), (3, 0)]:
            results = parallel.run_threaded(
                lambda comm, bs=block_size, kb=keep_bytes: _distributed(comm, params, state, 9, bs, g, kb), world
            )
            for new, metrics in results:
                assert torch.equal(new.center, ref.center) and torch.equal(new.sigma, ref.sigma)
                assert (new.cv is None and ref.cv is None) or torch.equal(new.cv, ref.cv)
                assert metrics == ref_metrics


def test_state_round_trip_keeps_the_memory_and_old_states_start_at_zero():
    params = pgpe.PGPEParams(popsize=6, fitness_shaping="raw", control_variate="running")
    state = dataclasses.replace(pgpe.init(params, THETA), cv=torch.arange(D, dtype=torch.float64) / 7)
    back = pgpe.state_from_dict(pgpe.state_to_dict(state))
    assert back.cv.dtype == torch.float64 and torch.equal(back.cv, state.cv)
    old = {k: v for k, v in pgpe.state_to_dict(state).items() if k != "cv"}  # written without the memory
    assert pgpe.state_from_dict(old).cv is None
    assert torch.equal(pgpe.control_variate(pgpe.state_from_dict(old), params), torch.zeros(D, dtype=torch.float64))
    plain = pgpe.PGPEParams(popsize=6)
    assert "cv" not in pgpe.state_to_dict(pgpe.init(plain, THETA))
