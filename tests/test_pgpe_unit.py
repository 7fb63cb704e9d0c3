"""Distributed PGPE update (mpigls.parallel.pgpe_unit): each rank sums only its own pairs, one exact integer
allreduce; the result is bitwise the serial pgpe.tell for every world size, block size, noise
budget and prefetch setting, and equals the plain float64 full-population estimate to rounding."""

import dataclasses
import math

import pytest
import torch

from mpigls import parallel
from mpigls.numerics import noise
from mpigls.optim import pgpe, unit
from mpigls.parallel import pgpe_unit

D = 37
A = torch.linspace(0.5, 3.0, D, dtype=torch.float64)


def quadratic(x):
    x = x.to(torch.float64)
    return 0.5 * (A.to(x.device) * x * x).sum(-1) + x[:, 0]


def setup(popsize=24, **kw):
    params = pgpe.PGPEParams(popsize=popsize, lr=0.01, sigma_init=0.1, **kw)
    theta = torch.linspace(-1.0, 1.0, D)
    state = dataclasses.replace(pgpe.init(params, theta), sigma=torch.linspace(0.05, 0.2, D), generation=3)
    return params, state


# a minibatch of B examples: the loss of a member is the MEAN over examples of a per-example term
B = 7
X = torch.linspace(-1.0, 1.0, B * D).reshape(B, D).sin()


def per_example(points, ex):
    """(n, D) points, a slice of the minibatch -> (n,) float32 mean over those examples."""
    d = points[:, None, :].to(torch.float32) - X[ex][None].to(points.device)
    return (0.5 * A.to(torch.float32) * d * d).sum(-1).mean(-1)


def distributed_step(
    comm,
    params,
    state,
    seed,
    block_size,
    keep_bytes=pgpe_unit.KEEP_NOISE_BYTES,
    prefetch=False,
    spoil=None,
    chunks=None,
    out=None,
):
    """One generation over ``comm``; ``chunks`` given: the per_example loss split into that many chunks
    (else the example-free quadratic, one chunk); ``out`` collects the P losses."""
    split = pgpe_unit.split_of(params, block_size, B if chunks else 1, chunks or 1)
    loss_fn = per_example if chunks else lambda points, ex: quadratic(points)
    items = parallel.my_blocks(split.num_items, comm.rank, comm.world_size)
    source = pgpe_unit.NoiseSource(seed, prefetch, params.noise)
    try:
        local, kept = pgpe_unit.evaluate(
            state, params, items, split, source, loss_fn, torch.device("cpu"), keep_bytes=keep_bytes
        )
    finally:
        source.close()
    # the fused path: losses and max |z| over the ranks in one all-gather
    all_losses, agreed, max_abs = pgpe_unit.gather_losses(comm, split, local, max_abs=kept.max_abs)
    assert agreed == unit.Control() and max_abs == comm.allreduce_max(kept.max_abs)
    if out is not None:
        out.append(all_losses)
    if spoil is not None:
        all_losses = spoil(all_losses)
    summed = pgpe_unit.reduce_sums(comm, state, params, seed, all_losses, kept, max_abs)
    return pgpe.tell(state, params, seed, all_losses, summed=summed)


