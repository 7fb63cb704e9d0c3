"""Matrix-mode back-substitution (``bounds.matrix``): the same bounds as the other engines.

Checked against the dense float64 reference (tests/test_bounds_reference.py), against the row
engines in float32, for soundness by sampling, for chunk and tile invariance, and for equal
gradients (RGS/GRAD backpropagate through the bound).
"""

import pytest
import torch

from mpigls.bounds import crown, make_problem, margin_lower_bounds, matrix
from mpigls.nn import models
from test_bounds import worst_margin
from test_bounds_strategies import case_and_reference

# cnn3 8x8: one refined layer (k = 1); cnn5 8x8: three (k = 1, 2, 3, through a Linear layer);
# mlp-tiny: Linear layers only
CASES = [("cnn3", (1, 8, 8)), pytest.param(("cnn5", (1, 8, 8)), marks=pytest.mark.slow), ("mlp-tiny", (1, 4, 4))]


def digits_population(members=3, batch=6, seed=0, sigma=0.05):
    """CNN3 on 8x8 inputs (the digits shape), a population around it, inputs and labels."""
    torch.manual_seed(seed)
    model = models.build("cnn3", (1, 8, 8), 10, [0.3], [0.4])
    theta = models.flat_params(model).detach()
    gen = torch.Generator().manual_seed(seed + 1)
    weights = theta + sigma * torch.randn(members, theta.numel(), generator=gen)
    x = torch.rand(batch, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    return model, weights, x, y


@pytest.mark.parametrize("case", CASES)
def test_matrix_matches_dense_reference(case):
    model, x, y, ref = case_and_reference(*case)
    for budget in (64.0, 0.01):  # one chunk; one (member, example) pair per chunk
        got = margin_lower_bounds(model, x, y, 0.1, "deeppoly", memory_budget_mb=budget, conv_mode="matrix")
        assert torch.allclose(got, ref, rtol=1e-9, atol=1e-9 * ref.abs().max().item()), (got - ref).abs().max()


def test_auto_picks_matrix_for_small_networks_only():
    model, weights, x, y = digits_population()
    assert crown.use_matrix(make_problem(model, x, y, 0.2, weights))
    assert not crown.use_matrix(make_problem(model, x, y, 0.2, weights), rows="groups")
    assert not crown.use_matrix(make_problem(model, x, y, 0.2, weights), conv_mode="patches")
    mnist = models.build("cnn3", (1, 28, 28), 10)
    big = make_problem(mnist, torch.rand(2, 1, 28, 28), torch.tensor([0, 1]), 0.1)
    assert not matrix.fits(big.net) and not crown.use_matrix(big)
    assert crown.use_matrix(big, conv_mode="matrix")


def test_matrix_equals_row_engines_float32():
    """Population in float32: matrix mode equals every row engine to float rounding, and the
    intermediate bounds too."""
    model, weights, x, y = digits_population(members=4, batch=8)
    eps = 0.2
    with torch.no_grad():
        got = margin_lower_bounds(model, x, y, eps, "deeppoly", weights, conv_mode="matrix")
        scale = got.abs().max().item()
        for rows in ("packed", "groups", "padded"):
            for conv in ("patches", "dense"):
                other = margin_lower_bounds(model, x, y, eps, "deeppoly", weights, rows=rows, conv_mode=conv)
                assert torch.allclose(got, other, rtol=0, atol=2e-6 * scale), (rows, conv, (got - other).abs().max())
        prob = make_problem(model, x, y, eps, weights)
        mine = crown.intermediate_bounds(prob, conv_mode="matrix")
        theirs = crown.intermediate_bounds(prob, conv_mode="patches", rows="groups")
        for (lo, hi), (lo2, hi2) in zip(mine, theirs):
            assert lo.shape == lo2.shape
            assert torch.allclose(lo, lo2, atol=2e-6 * lo2.abs().max().item())
            assert torch.allclose(hi, hi2, atol=2e-6 * hi2.abs().max().item())
        # the refined bounds are tighter than IBP somewhere (the test exercises the refinement)
        ibp = crown.intermediate_bounds(prob, refine=False)
        assert bool((mine[1][0] > ibp[1][0] + 1e-6).any())


@pytest.mark.parametrize("seed", [0, 1])
def test_matrix_sound_against_sampling(seed):
    model, weights, x, y = digits_population(members=2, batch=4, seed=seed, sigma=0.1)
    eps = 0.15
    for w in weights:
        models.load_flat_(model, w)
        with torch.no_grad():
            lb = margin_lower_bounds(model, x, y, eps, "deeppoly", conv_mode="matrix")
        assert bool((lb <= worst_margin(model, x, y, eps) + 1e-5).all())


def test_chunks_and_tiles_do_not_change_bounds(monkeypatch):
    """Memory chunks and CPU tiles only change float rounding (identical calls: identical bits)."""
    model, weights, x, y = digits_population(members=3, batch=7)
    with torch.no_grad():
        base = margin_lower_bounds(model, x, y, 0.2, "deeppoly", weights, conv_mode="matrix")
        again = margin_lower_bounds(model, x, y, 0.2, "deeppoly", weights, conv_mode="matrix")
        assert torch.equal(base, again)
        small = margin_lower_bounds(model, x, y, 0.2, "deeppoly", weights, conv_mode="matrix", memory_budget_mb=0.05)
        monkeypatch.setattr(matrix, "CPU_CHUNK_BYTES", 1)  # one example per tile
        tiled = margin_lower_bounds(model, x, y, 0.2, "deeppoly", weights, conv_mode="matrix")
    scale = base.abs().max().item()
    assert torch.allclose(small, base, rtol=0, atol=1e-6 * scale)
    assert torch.allclose(tiled, base, rtol=0, atol=1e-6 * scale)


def test_gradients_equal_row_engine_and_chunked():
    """d(sum of bounds)/d(weights): matrix mode equals the row engine; chunked (recomputed in
    backward) equals unchunked."""
    model, weights, x, y = digits_population(members=2, batch=5)

    def grad(**opts):
        w = weights.clone().requires_grad_(True)
        lb = margin_lower_bounds(model, x, y, 0.2, "deeppoly", w, **opts)
        (g,) = torch.autograd.grad(lb.sum(), w)
        return g

    mine = grad(conv_mode="matrix")
    theirs = grad(conv_mode="patches", rows="groups")
    chunked = grad(conv_mode="matrix", memory_budget_mb=0.05)
    scale = theirs.abs().max().item()
    assert scale > 0
    assert torch.allclose(mine, theirs, rtol=0, atol=1e-5 * scale), (mine - theirs).abs().max()
    assert torch.allclose(chunked, mine, rtol=0, atol=1e-5 * scale), (chunked - mine).abs().max()


def test_model_gradient_through_matrix_mode():
    """weights=None (GRAD trains the model's own parameters): gradients reach every parameter."""
    model, _, x, y = digits_population(batch=4)
    lb = margin_lower_bounds(model, x, y, 0.2, "deeppoly", conv_mode="matrix")
    lb.sum().backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())


