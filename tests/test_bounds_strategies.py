"""Every bound strategy gives the same bounds and they are sound.

Strategies: rows "packed" / "groups" / "padded" (how DeepPoly's intermediate rows are laid out),
conv_mode "patches" / "dense", population "batched" / "loop". Each is compared with the dense
float64 reference of tests/test_bounds_reference.py (deeppoly, crown-ibp) in float64, with the
auto choice in float32 (equal to float32 rounding), and checked for soundness by sampling + PGD.
"""

import pytest
import torch

from mpigls.bounds import margin_lower_bounds
from mpigls.nn import models
from test_bounds import make, worst_margin
from test_bounds_reference import reference

ROWS = ["packed", "groups", "padded"]
CONV = ["patches", "dense"]
CASES = [("cnn3", (1, 8, 8)), ("cnn5", (1, 8, 8)), ("mlp-tiny", (1, 4, 4))]
_REFERENCE = {}


def case_and_reference(name, shape):
    """Model, inputs and the float64 reference bounds (computed once per case: it is slow)."""
    torch.manual_seed(3)
    model = models.build(name, shape, 5, mean=[0.3] * shape[0], std=[0.4] * shape[0]).double()
    x, y = torch.rand(3, *shape, dtype=torch.float64), torch.randint(0, 5, (3,))
    if (name, shape) not in _REFERENCE:
        _REFERENCE[name, shape] = reference(model, x, y, 0.1, "deeppoly")
    return model, x, y, _REFERENCE[name, shape]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("conv", CONV)
def test_rows_match_dense_reference(case, rows, conv):
    model, x, y, ref = case_and_reference(*case)
    for budget in (64.0, 0.4):  # one chunk; several member/row chunks
        got = margin_lower_bounds(
            model, x, y, 0.1, "deeppoly", memory_budget_mb=budget, rows=rows, conv_mode=conv
        ).detach()
        assert torch.allclose(got, ref, rtol=1e-9, atol=1e-9 * ref.abs().max().item()), (got - ref).abs().max()


