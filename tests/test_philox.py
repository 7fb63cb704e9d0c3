"""The device noise scheme (mpigls.numerics.philox, ``optimizer.noise: device``): Philox-4x32-10 against the
Random123 known answers, the normal quantile against scipy, the distribution of the numbers, and the
same bits for any chunking, member order and block; then PGPE and RGS with the scheme: one process
equals 1, 2 and 3 ranks bit for bit, resume is bitwise, the checkpoint records the scheme and a
resume under the other scheme is refused with the key to set. (CPU vs CUDA bits: tests/gpu.)"""

import math

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

from mpigls import config, parallel
from mpigls.numerics import noise, philox
from mpigls.optim import pgpe, rgs
from mpigls.run import checkpoint, train

from conftest import tiny_overrides

# Random123 kat_vectors, philox4x32_10 (counter, key, output); randomgen's Philox(number=4, width=32)
# gives the same words.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox4x32_10_known_answers(counter, key, expected):
    out = philox.philox4x32([torch.tensor([c], dtype=torch.int64) for c in counter], key)
    assert tuple(int(w) for w in out) == expected


def test_philox_words_stay_32_bit_and_broadcast():
    c = torch.arange(1000, dtype=torch.int64)
    out = philox.philox4x32((c, c[:1] * 0 + 5, c[:1] * 0 + 7, torch.zeros(1, dtype=torch.int64)), (3, 0xFFFFFFFF))
    for w in out:
        assert w.shape == (1000,) and int(w.min()) >= 0 and int(w.max()) <= 0xFFFFFFFF


def test_normal_quantile_matches_scipy_over_the_whole_32_bit_range():
    w = torch.cat(
        [
            torch.arange(0, 1 << 16, dtype=torch.int64),
            torch.randint(0, 1 << 32, (1 << 18,), dtype=torch.int64, generator=torch.Generator().manual_seed(0)),
            torch.arange((1 << 32) - (1 << 16), 1 << 32, dtype=torch.int64),
        ]
    )
    u = (w.to(torch.float64) + 0.5) * 2.0**-32
    z = philox.normal_quantile(u)
    ref = torch.from_numpy(scipy.special.ndtri(u.numpy()))
    assert ((z - ref).abs() <= 4e-15 * ref.abs().clamp_min(1.0)).all()
    assert torch.equal(z.neg(), philox.normal_quantile(1.0 - u))  # symmetric bit for bit
    assert float(z.abs().max()) == pytest.approx(-scipy.special.ndtri(2.0**-33), rel=1e-14)  # the largest |z|


def test_own_log_is_accurate():
    x = torch.cat([torch.logspace(-10.0, math.log10(0.5), 10001, dtype=torch.float64), torch.tensor([2.0**-33, 0.5])])
    assert ((philox._log(x) - torch.log(x)).abs() <= 4e-15 * torch.log(x).abs()).all()


def test_gaussian_is_standard_normal():
    z = philox.gaussian(0, 0, 0, range(16), 65536).double().flatten().numpy()  # 1M numbers
    assert abs(z.mean()) < 4 / math.sqrt(z.size) and abs(z.var() - 1.0) < 4 * math.sqrt(2 / z.size)
    assert abs(scipy.stats.skew(z)) < 0.01 and abs(scipy.stats.kurtosis(z)) < 0.02
    assert scipy.stats.kstest(z, "norm").pvalue > 1e-3
    # members, generations and streams are uncorrelated
    a = philox.gaussian(0, 0, 0, [0, 1], 200_000).double()
    b = philox.gaussian(0, 0, 1, [0], 200_000).double()[0]
    c = philox.gaussian(0, 1, 0, [0], 200_000).double()[0]
    d = philox.gaussian(1, 0, 0, [0], 200_000).double()[0]
    for other in (a[1], b, c, d):
        assert abs(float(torch.corrcoef(torch.stack([a[0], other]))[0, 1])) < 0.015


def test_gaussian_bits_do_not_depend_on_chunking_block_or_position():
    whole = philox.gaussian(5, 0, 9, [3, 0, 7], 1003)
    for chunk in (1, 3, 64, 10_000):
        assert torch.equal(philox.gaussian(5, 0, 9, [3, 0, 7], 1003, chunk=chunk), whole)
    assert torch.equal(philox.gaussian(5, 0, 9, [7], 1003)[0], whole[2])  # a row depends on its member only
    assert torch.equal(philox.gaussian(5, 0, 9, [0], 998)[0], whole[1, :998])  # a prefix for a shorter D
    assert philox.gaussian(5, 0, 9, [], 10).shape == (0, 10) and philox.gaussian(5, 0, 9, [1], 0).shape == (1, 0)


def test_gaussian_pinned_values():
    """The scheme's numbers are part of every checkpoint's trajectory: a change must be deliberate
    (a new philox.SCHEME, so that older runs are refused instead of silently continued)."""
    got = philox.gaussian(0, 0, 0, [0], 6)[0].tolist()
    u = (torch.tensor([0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8], dtype=torch.float64) + 0.5) * 2.0**-32
    expected = scipy.special.ndtri(u.numpy()).astype(np.float32).tolist()  # counter (0, 0, 0, 0), key 0
    assert got[:4] == expected
    assert philox.SCHEME == "philox4x32-10-as241-v1"


