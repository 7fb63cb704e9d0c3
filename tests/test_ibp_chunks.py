"""IBP chunked over (member, example) pairs on CPU equals the whole-population pass.

``bounds.ibp.bound`` splits a population into cache-sized chunks (``chunk_shape``); every member
and example is bounded independently, so the chunked bounds must equal the unchunked ones (float32
rounding of the convolution kernels), keep autograd working, and stay equal to single-network
calls and to the float64 reference of tests/test_bounds_reference.py.
"""

import pytest
import torch

from mpigls.bounds import ibp, make_problem, margin_lower_bounds
from mpigls.nn import models
from test_bounds_reference import reference

CASES = [("cnn3", (1, 8, 8)), ("cnn5", (1, 8, 8)), ("mlp-tiny", (1, 4, 4)), ("cnn3", (3, 12, 12))]
WHOLE = 1 << 62


def population(name, shape, p=5, b=7, dtype=torch.float32):
    torch.manual_seed(11)
    model = models.build(name, shape, 5, mean=[0.3] * shape[0], std=[0.4] * shape[0]).to(dtype)
    theta = models.flat_params(model).detach()
    params = theta + 0.05 * torch.randn(p, theta.numel(), dtype=dtype)
    x, y = torch.rand(b, *shape, dtype=dtype), torch.randint(0, 5, (b,))
    return model, x, y, params


def chunk_sizes(prob):
    """Budgets that give: whole, members only, members x examples, one pair at a time."""
    widest = max(int(torch.tensor(layer.out_shape).prod()) for layer in prob.net.layers) * 4
    batch = prob.y.shape[0]
    return [WHOLE, 2 * batch * widest, 3 * widest, 1]


@pytest.mark.parametrize("case", CASES)
def test_chunks_equal_whole_population(case):
    model, x, y, params = population(*case)
    prob = make_problem(model, x, y, 0.1, params)
    with torch.no_grad():
        whole = ibp.bound(prob, WHOLE)
        seen = set()
        for cb in chunk_sizes(prob):
            seen.add(ibp.chunk_shape(prob, cb))
            got = ibp.bound(prob, cb)
            assert got.shape == whole.shape
            assert torch.allclose(got, whole, rtol=1e-5, atol=1e-5 * whole.abs().max().item()), cb
        assert len(seen) == 4, seen  # the four budgets really split differently
        for i in range(params.shape[0]):  # each member equals its own single-network call
            single = margin_lower_bounds(model, x, y, 0.1, "ibp", params[i])
            assert torch.allclose(whole[i], single, rtol=1e-5, atol=1e-5 * single.abs().max().item())


@pytest.mark.parametrize("case", CASES[:3])
def test_chunks_equal_float64_reference(case):
    model, x, y, params = population(*case, p=2, b=3, dtype=torch.float64)
    for cb in (WHOLE, 1):
        got = ibp.bound(make_problem(model, x, y, 0.1, params), cb).detach()
        for i in range(params.shape[0]):
            models.load_flat_(model, params[i])
            ref = reference(model, x, y, 0.1, "ibp")
            assert torch.allclose(got[i], ref, rtol=1e-9, atol=1e-9 * ref.abs().max().item())


def test_chunk_rule_and_gradients():
    model, x, y, params = population("cnn3", (1, 8, 8))
    prob = make_problem(model, x, y, 0.1, params)
    # default budget on CPU: whole population here (small); a big net at B=128 splits members
    assert ibp.chunk_shape(prob) == (5, 7)
    widest = 8 * 4 * 4 * 4
    assert ibp.chunk_shape(prob, 2 * 7 * widest) == (2, 7)
    assert ibp.chunk_shape(prob, 3 * widest) == (1, 3)
    big = make_problem(
        models.build("cnn3", (1, 28, 28), 10),
        torch.rand(128, 1, 28, 28),
        torch.zeros(128, dtype=torch.long),
        0.1,
        torch.zeros(64, models.flat_params(models.build("cnn3", (1, 28, 28), 10)).numel()),
    )
    assert ibp.chunk_shape(big) == (2, 128)  # 8*14*14*4 B per pair, 2 MiB per chunk
    grads = []
    for cb in (WHOLE, 3 * widest):
        p = params.clone().requires_grad_(True)
        ibp.bound(make_problem(model, x, y, 0.1, p), cb).sum().backward()
        grads.append(p.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-5 * grads[0].abs().max().item())
