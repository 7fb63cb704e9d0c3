"""The validation split (data.val_size / data.val_seed): carved from the training set only, disjoint
from what training sees and from the test set, fixed by its seed, and used by the live validation."""

import numpy as np
import pytest
import torch

from mpigls import config, data
from mpigls.run import monitor


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x.reshape(len(x), -1)}


def test_indices_partition_the_training_set_and_have_the_right_sizes():
    train, val = data.validation_split(100, 17, seed=3)
    assert len(val) == 17 and len(train) == 83
    assert not set(train) & set(val)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(100))


def test_split_is_fixed_by_its_seed_and_changes_with_it():
    a = data.validation_split(500, 50, seed=0)[1]
    assert np.array_equal(a, data.validation_split(500, 50, seed=0)[1])
    b = data.validation_split(500, 50, seed=1)[1]
    assert not np.array_equal(a, b)
    # two random 50-subsets of 500 share ~5 elements on average: far from equal
    assert len(set(a) & set(b)) < 25


def test_loaded_split_is_disjoint_from_training_and_test():
    full = data.load("synthetic", n=120, seed=5)
    ds = data.load("synthetic", n=120, seed=5, val_size=30, val_seed=7)
    assert ds.val_x is not None and ds.val_y is not None
    assert (len(ds.train_y), len(ds.val_y), len(ds.test_y)) == (90, 30, 120)
    train, val, test = _rows(ds.train_x), _rows(ds.val_x), _rows(ds.test_x)
    assert len(val) == 30  # continuous noise: every image is distinct
    assert not val & train and not val & test
    assert val | train == _rows(full.train_x)  # carved from the training set, nothing lost
    assert torch.equal(ds.test_x, full.test_x)  # the test set is untouched
    _, val_idx = data.validation_split(120, 30, 7)
    assert torch.equal(ds.val_x, full.train_x[val_idx]) and torch.equal(ds.val_y, full.train_y[val_idx])


def test_num_train_counts_what_is_left_and_keeps_the_split():
    a = data.load("synthetic", n=120, seed=5, val_size=30, val_seed=7)
    b = data.load("synthetic", n=120, seed=5, val_size=30, val_seed=7, num_train=40)
    assert len(b.train_y) == 40 and torch.equal(a.val_x, b.val_x)
    assert torch.equal(b.train_x, a.train_x[:40])


def test_digits_split_and_default_is_off():
    assert data.load("digits").val_x is None
    ds = data.load("digits", val_size=200, val_seed=0)
    assert (len(ds.train_y), len(ds.val_y), len(ds.test_y)) == (1237, 200, 360)


@pytest.mark.parametrize("size", [-1, 120, 500])
def test_impossible_sizes_are_refused(size):
    with pytest.raises(ValueError, match="val_size"):
        data.load("synthetic", n=120, val_size=size)


def test_config_keys_and_validator_use_the_split():
    cfg = config.from_dict({"data": {"name": "synthetic", "val_size": 20, "val_seed": 4}, "eval": {"num_val": 8}})
    assert (cfg.data.val_size, cfg.data.val_seed) == (20, 4)
    with pytest.raises(config.ConfigError, match="data.val_size"):
        config.from_dict({"data": {"val_size": -1}})
    ds = data.load("synthetic", val_size=20, val_seed=4)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    v = monitor.Validator(cfg, ds, model, comm=None)
    assert torch.equal(v.x, ds.val_x[:8]) and torch.equal(v.y, ds.val_y[:8])
    assert not _rows(v.x) & _rows(ds.test_x)
