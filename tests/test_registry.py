"""The relaxation registry: one signature for every bound method, a toy relaxation added with one
module-sized function and one ``register`` line, the config's method lists, the deprecated
``params=`` keyword and the shared margin index."""

import warnings

import pytest
import torch

from mpigls import config
from mpigls.bounds import METHODS, SOUND_METHODS, Relaxation, margin_lower_bounds, options, register, registry
from mpigls.bounds.common import Problem, ibp_layer
from mpigls.nn import models, population
from mpigls.nn.margins import margins, other_classes
from mpigls.objectives import losses


def make(name="cnn3", shape=(1, 8, 8), k=5, batch=4, seed=0):
    torch.manual_seed(seed)
    model = models.build(name, shape, k, mean=[0.4] * shape[0], std=[0.3] * shape[0])
    return model, torch.rand(batch, *shape), torch.randint(0, k, (batch,))


def logit_box(prob: Problem, slack: float = 0.0) -> torch.Tensor:
    """A toy sound relaxation: interval bounds of the logits, then z_y - z_i >= l_y - u_i - slack.

    Looser than ibp, which bounds C W directly: |w_y - w_i| <= |w_y| + |w_i|.
    """
    lo, hi = prob.lo, prob.hi
    for i, layer in enumerate(prob.net.layers):
        if i:
            lo, hi = lo.clamp(min=0), hi.clamp(min=0)
        lo, hi = ibp_layer(layer, lo, hi)  # (P, B, K) at the end
    p = lo.shape[0]
    low_y = lo.gather(2, prob.y.view(1, -1, 1).expand(p, -1, 1))
    up_o = hi.gather(2, other_classes(prob.y, lo.shape[2]).unsqueeze(0).expand(p, -1, -1))
    return low_y - up_o - float(slack)


@pytest.fixture
def toy():
    spec = register(Relaxation("logit-box", logit_box, ("slack",)))
    try:
        yield spec
    finally:
        registry.unregister("logit-box")
    assert "logit-box" not in registry.RELAXATIONS


def test_toy_relaxation_runs_through_the_entry_points(toy):
    model, x, y = make()
    eps = 0.05
    lb = margin_lower_bounds(model, x, y, eps, "logit-box").detach()
    assert lb.shape == (4, 4)
    # sound: below the margins of points sampled in the box
    g = torch.Generator().manual_seed(1)
    pts = (x + eps * (2 * torch.rand(128, *x.shape, generator=g) - 1)).clamp(0, 1)
    with torch.no_grad():
        seen = margins(model(pts.flatten(0, 1)).view(128, 4, -1), y).min(0).values
    assert (lb <= seen + 1e-5).all()
    # never tighter than ibp; exact (the true margins) at eps = 0
    assert (lb <= margin_lower_bounds(model, x, y, eps, "ibp").detach() + 1e-5).all()
    with torch.no_grad():
        exact = margins(model(x), y)
    assert torch.allclose(margin_lower_bounds(model, x, y, 0.0, "logit-box").detach(), exact, atol=1e-5)
    # its option, with the engine's default
    assert toy.defaults == {"slack": 0.0}
    assert options("logit-box") == ("memory_budget_mb", "population", "slack")
    shifted = margin_lower_bounds(model, x, y, eps, "logit-box", slack=0.5).detach()
    assert torch.allclose(shifted, lb - 0.5)
    with pytest.raises(ValueError, match="unknown option.*slack"):
        margin_lower_bounds(model, x, y, eps, "logit-box", rows="auto")
    # a population: member i's bounds are those of its own weights; chunking by the registry's
    # state model (one pair per chunk under a tiny budget) gives the same bounds
    theta = models.flat_params(model)
    weights = theta + 0.05 * torch.randn(3, theta.numel(), generator=g)
    whole = margin_lower_bounds(model, x, y, eps, "logit-box", weights).detach()
    chunked = margin_lower_bounds(model, x, y, eps, "logit-box", weights, memory_budget_mb=1e-4)
    assert whole.shape == (3, 4, 4)
    assert torch.allclose(chunked, whole, atol=1e-6)
    for i in range(3):
        assert torch.allclose(margin_lower_bounds(model, x, y, eps, "logit-box", weights[i]), whole[i], atol=1e-6)
    # the loss: robust cross-entropy of those bounds, per member
    loss = losses.certified_loss(model, x, y, eps, "logit-box", weights)
    assert torch.allclose(loss, losses.robust_ce(whole))


def test_registering_checks_names_and_options(toy):
    with pytest.raises(ValueError, match="already registered"):
        register(Relaxation("logit-box", logit_box))
    with pytest.raises(TypeError, match="not parameters"):
        Relaxation("bad", logit_box, ("slack", "nope"))
    with pytest.raises(ValueError, match="unknown bound method 'nope'.*logit-box"):
        margin_lower_bounds(*make(), 0.1, "nope")


@pytest.mark.parametrize("method", METHODS)
def test_declared_defaults_are_the_engine_defaults(method):
    """Passing every option at its declared default changes nothing (bit for bit)."""
    model, x, y = make("mlp-tiny", (1, 4, 4), k=3)
    spec = registry.get(method)
    assert tuple(spec.defaults) == spec.options
    with torch.no_grad():
        plain = margin_lower_bounds(model, x, y, 0.05, method)
        explicit = margin_lower_bounds(model, x, y, 0.05, method, **spec.defaults)
    assert torch.equal(plain, explicit)


def test_method_lists_come_from_the_registry():
    assert tuple(registry.RELAXATIONS)[: len(METHODS)] == METHODS
    assert tuple(m for m in METHODS if registry.get(m).sound) == SOUND_METHODS
    assert "sabr" in METHODS and "sabr" not in SOUND_METHODS
    # config.py keeps plain tuples (it does not import torch); they must agree with the registry
    assert config.CERTIFY_METHODS == SOUND_METHODS
    assert config.BOUND_METHODS[: len(METHODS)] == METHODS
    assert sorted(config.BOUND_METHODS) == sorted(losses.LOSS_METHODS)
    assert not registry.get("alpha-crown").differentiable
    assert registry.get("sabr").state is None


def test_params_keyword_is_deprecated_but_still_works():
    model, x, y = make("mlp-tiny", (1, 4, 4), k=3)
    theta = models.flat_params(model)
    weights = theta + 0.01 * torch.randn(2, theta.numel())
    calls = [
        lambda **kw: margin_lower_bounds(model, x, y, 0.05, "ibp", **kw),
        lambda **kw: losses.certified_loss(model, x, y, 0.05, "crown-ibp", **kw),
        lambda **kw: population.forward(model, x, **kw),
    ]
    for call in calls:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            new = call(weights=weights)
        with pytest.warns(DeprecationWarning, match="weights="):
            old = call(params=weights)
        assert torch.equal(old, new)
        with pytest.raises(TypeError, match="both weights= and params="):
            call(weights=weights, params=weights)


def test_other_classes_and_margins():
    g = torch.Generator().manual_seed(0)
    for k in (2, 3, 10):
        y = torch.randint(0, k, (50,), generator=g)
        others = other_classes(y, k)
        assert others.shape == (50, k - 1)
        for row, label in zip(others.tolist(), y.tolist()):
            assert row == [i for i in range(k) if i != label]
        logits = torch.randn(3, 50, k, generator=g)
        m = margins(logits, y)
        for i in range(k - 1):
            want = (
                logits.gather(2, y.view(1, -1, 1).expand(3, -1, 1))[..., 0] - logits[:, torch.arange(50), others[:, i]]
            )
            assert torch.equal(m[..., i], want)