def test_noise_block_dispatches_and_checks():
    assert torch.equal(
        noise.noise_block(2, 3, [4, 1], 50, noise.STREAM_RGS, "device"), philox.gaussian(2, 1, 3, [4, 1], 50)
    )
    assert torch.equal(noise.noise_block(2, 3, [4, 1], 50, scheme="host"), noise.noise_block(2, 3, [4, 1], 50))
    assert not torch.equal(noise.noise_block(2, 3, [4], 50, scheme="device"), noise.noise_block(2, 3, [4], 50))
    assert noise.scheme_id("host") == noise.NOISE_SCHEME and noise.scheme_id("device") == philox.SCHEME
    with pytest.raises(ValueError, match="optimizer.noise must be one of host, device"):
        noise.noise_block(0, 0, [0], 3, scheme="gpu")
    with pytest.raises(ValueError, match="non-negative"):
        noise.noise_block(0, 0, [-1], 3, scheme="device")
    with pytest.raises(ValueError, match=r"generation must be an integer in \[0, 2\^32\)"):
        philox.gaussian(0, 0, 1 << 32, [0], 3)
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\^64\)"):
        philox.gaussian(1 << 64, 0, 0, [0], 3)
    with pytest.raises(ValueError, match="optimizer.noise"):
        pgpe.PGPEParams(noise="cuda")
    with pytest.raises(ValueError, match="optimizer.noise"):
        rgs.RGSParams(noise="")


# ----------------------------------------------------------------------------- optimizers


def test_pgpe_distributed_update_with_device_noise_equals_serial_for_1_to_3_ranks():
    from test_pgpe_unit import assert_same, distributed_step, serial_step, setup

    for fixed_sigma in (False, True):
        params, state = setup(fixed_sigma=fixed_sigma, noise="device")
        ref, ref_metrics = serial_step(params, state, 7)
        host, _ = serial_step(setup(fixed_sigma=fixed_sigma)[0], state, 7)
        assert not torch.equal(ref.center, host.center)  # other numbers than the host scheme
        for world in (1, 2, 3):
            for keep in (0, 1 << 30):
                for new, metrics in parallel.run_threaded(
                    lambda comm, k=keep, p=params, s=state: distributed_step(comm, p, s, 7, 3, keep_bytes=k), world
                ):
                    assert_same(new, ref)
                    assert metrics == ref_metrics


def _cfg(**extra):
    return config.load_config(None, overrides=tiny_overrides(**{"optimizer.noise": "device", **extra}))


def _quiet(monkeypatch):
    # signal handlers: main thread only (the seeded model build needs no lock: models.private_rng)
    monkeypatch.setattr(parallel.StopSignal, "install", lambda self: self)


@pytest.mark.parametrize(
    "extra",
    [{}, {"optimizer.fixed_sigma": False, "optimizer.sigma_lr": 0.1}, {"optimizer.batch_chunks": 2}],
    ids=["fixed-sigma", "adaptive-sigma", "2-chunks"],
)
def test_pgpe_train_with_device_noise_same_bits_on_1_2_3_ranks_and_resumes(tmp_path, monkeypatch, extra):
    _quiet(monkeypatch)
    cfg = _cfg(**{"train.epochs": 0.5, **extra})  # 4 generations, 5 pairs in blocks of 2
    one = train.train(cfg, tmp_path / "w1", log=lambda m: None)
    assert one.generation == 4
    for world in (2, 3):
        for r in parallel.run_threaded(
            lambda comm, w=world: train.train(cfg, tmp_path / f"w{w}", comm, log=lambda m: None), world
        ):
            assert torch.equal(r.theta, one.theta)
    train.train(cfg, tmp_path / "r", max_generations=1, log=lambda m: None)
    resumed = train.train(cfg, tmp_path / "r", log=lambda m: None)
    assert torch.equal(resumed.theta, one.theta)
    ckpt = checkpoint.load(tmp_path / "r" / checkpoint.LATEST)
    assert ckpt.noise_scheme == philox.SCHEME and ckpt.config["optimizer"]["noise"] == "device"
    host = train.train(
        config.load_config(None, overrides=tiny_overrides(**{"train.epochs": 0.5, **extra})),
        tmp_path / "h",
        log=lambda m: None,
    )
    assert not torch.equal(host.theta, one.theta)


def test_resume_under_the_other_noise_scheme_is_refused_with_the_key_to_set(tmp_path):
    train.train(_cfg(**{"train.epochs": 0.5}), tmp_path / "d", max_generations=1, log=lambda m: None)
    host_cfg = config.load_config(None, overrides=tiny_overrides(**{"train.epochs": 0.5}))
    with pytest.raises(ValueError, match="set optimizer.noise=device to resume it"):
        train.train(host_cfg, tmp_path / "d", log=lambda m: None)
    train.train(host_cfg, tmp_path / "h", max_generations=1, log=lambda m: None)
    with pytest.raises(ValueError, match="set optimizer.noise=host to resume it"):
        train.train(_cfg(**{"train.epochs": 0.5}), tmp_path / "h", log=lambda m: None)


def test_rgs_with_device_noise_same_bits_on_1_and_2_ranks(tmp_path, monkeypatch):
    _quiet(monkeypatch)
    over = {"optimizer.name": "rgs", "optimizer.num_samples": 4, "optimizer.block_size": 1, "train.epochs": 0.25}
    cfg = config.load_config(None, overrides=tiny_overrides(**{**over, "optimizer.noise": "device"}))
    one = train.train(cfg, tmp_path / "w1", log=lambda m: None)
    for r in parallel.run_threaded(lambda comm: train.train(cfg, tmp_path / "w2", comm, log=lambda m: None), 2):
        assert torch.equal(r.theta, one.theta)
    host = train.train(config.load_config(None, overrides=tiny_overrides(**over)), tmp_path / "h", log=lambda m: None)
    assert not torch.equal(host.theta, one.theta)
    assert checkpoint.load(tmp_path / "w1" / checkpoint.LATEST).noise_scheme == philox.SCHEME
