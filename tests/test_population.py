"""Population forward: stacked members equal a loop over members, shapes, errors."""

import pytest
import torch

from mpigls.nn import models, population


@pytest.mark.parametrize("name,shape", [("cnn3", (1, 12, 12)), ("cnn5", (3, 16, 16)), ("mlp-tiny", (1, 4, 4))])
def test_stack_equals_loop(name, shape):
    torch.manual_seed(0)
    model = models.build(name, shape, 7, mean=[0.2] * shape[0], std=[0.5] * shape[0])
    x = torch.rand(5, *shape)
    theta = models.flat_params(model)
    params = theta + 0.1 * torch.randn(4, theta.numel())
    out = population.forward(model, x, params)
    assert out.shape == (4, 5, 7)
    assert torch.equal(out, population.forward(model, x, params))
    for p, row in zip(params, out):
        models.load_flat_(model, p)
        with torch.no_grad():
            assert torch.allclose(row, model(x), atol=1e-5)
        assert torch.allclose(population.forward(model, x, p), row, atol=1e-5)
    per_member_x = torch.rand(4, 5, *shape)
    out2 = population.forward(model, per_member_x, params)
    for i in range(4):
        assert torch.allclose(out2[i], population.forward(model, per_member_x[i], params[i]), atol=1e-5)


def test_gradient_flows_to_params():
    model = models.build("cnn3", (1, 8, 8), 3)
    params = models.flat_params(model).repeat(2, 1).requires_grad_(True)
    population.forward(model, torch.rand(2, 1, 8, 8), params).sum().backward()
    assert params.grad is not None and params.grad.abs().sum() > 0


def test_errors():
    model = models.build("mlp-tiny", (1, 4, 4), 3)
    with pytest.raises(ValueError, match="weights"):
        population.forward(model, torch.rand(2, 1, 4, 4), torch.zeros(1, 2, 3))
    with pytest.raises(TypeError):
        population.stack(
            torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)),
            None,
            (1, 4, 4),
        )
