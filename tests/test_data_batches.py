"""Shared-seed minibatch order and deterministic augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from mpigls import data

SETTINGS = settings(max_examples=25, deadline=None)


@SETTINGS
@given(
    seed=st.integers(0, 2**31),
    epoch=st.integers(0, 1000),
    num_examples=st.integers(1, 300),
    batch_size=st.integers(1, 300),
)
def test_batch_indices_is_a_deterministic_partial_permutation(seed, epoch, num_examples, batch_size):
    if batch_size > num_examples:
        with pytest.raises(ValueError, match="batch_size"):
            data.batch_indices(seed, epoch, num_examples, batch_size)
        return
    idx = data.batch_indices(seed, epoch, num_examples, batch_size)
    assert idx.dtype == np.int64 and idx.shape == (num_examples // batch_size, batch_size)
    flat = idx.ravel()
    assert len(np.unique(flat)) == len(flat) and flat.min() >= 0 and flat.max() < num_examples
    np.testing.assert_array_equal(idx, data.batch_indices(seed, epoch, num_examples, batch_size))


def test_batch_indices_differ_per_epoch_and_seed():
    base = data.batch_indices(0, 0, 100, 10)
    assert not np.array_equal(base, data.batch_indices(0, 1, 100, 10))
    assert not np.array_equal(base, data.batch_indices(1, 0, 100, 10))
    assert sorted(base.ravel()) == list(range(100))
    # the order of a smaller batch size is a prefix-reshape of the same permutation
    np.testing.assert_array_equal(data.batch_indices(0, 0, 100, 25).ravel(), base.ravel())


@SETTINGS
@given(
    kind=st.sampled_from(data.AUGMENTATIONS),
    seed=st.integers(0, 2**31),
    epoch=st.integers(0, 50),
    batch=st.integers(0, 50),
    b=st.integers(1, 6),
    c=st.integers(1, 3),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
)
def test_augment_deterministic_and_shape_preserving(kind, seed, epoch, batch, b, c, h, w):
    x = torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed % 1000))
    out = data.augment(x, seed, epoch, batch, kind)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, data.augment(x, seed, epoch, batch, kind))
    if kind == "none":
        assert out is x
    elif kind == "flip":  # each image is itself or its mirror
        for i in range(b):
            assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))


def _reference_crop_flip(img, off_y, off_x, flip, pad):
    padded = torch.nn.functional.pad(img, (pad,) * 4)
    crop = padded[:, off_y : off_y + img.shape[1], off_x : off_x + img.shape[2]]
    return crop.flip(-1) if flip else crop


def test_cifar_augment_is_a_padded_crop_and_flip():
    x = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = data.augment(x, 7, 2, 5, "cifar")
    seen_offsets, seen_flips = set(), set()
    for i in range(len(x)):
        matches = [
            (oy, ox, f)
            for oy in range(5)
            for ox in range(5)
            for f in (False, True)
            if torch.equal(out[i], _reference_crop_flip(x[i], oy, ox, f, data.CROP_PADDING))
        ]
        assert matches, f"image {i} is not a padded crop (+flip) of the input"
        seen_offsets.add(matches[0][:2])
        seen_flips.add(matches[0][2])
    assert len(seen_offsets) > 5 and seen_flips == {False, True}
    assert not torch.equal(out, data.augment(x, 7, 2, 6, "cifar"))
    assert not torch.equal(out, data.augment(x, 7, 3, 5, "cifar"))


def test_augment_stream_independent_of_batch_order_stream():
    # numpy's SeedSequence zero-pads keys: without the tag, batch 0's augmentation would reuse the
    # batch-order stream of the same epoch
    from mpigls.numerics.noise import STREAM_DATA, numpy_generator

    tagged = numpy_generator(5, STREAM_DATA, 0, 0, 1).random(4)
    assert not np.array_equal(tagged, numpy_generator(5, STREAM_DATA, 0).random(4))


def test_augment_bad_input():
    with pytest.raises(ValueError, match="unknown augmentation 'rotate'.*none, flip, cifar"):
        data.augment(torch.zeros(1, 1, 4, 4), 0, 0, 0, "rotate")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        data.augment(torch.zeros(4, 4), 0, 0, 0, "flip")
