"""Losses: robust CE formula, natural CE, certified_loss dispatch and shapes."""

import pytest
import torch
import torch.nn.functional as F

from mpigls.nn import models
from mpigls.nn.attacks import default_step_size
from mpigls.objectives.losses import LOSS_METHODS, certified_loss, natural_ce, robust_ce


def test_robust_ce_is_ce_of_negated_margins():
    lb = torch.randn(2, 5, 3)
    logits = torch.cat([torch.zeros(2, 5, 1), -lb], -1)
    ref = torch.stack([F.cross_entropy(l, torch.zeros(5, dtype=torch.long)) for l in logits])
    assert torch.allclose(robust_ce(lb), ref)


def test_natural_ce_matches_torch():
    logits, y = torch.randn(3, 7, 4), torch.randint(0, 4, (7,))
    assert torch.allclose(natural_ce(logits, y), torch.stack([F.cross_entropy(l, y) for l in logits]))


@pytest.mark.parametrize("method", LOSS_METHODS)
def test_certified_loss_shapes(method):
    torch.manual_seed(0)
    model = models.build("cnn3", (1, 8, 8), 4)
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 4, (4,))
    params = models.flat_params(model) + 0.01 * torch.randn(2, models.num_params(model))
    opts = {"pgd_steps": 2} if method in ("pgd", "staps", "sabr") else {}
    loss = certified_loss(model, x, y, 0.05, method, params, **opts)
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    single = certified_loss(model, x, y, 0.05, method, params[0], **opts)
    assert single.shape == () and torch.allclose(single, loss[0], atol=1e-5)


def test_ordering_and_errors():
    torch.manual_seed(0)
    model = models.build("cnn3", (1, 8, 8), 4)
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 4, (4,))
    nat = certified_loss(model, x, y, 0.05, "natural")
    assert certified_loss(model, x, y, 0.05, "ibp") >= nat - 1e-6
    with pytest.raises(ValueError, match="unknown loss method"):
        certified_loss(model, x, y, 0.05, "taps")
    with pytest.raises(ValueError, match="staps_mix"):
        certified_loss(model, x, y, 0.05, "staps", staps_mix=2.0)


def test_pgd_default_step_is_madry_2_5_eps_over_steps():
    torch.manual_seed(0)
    model = models.build("cnn3", (1, 8, 8), 4)
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 4, (4,))
    eps = torch.tensor([0.02, 0.05, 0.04, 0.01])  # per example: the step follows the largest
    assert default_step_size(0.05, 4) == pytest.approx(2.5 * 0.05 / 4)
    assert default_step_size(0.05, 0) == pytest.approx(2.5 * 0.05)
    implicit = certified_loss(model, x, y, eps, "pgd", pgd_steps=4)
    explicit = certified_loss(model, x, y, eps, "pgd", pgd_steps=4, pgd_step_size=2.5 * 0.05 / 4)
    other = certified_loss(model, x, y, eps, "pgd", pgd_steps=4, pgd_step_size=1e-4)
    assert torch.equal(implicit, explicit) and not torch.equal(implicit, other)