@pytest.mark.parametrize("method", ["deeppoly", "alpha-crown", "crown-ibp", "ibp"])
@pytest.mark.parametrize("population", ["batched", "loop"])
def test_population_strategies_equal_single_network(method, population):
    """A population bounded batched or member by member equals each member bounded alone (float32)."""
    model, x, y = make("cnn3", (1, 10, 10), 11, batch=4)
    theta = models.flat_params(model)
    params = theta + 0.05 * torch.randn(3, theta.numel(), generator=torch.Generator().manual_seed(1))
    opts = {"alpha_steps": 3} if method == "alpha-crown" else {}
    got = margin_lower_bounds(model, x, y, 0.05, method, params, population=population, **opts).detach()
    single = torch.stack([margin_lower_bounds(model, x, y, 0.05, method, p, **opts).detach() for p in params])
    assert torch.allclose(got, single, atol=2e-5, rtol=2e-5), (got - single).abs().max()
    if method in ("deeppoly", "crown-ibp"):
        ref = torch.stack(
            [reference(models.load_flat_(model, p).double(), x.double(), y, 0.05, method) for p in params.double()]
        )
        assert torch.allclose(got.double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rows", ROWS)
def test_rows_float32_equal_and_sound(rows):
    """float32, population of 2, real MNIST size: every layout equals the padded one to rounding and is sound."""
    model, x, y = make("cnn3", (1, 28, 28), 4, k=10, batch=2)
    theta = models.flat_params(model)
    params = theta + 0.02 * torch.randn(2, theta.numel(), generator=torch.Generator().manual_seed(2))
    eps = 0.03
    base = margin_lower_bounds(model, x, y, eps, "deeppoly", params, rows="padded").detach()
    got = margin_lower_bounds(model, x, y, eps, "deeppoly", params, rows=rows).detach()
    assert torch.allclose(got, base, atol=1e-5, rtol=1e-5)
    for p, lb in zip(params, got):
        models.load_flat_(model, p)
        worst = worst_margin(model, x, y, eps, num=32)
        assert (lb <= worst + 1e-5).all(), (lb - worst).max()


@pytest.mark.parametrize("rows", ROWS)
def test_rows_sound_small(rows):
    for seed in range(2):
        model, x, y = make("cnn5", (1, 8, 8), seed)
        worst = worst_margin(model, x, y, 0.1, num=128, seed=seed)
        for method, opts in (("deeppoly", {}), ("alpha-crown", {"alpha_steps": 4})):
            lb = margin_lower_bounds(model, x, y, 0.1, method, rows=rows, **opts).detach()
            assert (lb <= worst + 1e-5).all(), (method, rows, (lb - worst).max())


@pytest.mark.slow
def test_rows_differentiable_and_chunk_invariant():
    """Gradients through packed / grouped rows equal the padded engine's, chunked or not."""
    model, x, y = make("cnn3", (1, 8, 8), 7, batch=2)
    params = models.flat_params(model).repeat(2, 1) + 0.01 * torch.randn(2, models.num_params(model))
    grads = {}
    for rows in ROWS:
        for budget in (1024, 0.05):
            p = params.clone().requires_grad_(True)
            lb = margin_lower_bounds(model, x, y, 0.05, "deeppoly", p, memory_budget_mb=budget, rows=rows)
            grads[rows, budget] = torch.autograd.grad(lb.sum(), p)[0]
    ref = grads["padded", 1024]
    for key, g in grads.items():
        assert torch.allclose(g, ref, atol=1e-4, rtol=1e-4), key


def test_strategy_option_validation():
    model, x, y = make("cnn3", (1, 8, 8), 0)
    with pytest.raises(ValueError, match="rows"):
        margin_lower_bounds(model, x, y, 0.1, "deeppoly", rows="diagonal")
    with pytest.raises(ValueError, match="population"):
        margin_lower_bounds(model, x, y, 0.1, "ibp", population="sometimes")


@pytest.mark.parametrize(
    "name,shape",
    [pytest.param("cnn5", (2, 16, 16), marks=pytest.mark.slow), ("cnn3", (3, 10, 10)), ("mlp-tiny", (3, 4, 4))],
)
def test_dense_rows_channels_last_match_padded(name, shape):
    """Dense rows run in HWC order (rows.py): a Linear layer after a conv map with H, W > 1, a
    multi-channel input and a Linear first layer agree with the padded engine (float64), for the
    intermediate rows (packed, groups) and the final margin bound (member loop, no grad)."""
    torch.manual_seed(5)
    model = models.build(name, shape, 5, mean=[0.3] * shape[0], std=[0.4] * shape[0]).double()
    x, y = torch.rand(2, *shape, dtype=torch.float64), torch.randint(0, 5, (2,))
    theta = models.flat_params(model).detach()
    params = theta + 0.05 * torch.randn(2, theta.numel(), dtype=torch.float64)
    with torch.no_grad():
        base = margin_lower_bounds(model, x, y, 0.05, "deeppoly", params, rows="padded", conv_mode="dense")
        for rows in ("packed", "groups"):
            got = margin_lower_bounds(model, x, y, 0.05, "deeppoly", params, rows=rows, conv_mode="dense")
            assert torch.allclose(got, base, rtol=1e-9, atol=1e-9), (rows, (got - base).abs().max())
    if name != "cnn5":  # the grad path keeps the grouped engine for the final bound
        with torch.enable_grad():
            p = params.clone().requires_grad_(True)
            grad_lb = margin_lower_bounds(model, x, y, 0.05, "deeppoly", p, rows="padded", conv_mode="dense")
        assert torch.allclose(grad_lb.detach(), base, rtol=1e-9, atol=1e-9)


@pytest.mark.slow
def test_cpu_chunks_and_native_transposed_conv_do_not_change_bounds(monkeypatch):
    """Cache-sized CPU row chunks (rows.CPU_CHUNK_BYTES) and the single-channel transposed
    convolution on ATen's native kernel change rounding only: tiny chunks, unpadded patch
    matrices and the budget-sized chunks of before agree to float32 rounding, and the native
    kernel equals conv_transpose2d."""
    from mpigls.bounds import rows as rows_mod

    torch.manual_seed(2)
    a = torch.randn(5, 4, 6, 6)
    w = torch.randn(4, 1, 5, 5)
    assert torch.allclose(
        rows_mod._conv_transpose(a, w, (2, 2), (2, 2), (1, 1)),
        torch.nn.functional.conv_transpose2d(a, w, None, 2, 2, 1),
        atol=1e-5,
    )
    model, x, y = make("cnn5", (1, 16, 16), 4, batch=2)
    theta = models.flat_params(model).detach()
    params = theta + 0.05 * torch.randn(2, theta.numel(), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        base = margin_lower_bounds(model, x, y, 0.05, "deeppoly", params)
        for cap, pad in ((2**14, 1), (2**40, 16)):
            monkeypatch.setattr(rows_mod, "CPU_CHUNK_BYTES", cap)
            monkeypatch.setattr(rows_mod, "PAD_COLS", pad)
            for rows in ("packed", "groups"):
                got = margin_lower_bounds(model, x, y, 0.05, "deeppoly", params, rows=rows)
                assert torch.allclose(got, base, atol=2e-5, rtol=2e-5), (cap, rows, (got - base).abs().max())
