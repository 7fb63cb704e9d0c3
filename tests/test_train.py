"""The training loop: it learns, resume is bitwise identical, all three optimizers run end to end."""

import numpy as np
import pytest
import torch

from mpigls import config
from mpigls.run import checkpoint, train

from conftest import tiny_overrides


def _cfg(**extra):
    return config.load_config(None, tiny_overrides(**extra))


def test_resume_is_bitwise_identical_to_uninterrupted(tmp_path):
    cfg = _cfg(**{"train.epochs": 1})
    straight = train.train(cfg, tmp_path / "a", log=lambda m: None)
    first = train.train(cfg, tmp_path / "b", max_generations=3, log=lambda m: None)
    assert first.generation == 3 and checkpoint.load(tmp_path / "b" / "latest.h5").generation == 3
    resumed = train.train(cfg, tmp_path / "b", log=lambda m: None)
    assert resumed.generation == straight.generation == 8
    assert torch.equal(resumed.theta, straight.theta)
    a = checkpoint.load(tmp_path / "a" / "latest.h5")
    b = checkpoint.load(tmp_path / "b" / "latest.h5")
    assert np.array_equal(a.theta, b.theta)
    for key in a.opt_state:
        assert np.array_equal(np.asarray(a.opt_state[key]), np.asarray(b.opt_state[key])), key
    for key in ("loss/mean", "generation"):
        assert np.array_equal(a.metrics[key], b.metrics[key]), key


@pytest.mark.parametrize("optimizer", ["pgpe", "rgs", "grad"])
def test_each_optimizer_reduces_the_loss(tmp_path, optimizer):
    extra = {"optimizer.name": optimizer, "train.epochs": 4, "bound.method": "ibp", "bound.eps": 0.01}
    if optimizer == "pgpe":
        extra.update(
            {
                "optimizer.popsize": 32,
                "optimizer.block_size": 8,
                "optimizer.lr": 0.05,
                "optimizer.sigma_init": 0.01,
                "train.epochs": 6,
            }
        )
    elif optimizer == "rgs":
        extra.update(
            {"optimizer.num_samples": 4, "optimizer.block_size": 2, "optimizer.lr": 0.01, "optimizer.sigma_init": 0.01}
        )
    else:
        extra.update({"optimizer.block_size": 8, "optimizer.lr": 0.01})
    train.train(_cfg(**extra), tmp_path, log=lambda m: None)
    hist = checkpoint.load(tmp_path / "latest.h5").metrics["loss/mean"]
    assert np.isfinite(hist).all()
    assert hist[-4:].mean() < 0.9 * hist[:4].mean(), hist


def test_bad_batch_size_is_a_user_error(tmp_path):
    with pytest.raises(ValueError, match="larger than the training set"):
        train.train(_cfg(**{"train.batch_size": 1000}), tmp_path, log=lambda m: None)


def test_checkpoint_from_other_architecture_is_refused(tmp_path):
    train.train(_cfg(), tmp_path, max_generations=2, log=lambda m: None)
    with pytest.raises(ValueError, match="architecture"):
        train.train(_cfg(**{"model.name": "mlp-tiny"}), tmp_path, log=lambda m: None)


def test_warm_start_from_checkpoint(tmp_path):
    """model.init_from starts a new run (fresh optimizer state) at another run's theta."""
    pre = train.train(
        _cfg(**{"optimizer.name": "grad", "optimizer.block_size": 8}),
        tmp_path / "pre",
        max_generations=3,
        log=lambda m: None,
    )
    logs = []
    res = train.train(
        _cfg(**{"model.init_from": str(tmp_path / "pre" / "latest.h5"), "train.seed": 1}),
        tmp_path / "warm",
        max_generations=1,
        log=logs.append,
    )
    assert any("warm start" in m for m in logs)
    first = checkpoint.load(tmp_path / "warm" / "latest.h5")
    assert first.generation == 1
    # one Adam step (|step| <~ lr = 0.01 per coordinate) away from the warm-start point, although
    # seed 1 would initialise elsewhere
    assert float((res.theta - pre.theta).abs().max()) < 0.02


