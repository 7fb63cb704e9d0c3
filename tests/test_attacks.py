"""PGD: stays in the box, lowers the margin, deterministic, members independent."""

import torch

from mpigls.nn import models
from mpigls.nn.attacks import margins, pgd


def setup():
    torch.manual_seed(0)
    model = models.build("cnn3", (1, 8, 8), 4)
    return model, torch.rand(6, 1, 8, 8), torch.randint(0, 4, (6,))


def test_in_box_and_stronger_than_clean():
    model, x, y = setup()
    for loss in ("ce", "margin"):
        adv = pgd(model, x, y, 0.1, 10, 0.02, loss=loss, generator=torch.Generator().manual_seed(1))
        assert (adv >= (x - 0.1).clamp(0, 1) - 1e-7).all() and (adv <= (x + 0.1).clamp(0, 1) + 1e-7).all()
        with torch.no_grad():
            assert margins(model(adv), y).min(-1).values.sum() <= margins(model(x), y).min(-1).values.sum()


def test_deterministic_and_population_independent():
    model, x, y = setup()
    theta = models.flat_params(model)
    params = theta + 0.05 * torch.randn(3, theta.numel())
    a = pgd(model, x, y, 0.1, 5, 0.03, params, generator=torch.Generator().manual_seed(2))
    b = pgd(model, x, y, 0.1, 5, 0.03, params, generator=torch.Generator().manual_seed(2))
    assert a.shape == (3, 6, 1, 8, 8) and torch.equal(a, b)
    single = pgd(model, x, y, 0.1, 5, 0.03, params[1], generator=torch.Generator().manual_seed(2))
    assert torch.allclose(single, a[1], atol=1e-6)
    assert pgd(model, x, y, 0.0, 3, 0.1).equal(x)
