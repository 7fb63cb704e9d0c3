"""PGPE: unbiasedness on closed-form smoothed functions, sigma bounds, non-finite losses,
bitwise determinism and checkpoint round trips."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from mpigls.numerics import noise
from mpigls.optim import pgpe

D = 4
A = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
C = torch.tensor([0.3, -0.2, 0.1, 0.0], dtype=torch.float64)
THETA = torch.tensor([0.5, -1.0, 2.0, 0.25])
SIGMA = torch.tensor([0.1, 0.05, 0.2, 0.1])


def quadratic(x):  # (P, D) -> (P,); L_sigma = L + 0.5 * sum(a sigma^2)
    x = x.to(torch.float64)
    return 0.5 * (A * x * x).sum(-1) + (C * x).sum(-1)


def step(x):  # 1[x_0 > 0]; L_sigma = Phi(theta_0 / sigma_0)
    return (x[:, 0] > 0).to(torch.float64)


def estimate(fn, popsize, seed, shaping="raw"):
    params = pgpe.PGPEParams(popsize=popsize, fitness_shaping=shaping, sigma_init=0.1)
    state = dataclasses.replace(pgpe.init(params, THETA), sigma=SIGMA.clone())
    losses = fn(pgpe.ask(state, params, seed, range(popsize // 2)))
    g_c, g_s, n = pgpe.gradients(state, params, seed, losses)
    # per-pair contributions, to get the standard error of the mean estimate
    z = noise.noise_block(seed, 0, range(popsize // 2), D).to(torch.float64)
    sig = SIGMA.to(torch.float64)
    rp, rm = losses[0::2], losses[1::2]
    contrib_c = ((rp - rm) / 2)[:, None] * z / sig
    contrib_s = ((rp + rm) / 2 - losses.mean())[:, None] * (z * z - 1) / sig
    return g_c, g_s, contrib_c, contrib_s


def check_convergence(fn, true_c, true_s=None, sizes=(64, 512, 4096), seeds=(11, 12, 13)):
    errors = []
    for popsize in sizes:
        err = 0.0
        for seed in seeds:
            g_c, g_s, cc, cs = estimate(fn, popsize, seed)
            torch.testing.assert_close(g_c, cc.mean(0), rtol=1e-9, atol=1e-9)
            stderr = cc.std(0) / math.sqrt(cc.shape[0]) + 1e-12
            assert ((g_c - true_c).abs() <= 5 * stderr + 1e-9).all(), (popsize, g_c, true_c, stderr)
            if true_s is not None:
                stderr_s = cs.std(0) / math.sqrt(cs.shape[0])
                # the sample-mean baseline adds an O(1/n) bias on top of the O(1/sqrt(n)) noise
                assert ((g_s - true_s).abs() <= 5 * stderr_s + 10 / popsize).all(), (popsize, g_s, true_s)
            err += float(torch.linalg.vector_norm(g_c - true_c)) / len(seeds)
        errors.append(err)
    # error ~ 1/sqrt(P): a 64x larger population must cut it by well over 2x
    assert errors[-1] < errors[0] / 3, errors
    return errors


def test_pgpe_quadratic_unbiased():
    true_c = A * THETA.double() + C
    true_s = A * SIGMA.double()
    errors = check_convergence(quadratic, true_c, true_s)
    print("quadratic PGPE errors for P=64, 512, 4096:", errors)


def test_pgpe_step_function_erf():
    # L(x) = 1[x_0 > theta_0 - 0.05]: the jump sits 0.05 below the centre, where the smoothed
    # loss Phi((theta_0 - jump) / sigma_0) has slope phi(0.05 / sigma_0) / sigma_0.
    s0 = float(SIGMA[0])
    true_c = torch.zeros(D, dtype=torch.float64)
    true_c[0] = math.exp(-0.5 * (0.05 / s0) ** 2) / math.sqrt(2 * math.pi) / s0
    errors = check_convergence(lambda x: step(x - THETA + torch.tensor([0.05, 0, 0, 0])), true_c)
    print("step-function PGPE errors for P=64, 512, 4096:", errors)


def test_centered_ranks_direction_is_descent():
    g_c, *_ = estimate(quadratic, 512, 5, shaping="centered_ranks")
    true_c = A * THETA.double() + C
    assert float(torch.dot(g_c, true_c)) > 0.8 * float(g_c.norm() * true_c.norm())


def test_ask_rows_and_slices_are_rank_independent():
    params = pgpe.PGPEParams(popsize=12)
    state = pgpe.init(params, THETA)
    full = pgpe.ask(state, params, 3, range(6))
    parts = torch.cat([pgpe.ask(state, params, 3, [0, 1]), pgpe.ask(state, params, 3, [2, 3, 4, 5])])
    assert torch.equal(full, parts)
    z0 = noise.member_noise(3, 0, 0, D)
    assert torch.equal(full[0], THETA + state.sigma * z0)
    assert torch.equal(full[1], THETA - state.sigma * z0)
    with pytest.raises(ValueError, match="pair indices"):
        pgpe.ask(state, params, 3, [6])


@pytest.mark.parametrize("rule", ["adam", "clipup"])
def test_tell_deterministic_and_pure(rule, monkeypatch):
    params = pgpe.PGPEParams(popsize=10, step_rule=rule, lr=0.01)
    state = pgpe.init(params, THETA)
    losses = quadratic(pgpe.ask(state, params, 9, range(5))).float()
    before = state.center.clone(), state.sigma.clone()
    s1, m1 = pgpe.tell(state, params, 9, losses)
    s2, m2 = pgpe.tell(state, params, 9, losses.clone())
    assert torch.equal(state.center, before[0]) and torch.equal(state.sigma, before[1])
    assert torch.equal(s1.center, s2.center) and torch.equal(s1.sigma, s2.sigma)
    assert torch.equal(s1.step_state.m, s2.step_state.m) and m1 == m2
    assert s1.generation == 1 and not torch.equal(s1.center, state.center)
    monkeypatch.setattr(pgpe, "NOISE_CHUNK", 3)  # the chunking never changes the bits
    s3, _ = pgpe.tell(state, params, 9, losses)
    assert torch.equal(s1.center, s3.center) and torch.equal(s1.sigma, s3.sigma)


def test_state_dict_round_trip():
    params = pgpe.PGPEParams(popsize=6, lr=0.01)
    state = pgpe.init(params, THETA)
    for _ in range(3):
        state, _ = pgpe.tell(state, params, 1, quadratic(pgpe.ask(state, params, 1, range(3))))
    d = pgpe.state_to_dict(state)
    assert all(isinstance(v, (np.ndarray, int, float)) for v in d.values())
    back = pgpe.state_from_dict(d)
    assert back.generation == 3
    losses = quadratic(pgpe.ask(back, params, 1, range(3)))
    a, _ = pgpe.tell(state, params, 1, losses)
    b, _ = pgpe.tell(back, params, 1, losses)
    assert torch.equal(a.center, b.center) and torch.equal(a.sigma, b.sigma)
    with pytest.raises(ValueError, match="lacks keys"):
        pgpe.state_from_dict({"center": d["center"]})


def test_sigma_relative_change_and_clamps():
    params = pgpe.PGPEParams(popsize=64, sigma_lr=1e6, sigma_max_change=0.2, fitness_shaping="raw", fixed_sigma=False)
    state = dataclasses.replace(pgpe.init(params, THETA), sigma=SIGMA.clone())
    new, metrics = pgpe.tell(state, params, 2, quadratic(pgpe.ask(state, params, 2, range(32))))
    ratio = new.sigma / state.sigma
    assert (ratio >= 0.8 - 1e-6).all() and (ratio <= 1.2 + 1e-6).all()
    assert metrics["pgpe/sigma_clipped_frac"] == 1.0
    # the quadratic's smoothed loss grows with sigma, so a huge step shrinks sigma by the full 20%
    torch.testing.assert_close(ratio, torch.full((D,), 0.8))
    clamped = pgpe.PGPEParams(
        popsize=64,
        sigma_lr=1e6,
        sigma_max_change=0.5,
        sigma_min=0.09,
        sigma_max=0.3,
        sigma_init=0.1,
        fitness_shaping="raw",
        fixed_sigma=False,
    )
    new, _ = pgpe.tell(state, clamped, 2, quadratic(pgpe.ask(state, clamped, 2, range(32))))
    assert (new.sigma >= 0.09 * (1 - 1e-6)).all() and (new.sigma <= 0.3).all()
    torch.testing.assert_close(new.sigma[[0, 3]], torch.full((2,), 0.09))
    fixed = pgpe.PGPEParams(popsize=64, sigma_lr=1e6, fixed_sigma=True)
    new, _ = pgpe.tell(state, fixed, 2, quadratic(pgpe.ask(state, fixed, 2, range(32))))
    assert torch.equal(new.sigma, state.sigma)


def test_nonfinite_pairs_get_zero_weight():
    params = pgpe.PGPEParams(popsize=8, fitness_shaping="raw")
    state = dataclasses.replace(pgpe.init(params, THETA), sigma=SIGMA.clone())
    losses = quadratic(pgpe.ask(state, params, 4, range(4)))
    bad = losses.clone()
    bad[3] = float("nan")  # pair 1 (minus end)
    bad[4] = float("inf")  # pair 2 (plus end)
    g_c, g_s, n = pgpe.gradients(state, params, 4, bad)
    assert n == 2
    z = noise.noise_block(4, 0, [0, 3], D).to(torch.float64)
    keep = losses[[0, 1, 6, 7]]
    rp, rm = keep[0::2], keep[1::2]
    expect_c = (((rp - rm) / 2)[:, None] * z).mean(0) / SIGMA.double()
    expect_s = (((rp + rm) / 2 - keep.mean())[:, None] * (z * z - 1)).mean(0) / SIGMA.double()
    torch.testing.assert_close(g_c, expect_c)
    torch.testing.assert_close(g_s, expect_s)
    for shaping in ("centered_ranks", "normalized", "raw"):
        p = dataclasses.replace(params, fitness_shaping=shaping)
        new, metrics = pgpe.tell(state, p, 4, bad)
        assert metrics["pgpe/num_nonfinite"] == 2 and metrics["pgpe/skipped"] == 0
        assert torch.isfinite(new.center).all() and torch.isfinite(new.sigma).all()


def test_all_nonfinite_generation_is_skipped():
    params = pgpe.PGPEParams(popsize=4)
    state = pgpe.init(params, THETA)
    losses = torch.tensor([float("nan"), 1.0, 2.0, float("-inf")])
    new, metrics = pgpe.tell(state, params, 0, losses)
    assert metrics["pgpe/skipped"] == 1 and metrics["pgpe/num_nonfinite"] == 2
    assert new.generation == 1
    assert torch.equal(new.center, state.center) and torch.equal(new.sigma, state.sigma)
    assert new.step_state is state.step_state


def test_params_validation_messages():
    with pytest.raises(ValueError, match="even"):
        pgpe.PGPEParams(popsize=255)
    with pytest.raises(ValueError, match="step_rule"):
        pgpe.PGPEParams(step_rule="rmsprop")
    with pytest.raises(ValueError, match="fitness_shaping"):
        pgpe.PGPEParams(fitness_shaping="rank")
    with pytest.raises(ValueError, match="sigma_init"):
        pgpe.PGPEParams(sigma_init=2.0, sigma_max=1.0)
    with pytest.raises(TypeError):
        pgpe.PGPEParams(256)  # kw_only
    params = pgpe.PGPEParams(popsize=4)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        pgpe.tell(pgpe.init(params, THETA), params, 0, torch.zeros(6))


@settings(max_examples=15, deadline=None)
@given(
    st.lists(st.integers(-10_000, 10_000), min_size=8, max_size=8, unique=True),
    st.sampled_from(["affine", "cube", "exp"]),
)
def test_centered_rank_update_invariant_under_increasing_transforms(values, transform):
    params = pgpe.PGPEParams(popsize=8, sigma_lr=0.1, lr=0.01, fixed_sigma=False)
    state = pgpe.init(params, THETA)
    r = torch.tensor(values, dtype=torch.float64)
    t = {"affine": 0.5 * r - 3, "cube": r**3, "exp": torch.exp(r / 5000)}[transform]
    a, _ = pgpe.tell(state, params, 5, r)
    b, _ = pgpe.tell(state, params, 5, t)
    assert torch.equal(a.center, b.center) and torch.equal(a.sigma, b.sigma)


@pytest.mark.parametrize("fixed", [False, True])
def test_metric_keys_stable_when_skipping(fixed):
    params = pgpe.PGPEParams(popsize=4, fixed_sigma=fixed)
    state = pgpe.init(params, THETA)
    _, ok = pgpe.tell(state, params, 0, torch.arange(4.0))
    _, skip = pgpe.tell(state, params, 0, torch.full((4,), float("nan")))
    assert set(ok) == set(skip) and all(k.startswith("pgpe/") for k in ok)


@pytest.mark.parametrize("rule,lr", [("adam", 0.05), ("clipup", 0.1)])
def test_pgpe_minimises_a_quadratic_in_50d(rule, lr):
    scales = torch.linspace(0.5, 2.0, 50, dtype=torch.float64)
    loss = lambda x: (scales * x.double() ** 2).sum(-1)
    params = pgpe.PGPEParams(popsize=32, lr=lr, step_rule=rule, sigma_init=0.1, sigma_lr=0.1, fixed_sigma=False)
    state = pgpe.init(params, torch.ones(50))
    start = float(loss(state.center[None]))
    for _ in range(150):
        state, metrics = pgpe.tell(state, params, 0, loss(pgpe.ask(state, params, 0, range(16))))
    assert float(loss(state.center[None])) < 0.05 * start
    assert metrics["pgpe/sigma_mean"] < 0.1  # sigma shrinks near the minimum