def _nan_loss(members):
    """A certified_loss stand-in whose losses are NaN for the given member indices (None: all)."""
    real = train.losses.certified_loss

    def loss(*args, params=None, **kwargs):
        out = real(*args, params=params, **kwargs)
        bad = torch.zeros_like(out, dtype=torch.bool)
        bad[slice(None) if members is None else members] = True
        return torch.where(bad, torch.full_like(out, float("nan")), out)

    return loss


def test_some_nan_members_warn_and_training_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(train.losses, "certified_loss", _nan_loss([0]))  # member 0 of every block
    lines = []
    res = train.train(_cfg(**{"train.epochs": 0.5}), tmp_path, log=lines.append)
    assert res.generation == 4
    assert any("losses non-finite (those members got zero weight)" in m for m in lines), lines
    ck = checkpoint.load(tmp_path / "latest.h5")
    assert (ck.metrics["pgpe/num_nonfinite"] > 0).all() and (ck.metrics["pgpe/skipped"] == 0).all()


def test_all_nan_generations_skip_then_stop_with_a_clear_error(tmp_path, monkeypatch):
    cfg = _cfg(**{"train.epochs": 4, "train.max_skipped_steps": 3, "train.checkpoint_every": 1})
    train.train(cfg, tmp_path, max_generations=2, log=lambda m: None)
    good = checkpoint.load(tmp_path / "latest.h5")
    monkeypatch.setattr(train.losses, "certified_loss", _nan_loss(None))
    lines = []
    with pytest.raises(train.TrainingDiverged, match="3 generations in a row had no finite loss"):
        train.train(cfg, tmp_path, log=lines.append)
    assert sum("the step was skipped" in m for m in lines) == 3, lines
    last = checkpoint.load(tmp_path / "latest.h5")  # skipped steps leave the state as it was
    assert np.array_equal(last.theta, good.theta) and np.array_equal(last.sigma, good.sigma)


def test_resume_with_a_changed_config_says_what_changed(tmp_path):
    train.train(_cfg(**{"train.epochs": 1}), tmp_path, max_generations=2, log=lambda m: None)
    lines = []
    train.train(_cfg(**{"train.epochs": 2, "train.threads": 2}), tmp_path, max_generations=3, log=lines.append)
    assert not any("config differs" in m for m in lines), lines  # longer run, other thread count: same maths
    lines = []
    train.train(_cfg(**{"train.epochs": 2, "optimizer.lr": 0.5}), tmp_path, max_generations=4, log=lines.append)
    warning = [m for m in lines if "config differs" in m]
    assert len(warning) == 1 and "optimizer.lr" in warning[0] and "-> 0.5" in warning[0], lines


def test_changed_keys_flattens_sections():
    old = {"optimizer": {"lr": 0.1, "name": "pgpe"}, "bound": {"options": {"a": 1}}, "eval": {"num_test": 5}}
    new = {"optimizer": {"lr": 0.2, "name": "pgpe"}, "bound": {"options": {"a": 2}}, "eval": {"num_test": 9}}
    assert config.changed_keys(old, new) == {"bound.options": ({"a": 1}, {"a": 2}), "optimizer.lr": (0.1, 0.2)}


def test_a_key_newer_than_the_stored_config_is_no_change_at_its_default():
    """A checkpoint written before a key existed resumes silently when the key keeps its default (the
    older version's behaviour), and the key is reported when it is set to something else."""
    stored = config.to_dict(config.from_dict({"optimizer": {"name": "grad"}}))
    del stored["data"]["val_size"], stored["data"]["val_seed"]
    same = config.to_dict(config.from_dict({"optimizer": {"name": "grad"}}))
    assert config.changed_keys(stored, same) == {}
    other = config.to_dict(config.from_dict({"optimizer": {"name": "grad"}, "data": {"val_size": 50}}))
    assert config.changed_keys(stored, other) == {"data.val_size": (None, 50)}