def test_alpha_crown_in_matrix_mode():
    """alpha-CROWN's per-row slopes go through matrix mode too: never looser than DeepPoly, equal
    to alpha-CROWN with the row engines to the rounding of a few Adam steps."""
    model, weights, x, y = digits_population(members=2, batch=4)
    with torch.no_grad():
        deeppoly = margin_lower_bounds(model, x, y, 0.2, "deeppoly", weights, conv_mode="matrix")
    mine = margin_lower_bounds(model, x, y, 0.2, "alpha-crown", weights, alpha_steps=3, conv_mode="matrix")
    theirs = margin_lower_bounds(model, x, y, 0.2, "alpha-crown", weights, alpha_steps=3, conv_mode="patches")
    assert bool((mine >= deeppoly - 1e-6).all())
    assert torch.allclose(mine, theirs, rtol=0, atol=1e-4 * theirs.abs().max().item())


def test_matrix_option_validation():
    model, weights, x, y = digits_population()
    with pytest.raises(ValueError, match="conv_mode"):
        margin_lower_bounds(model, x, y, 0.1, "deeppoly", weights, conv_mode="matrices")


def test_relaxation_without_where_equals_relu_relax():
    """The mask-multiplied relaxation of matrix mode equals common.relu_relax, boundary cases
    (l = 0, u = 0, l = u, u = -l) included."""
    from mpigls.bounds.common import relu_relax

    gen = torch.Generator().manual_seed(0)
    lo = torch.randn(2, 3, 50, generator=gen)
    hi = lo + 2 * torch.rand(2, 3, 50, generator=gen)
    lo[0, 0, :4], hi[0, 0, :4] = torch.tensor([0.0, -1.0, 0.5, -2.0]), torch.tensor([1.0, 0.0, 0.5, 2.0])
    alpha, diff, shift = matrix._relax(lo, hi)
    ref = relu_relax(lo, hi)
    assert torch.equal(alpha, ref.alpha)
    assert torch.equal(diff, ref.slope - ref.alpha)
    assert torch.equal(shift, ref.shift.squeeze(2))
