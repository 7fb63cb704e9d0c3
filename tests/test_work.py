"""Work items (member block, example chunk) of mpigls.parallel.work: the arithmetic, the fixed-order
recombination of chunk means, the refusals, and that every loss method allowed with
batch_chunks > 1 gives per-member losses whose chunked recombination is the unchunked mean."""

import pytest
import torch

from mpigls import config
from mpigls.nn import models
from mpigls.objectives.losses import LOSS_METHODS, certified_loss
from mpigls.parallel import work
from mpigls.run import train

from conftest import tiny_overrides


def test_items_cover_every_member_and_example_once():
    split = work.WorkSplit(num_members=11, unit_size=4, batch_size=10, chunks=3, per_member=2)
    assert (split.num_units, split.num_items) == (3, 9)
    assert [split.item(i) for i in range(4)] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert [split.examples(c) for c in range(3)] == [slice(0, 4), slice(4, 7), slice(7, 10)]
    assert sorted(m for u in range(3) for m in split.members(u)) == list(range(11))
    assert [split.item_size(i) for i in range(9)] == [8] * 6 + [6] * 3
    with pytest.raises(ValueError, match="work item"):
        split.item(9)
    with pytest.raises(ValueError, match="batch chunks"):
        work.WorkSplit(4, 2, batch_size=3, chunks=4)


def test_combine_is_the_example_weighted_mean_in_fixed_order():
    split = work.WorkSplit(num_members=5, unit_size=2, batch_size=7, chunks=3)
    per_example = torch.rand(5, 7, dtype=torch.float64)
    gathered = torch.cat(
        [per_example[split.members(u), split.examples(c)].mean(-1) for u in range(split.num_units) for c in range(3)]
    )
    out = split.combine(gathered)
    torch.testing.assert_close(out, per_example.mean(-1), rtol=1e-15, atol=0)
    # fixed order: ((w0 m0 + w1 m1) + w2 m2) exactly, whatever the values
    m = gathered[:6].reshape(3, 2)
    assert torch.equal(out[:2], (m[0] * (3 / 7) + m[1] * (2 / 7)) + m[2] * (2 / 7))
    one = work.WorkSplit(num_members=5, unit_size=2, batch_size=7)
    x = torch.rand(5, dtype=torch.float64)
    assert torch.equal(one.combine(x), x)  # one chunk: the losses as evaluated
    assert one.combine(x[:3]).isnan().all() and one.combine(x[:3]).shape == (5,)  # a rank stopped early


def test_check_refuses_what_cannot_be_split():
    work.check("pgpe", "sabr", 1, 8)
    work.check("pgpe", "deeppoly", 4, 8)
    with pytest.raises(ValueError, match="only PGPE splits"):
        work.check("rgs", "ibp", 2, 8)
    for method in work.ATTACK_METHODS:
        with pytest.raises(ValueError, match="attack draws noise"):
            work.check("pgpe", method, 2, 8)
    with pytest.raises(ValueError, match="GRAD already splits"):
        work.check("grad", "ibp", 2, 8)
    with pytest.raises(ValueError, match="more than train.batch_size"):
        work.check("pgpe", "ibp", 9, 8)


@pytest.mark.parametrize("method", [m for m in LOSS_METHODS if m not in work.ATTACK_METHODS])
def test_chunked_losses_equal_unchunked_for_every_allowed_method(method):
    """Per-example terms do not depend on the rest of the batch, so the example-weighted mean of
    chunk losses is the minibatch loss to float32 rounding (alpha-CROWN's slopes are optimised per
    example too)."""
    torch.manual_seed(0)
    model = models.build("cnn3", (1, 8, 8), 4)
    x, y = torch.rand(7, 1, 8, 8), torch.randint(0, 4, (7,))
    params = models.flat_params(model) + 0.02 * torch.randn(3, models.num_params(model))
    opts = {}
    full = certified_loss(model, x, y, 0.03, method, params, **opts).double()
    split = work.WorkSplit(num_members=3, unit_size=3, batch_size=7, chunks=3)
    gathered = torch.cat(
        [
            certified_loss(model, x[split.examples(c)], y[split.examples(c)], 0.03, method, params, **opts).double()
            for c in range(3)
        ]
    )
    torch.testing.assert_close(split.combine(gathered), full, rtol=1e-5, atol=1e-6)


def test_train_refuses_chunks_with_an_attack_method_before_any_work(tmp_path):
    cfg = config.load_config(None, tiny_overrides(**{"bound.method": "sabr", "optimizer.batch_chunks": 2}))
    with pytest.raises(config.ConfigError, match="batch_chunks=2 with bound.method='sabr'"):
        train.train(cfg, tmp_path / "run", log=lambda m: None)