def serial_step(params, state, seed, spoil=None):
    losses = quadratic(pgpe.ask(state, params, seed, range(params.popsize // 2)))
    return pgpe.tell(state, params, seed, spoil(losses) if spoil else losses)


def assert_same(a, b):
    assert torch.equal(a.center, b.center) and torch.equal(a.sigma, b.sigma)
    assert torch.equal(a.step_state.m, b.step_state.m) and torch.equal(a.step_state.v, b.step_state.v)
    assert a.generation == b.generation


@pytest.mark.parametrize("fixed_sigma", [False, True])
@pytest.mark.parametrize("block_size", [1, 5])
def test_bitwise_equal_to_serial_tell_for_1_to_4_ranks(fixed_sigma, block_size):
    params, state = setup(fixed_sigma=fixed_sigma)
    ref, ref_metrics = serial_step(params, state, 7)
    for world in (1, 2, 3, 4):
        results = parallel.run_threaded(lambda comm: distributed_step(comm, params, state, 7, block_size), world)
        for new, metrics in results:
            assert_same(new, ref)
            assert metrics == ref_metrics


@pytest.mark.parametrize("fixed_sigma", [False, True])
def test_chunked_minibatch_same_bits_for_1_to_5_ranks_and_losses_equal_unchunked(fixed_sigma):
    """Work items (pair block, example chunk): for a chunk count the state is bitwise the same for
    any number of ranks (more ranks than pair blocks included); one chunk is bitwise the serial
    tell of the unchunked losses; the chunked losses are the unchunked means to float32 rounding."""
    params, state = setup(popsize=12, fixed_sigma=fixed_sigma)
    full = per_example(pgpe.ask(state, params, 7, range(6)), slice(0, B)).double()
    ref, ref_metrics = pgpe.tell(state, params, 7, full)
    for chunks in (1, 2, 4, 7):
        firsts = []
        for world in (1, 2, 3, 5):
            seen = []
            results = parallel.run_threaded(
                lambda comm, c=chunks, s=seen: distributed_step(comm, params, state, 7, 4, chunks=c, out=s), world
            )
            for (new, metrics), losses in zip(results, seen):
                torch.testing.assert_close(losses, full, rtol=2e-6, atol=0)
                if chunks == 1:
                    assert torch.equal(losses, full)
                    assert_same(new, ref)
                    assert metrics == ref_metrics
                firsts.append((new, losses))
        for new, losses in firsts[1:]:
            assert_same(new, firsts[0][0])
            assert torch.equal(losses, firsts[0][1])


def test_noise_budget_and_prefetch_never_change_the_bits():
    params, state = setup()
    ref, _ = serial_step(params, state, 2)
    for keep_bytes, prefetch in [(0, False), (0, True), (1 << 30, True)]:
        for new, _ in parallel.run_threaded(
            lambda comm, kb=keep_bytes, pf=prefetch: distributed_step(
                comm, params, state, 2, 4, keep_bytes=kb, prefetch=pf
            ),
            3,
        ):
            assert_same(new, ref)
    chunked = [
        parallel.run_threaded(
            lambda comm, kb=kb, pf=pf: distributed_step(
                comm, params, state, 2, 3, keep_bytes=kb, prefetch=pf, chunks=3
            ),
            4,
        )
        for kb, pf in [(0, True), (1 << 30, False)]
    ]
    for new, _ in chunked[0] + chunked[1]:
        assert_same(new, chunked[1][0][0])


def test_nonfinite_and_all_invalid_generations_match_serial():
    params, state = setup(popsize=16)

    def some_bad(r):
        r = r.clone()
        r[3], r[8] = math.nan, math.inf
        return r

    for spoil in (some_bad, lambda r: torch.full_like(r, math.nan)):
        ref, ref_m = serial_step(params, state, 5, spoil)
        for new, m in parallel.run_threaded(
            lambda comm, sp=spoil: distributed_step(comm, params, state, 5, 3, spoil=sp), 2
        ):
            assert_same(new, ref)
            assert (
                m["pgpe/skipped"] == ref_m["pgpe/skipped"]
                and m["pgpe/num_valid_pairs"] == ref_m["pgpe/num_valid_pairs"]
            )


def old_float64_estimate(state, params, seed, losses):
    """The previous implementation: regenerate every pair's noise, accumulate sequentially in float64."""
    w = pgpe.weights(params, losses)
    z = noise.noise_block(seed, state.generation, range(params.popsize // 2), D).to(torch.float64)
    acc_c = torch.zeros(D, dtype=torch.float64)
    acc_s = torch.zeros(D, dtype=torch.float64)
    for j in range(z.shape[0]):
        acc_c += float(w.center[j]) * z[j]
        acc_s += float(w.sigma[j]) * (z[j] * z[j] - 1.0)
    sig = state.sigma.to(torch.float64)
    return acc_c / (w.num_valid * sig), acc_s / (w.num_valid * sig), w, z


@pytest.mark.parametrize("shaping", ["raw", "centered_ranks"])
def test_distributed_estimate_equals_float64_estimate_to_rounding(shaping):
    params, state = setup(popsize=64, fitness_shaping=shaping)
    losses = quadratic(pgpe.ask(state, params, 9, range(32)))
    g_ref, s_ref, w, z = old_float64_estimate(state, params, 9, losses)

    def run(comm):
        blocks = parallel.my_blocks(8, comm.rank, comm.world_size)
        pairs = [j for b in blocks for j in range(4 * b, 4 * b + 4)]
        zl = pgpe.pair_noise(9, state.generation, pairs, D)
        exps = pgpe.exponents(w, comm.allreduce_max(pgpe.max_abs_noise(zl)))
        q = comm.allreduce_sum_int(pgpe.partial_sums(w, pairs, zl, exps).reshape(-1)).reshape(2, D)
        return pgpe.gradients(state, params, 9, losses, summed=(q, exps))

    for g_c, g_s, n in parallel.run_threaded(run, 3):
        assert n == 32
        # error of the fixed-point sum: <= n * 2**(e - 41) on the sums, i.e. 2**(e - 41) / sigma on
        # the gradients (plus the float64 rounding of the reference, far smaller)
        e_c, e_s = pgpe.exponents(w, float(z.abs().max()))
        sig = state.sigma.double()
        assert ((g_c - g_ref).abs() <= 1.01 * 2.0 ** (e_c - 41) / sig).all()
        assert ((g_s - s_ref).abs() <= 1.01 * 2.0 ** (e_s - 41) / sig).all()
        torch.testing.assert_close(g_c, g_ref, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(g_s, s_ref, rtol=1e-8, atol=1e-10)


def test_partial_sums_add_up_over_any_split_and_check_shapes():
    params, state = setup(popsize=20)
    losses = quadratic(pgpe.ask(state, params, 1, range(10)))
    w = pgpe.weights(params, losses)
    z = pgpe.pair_noise(1, state.generation, range(10), D)
    exps = pgpe.exponents(w, pgpe.max_abs_noise(z))
    whole = pgpe.partial_sums(w, range(10), z, exps)
    parts = pgpe.partial_sums(w, [0, 4, 9], z[[0, 4, 9]], exps) + pgpe.partial_sums(
        w, [1, 2, 3, 5, 6, 7, 8], z[[1, 2, 3, 5, 6, 7, 8]], exps, column_chunk=7
    )
    assert torch.equal(whole, parts)
    assert whole.abs().max() <= 10 * 2**pgpe.FRACTION_BITS
    with pytest.raises(ValueError, match="pairs but noise"):
        pgpe.partial_sums(w, [0, 1], z[:1], exps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_partial_sums_same_bits_on_gpu():
    params, state = setup(popsize=32)
    losses = quadratic(pgpe.ask(state, params, 4, range(16)))
    w = pgpe.weights(params, losses)
    z = pgpe.pair_noise(4, state.generation, range(16), D)
    exps = pgpe.exponents(w, pgpe.max_abs_noise(z))
    assert torch.equal(pgpe.partial_sums(w, range(16), z, exps), pgpe.partial_sums(w, range(16), z.cuda(), exps).cpu())


def test_prefetch_default_follows_env_and_device(monkeypatch):
    monkeypatch.delenv("MPIGLS_NOISE_PREFETCH", raising=False)
    assert not pgpe_unit.prefetch_default(torch.device("cpu"))
    assert pgpe_unit.prefetch_default(torch.device("cuda"))
    monkeypatch.setenv("MPIGLS_NOISE_PREFETCH", "1")
    assert pgpe_unit.prefetch_default(torch.device("cpu"))
    monkeypatch.setenv("MPIGLS_NOISE_PREFETCH", "0")
    assert not pgpe_unit.prefetch_default(torch.device("cuda"))


@pytest.mark.parametrize("chunks", [1, 3, 8])
def test_every_pair_is_summed_by_exactly_one_item(chunks):
    params, _ = setup(popsize=26)
    split = pgpe_unit.split_of(params, 5, 8, chunks)
    summed = [j for i in range(split.num_items) for j in pgpe_unit.summed_by(split, i)]
    assert sorted(summed) == list(range(13))
    # the ranks sharing a block share its sums: no item of a 5-pair block sums more than ceil(5 / chunks)
    assert max(len(pgpe_unit.summed_by(split, i)) for i in range(split.num_items)) == -(-5 // chunks)
