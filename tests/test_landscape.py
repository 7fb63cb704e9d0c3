"""Loss landscapes (paper Fig. 6): original vs Gaussian-smoothed certified loss along a direction."""

import numpy as np
import pytest
import torch

from mpigls.evaluation import landscape
from mpigls.nn import models
from mpigls.numerics import noise
from mpigls.objectives import losses


@pytest.fixture(scope="module")
def problem():
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = models.build("mlp-tiny", (1, 4, 4), 3)
    x = torch.rand(6, 1, 4, 4, generator=gen)
    y = torch.randint(0, 3, (6,), generator=gen)
    return model, x, y, 0.05


@pytest.mark.parametrize("method", ["ibp", "deeppoly"])
def test_gradient_direction_is_unit_ascent(problem, method):
    model, x, y, eps = problem
    before = models.flat_params(model)
    d = landscape.deeppoly_gradient_direction(model, x, y, eps, method)
    assert d.shape == before.shape and d.dtype == torch.float32
    assert float(d.norm()) == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(models.flat_params(model), before)
    h = 1e-3
    up = losses.certified_loss(model, x, y, eps, method, weights=(before + h * d)[None])
    down = losses.certified_loss(model, x, y, eps, method, weights=(before - h * d)[None])
    assert float(up) > float(down)


def test_gradient_direction_needs_a_differentiable_relaxation(problem):
    """alpha-crown's bounds are detached (registry: differentiable=False): no direction from them."""
    with pytest.raises(ValueError, match="detached"):
        landscape.deeppoly_gradient_direction(*problem, "alpha-crown")


def test_landscape_values(problem):
    model, x, y, eps = problem
    theta = models.flat_params(model)
    d = landscape.deeppoly_gradient_direction(model, x, y, eps)
    methods = ["ibp", "deeppoly"]
    res = landscape.landscape(model, x, y, eps, d, [-0.2, 0.0, 0.2], [1e-7, 0.05], methods, 8, seed=3, chunk_size=5)
    assert res["original"].shape == (2, 3)
    assert res["smoothed_mean"].shape == res["smoothed_ci"].shape == res["num_nonfinite"].shape == (2, 2, 3)
    assert (res["smoothed_ci"] >= 0).all() and (res["num_nonfinite"] == 0).all()
    z = noise.noise_block(3, 0, range(8), theta.numel(), noise.STREAM_PGPE)
    for mi, method in enumerate(methods):
        with torch.no_grad():
            at_zero = float(losses.certified_loss(model, x, y, eps, method))
        assert res["original"][mi, 1] == pytest.approx(at_zero, rel=1e-5)
        # a tiny sigma reproduces the original loss
        np.testing.assert_allclose(res["smoothed_mean"][mi, 0], res["original"][mi], rtol=1e-3)
        draws = losses.certified_loss(model, x, y, eps, method, weights=theta + 0.2 * d + 0.05 * z).double()
        assert res["smoothed_mean"][mi, 1, 2] == pytest.approx(float(draws.mean()), rel=1e-5)
        assert res["smoothed_ci"][mi, 1, 2] == pytest.approx(1.96 * float(draws.std()) / np.sqrt(8), rel=1e-4)
    with pytest.raises(ValueError, match="direction"):
        landscape.landscape(model, x, y, eps, d[:-1], [0.0], [0.1], ["ibp"], 4)
    with pytest.raises(ValueError, match="sigmas"):
        landscape.landscape(model, x, y, eps, d, [0.0], [0.0], ["ibp"], 4)


def test_plot_and_run_from_checkpoint(problem, tmp_path):
    model, x, y, eps = problem
    theta = models.flat_params(model)
    before = theta.clone()
    path = landscape.run_from_checkpoint(
        model,
        theta * 1.01,
        x,
        y,
        eps,
        sigmas=[0.01, 0.1],
        methods=["ibp", "crown-ibp", "deeppoly"],
        num_samples=4,
        num_points=5,
        out=tmp_path / "fig6.png",
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert torch.equal(models.flat_params(model), before)
