"""The counter-based noise depends only on (seed, stream, generation, member)."""
import numpy as np
import pytest
import torch
from scipy import stats

from mpigls import noise


def test_member_noise_is_a_pure_function_of_its_key():
    a = noise.member_noise(3, 7, 11, 1000)
    assert a.dtype == torch.float32 and a.shape == (1000,)
    assert torch.equal(a, noise.member_noise(3, 7, 11, 1000))
    for other in [(4, 7, 11), (3, 8, 11), (3, 7, 12)]:
        assert not torch.equal(a, noise.member_noise(*other, 1000))
    assert not torch.equal(a, noise.member_noise(3, 7, 11, 1000, stream=noise.STREAM_RGS))


def test_block_rows_equal_single_members_in_any_order():
    block = noise.noise_block(1, 2, [5, 0, 9], 257)
    for row, member in zip(block, [5, 0, 9]):
        assert torch.equal(row, noise.member_noise(1, 2, member, 257))


def test_pinned_values_do_not_drift():
    # Pins the scheme: a change here silently changes every training trajectory (bump NOISE_SCHEME).
    got = noise.member_noise(0, 0, 0, 4).tolist()
    expected = noise.numpy_generator(0, 0, 0, 0).standard_normal(4, dtype=np.float32).tolist()
    assert got == expected
    assert noise.NOISE_SCHEME == "philox4x64-seedseq-v1"


def test_standard_normal_statistics():
    z = noise.noise_block(0, 0, range(20), 5000).flatten().numpy()
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert stats.kstest(z[:20000], "norm").pvalue > 1e-3


def test_bad_keys_rejected():
    with pytest.raises(ValueError):
        noise.member_noise(-1, 0, 0, 3)
    with pytest.raises(TypeError):
        noise.member_noise(0, 1.5, 0, 3)


def test_torch_generator_deterministic():
    a = torch.rand(3, generator=noise.torch_generator(1, 2, 3))
    assert torch.equal(a, torch.rand(3, generator=noise.torch_generator(1, 2, 3)))
    assert not torch.equal(a, torch.rand(3, generator=noise.torch_generator(1, 2, 4)))
