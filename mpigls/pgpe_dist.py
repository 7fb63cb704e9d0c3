"""One distributed PGPE generation: each rank evaluates and sums only its own pairs.

The pairs of a generation are cut into blocks that do not depend on the number of ranks; rank r
owns a contiguous run of blocks (``dist.my_blocks``). Per generation each rank

1. draws the noise z_j of its pairs (``NoiseSource``: counter-based, optionally prepared one block
   ahead on a background thread while the bounds of the current block run), evaluates the
   population rows [theta + sigma z_j, theta - sigma z_j] and keeps z_j (up to a memory budget);
2. all-gathers the P scalar losses (the shaping weights need all of them) and agrees on
   max |z| (one scalar allreduce, for the shared fixed-point exponent);
3. sums w_j z_j and v_j (z_j^2 - 1) over its own pairs in fixed point (``pgpe.partial_sums``)
   and adds the int64 vectors of all ranks with ONE ``allreduce_sum_int`` of 2 D integers (D with
   fixed sigma). Integer addition is exact, so every rank gets the same bits whatever the number
   of ranks, and ``pgpe.tell(..., summed=...)`` applies the same update everywhere.

Per-rank cost: O(P D / N) noise and sums plus O(D) communication, instead of regenerating the
whole population's noise on every rank (O(P D)). The result is bitwise the serial ``pgpe.tell``.

Shapes: P population, n = P/2 pairs, M pairs in a block, D parameters.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .optim import pgpe

__all__ = ["KEEP_NOISE_BYTES", "LocalNoise", "NoiseSource", "prefetch_default", "reduce_sums", "evaluate"]

# Keep the evaluated noise for the update when it fits in this many bytes per rank, else
# regenerate it (same bits, one more noise pass). Env MPIGLS_KEEP_NOISE_BYTES overrides.
KEEP_NOISE_BYTES = int(os.environ.get("MPIGLS_KEEP_NOISE_BYTES", 4 << 30))


def prefetch_default(device: torch.device) -> bool:
    """Prepare noise on a background thread? Env MPIGLS_NOISE_PREFETCH=0/1 decides, else on for GPUs
    (the host is idle while the device computes bounds) and off on CPU (it would compete with the
    bounds for the rank's cores; measured in tools/bench_pgpe_update.py)."""
    env = os.environ.get("MPIGLS_NOISE_PREFETCH")
    if env is not None and env != "":
        return env not in ("0", "false", "no")
    return torch.device(device).type != "cpu"


class NoiseSource:
    """Counter-based PGPE noise for (generation, pairs), optionally one request ahead.

    ``get(gen, pairs, D)`` returns the block's noise (float32 CPU); with ``prefetch``,
    ``hint(gen, pairs, D)`` starts generating a block expected next on a worker thread (numpy
    releases the GIL while it fills the array). A wrong hint costs time, never bits.
    """

    def __init__(self, seed: int, prefetch: bool = False) -> None:
        self.seed = seed
        self.prefetch = prefetch
        self._pool = ThreadPoolExecutor(max_workers=1) if prefetch else None
        self._pending: dict[tuple, Future] = {}

    def _make(self, gen: int, pairs: tuple[int, ...], num_params: int) -> torch.Tensor:
        return pgpe.pair_noise(self.seed, gen, pairs, num_params)

    def hint(self, gen: int, pairs: Sequence[int], num_params: int) -> None:
        key = (gen, tuple(int(j) for j in pairs), num_params)
        if self._pool is not None and key not in self._pending and key[1]:
            self._pending[key] = self._pool.submit(self._make, *key)

    def get(self, gen: int, pairs: Sequence[int], num_params: int) -> torch.Tensor:
        key = (gen, tuple(int(j) for j in pairs), num_params)
        fut = self._pending.pop(key, None)
        for stale in [k for k in self._pending if k[0] < gen]:
            self._pending.pop(stale).cancel()
        return fut.result() if fut is not None else self._make(*key)

    def close(self) -> None:
        if self._pool is not None:
            for fut in self._pending.values():
                fut.cancel()
            self._pending.clear()
            self._pool.shutdown(wait=True)
            self._pool = None


@dataclass
class LocalNoise:
    """What a rank keeps from evaluation for its update: its pairs per block, their noise (None when
    over the memory budget: regenerated) and max |z| over all of its pairs."""

    pairs: list[list[int]]
    z: list[torch.Tensor | None]
    max_abs: float


def block_pairs(block: int, block_size: int, num_pairs: int) -> list[int]:
    return list(range(block * block_size, min((block + 1) * block_size, num_pairs)))


def evaluate(state: pgpe.PGPEState, params: pgpe.PGPEParams, blocks: Sequence[int], block_size: int,
             source: NoiseSource, loss_fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
             keep_bytes: int = KEEP_NOISE_BYTES) -> tuple[torch.Tensor, LocalNoise]:
    """Losses of this rank's members in global order (float64 CPU, 2 per pair) and its LocalNoise.

    ``loss_fn(points (2M, D) on device) -> (2M,)``. The first block of the next generation is
    hinted to the noise source after the last block, so it is prepared during the exchange.
    ``blocks`` is iterated once (a StoppableBlocks ends early on a stop signal: then the result
    covers the blocks done, and the caller drops the generation after agreeing on the stop).
    """
    num_pairs, D, gen = params.popsize // 2, state.center.numel(), state.generation
    # len() and indexing only: iterating ``blocks`` (a stopping.StoppableBlocks in train) may end
    # early on a stop signal, so it is iterated exactly once, below
    pairs_at = [block_pairs(blocks[i], block_size, num_pairs) for i in range(len(blocks))]
    keep = sum(map(len, pairs_at)) * D * 4 <= keep_bytes
    # centre and sigma go to the device once; the population rows are formed there (only z travels)
    on_device = dataclasses.replace(state, center=state.center.to(device), sigma=state.sigma.to(device))
    out, kept, done, max_abs = [], [], [], 0.0
    for i, _block in enumerate(blocks):
        pairs = pairs_at[i]
        z = source.get(gen, pairs, D)
        if i + 1 < len(pairs_at):
            source.hint(gen, pairs_at[i + 1], D)
        else:
            source.hint(gen + 1, pairs_at[0], D)
        max_abs = max(max_abs, pgpe.max_abs_noise(z))
        z = z.to(device, non_blocking=True)
        with torch.no_grad():
            r = loss_fn(pgpe.population(on_device, z))
        out.append(r.detach().to("cpu", torch.float64))
        kept.append(z if keep else None)
        done.append(pairs)
    losses = torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
    return losses, LocalNoise(done, kept, max_abs)


def reduce_sums(comm, state: pgpe.PGPEState, params: pgpe.PGPEParams, seed: int, all_losses: torch.Tensor,
                local: LocalNoise) -> tuple[torch.Tensor, tuple[int, int]] | None:
    """The exact fixed-point totals over all ranks' pairs for ``pgpe.tell(..., summed=...)``.

    Collective: every rank must call it with the same ``all_losses``. None when no pair is valid
    (every rank sees the same losses, so every rank skips the collectives alike).
    """
    w = pgpe.weights(params, all_losses)
    if w.num_valid == 0:
        return None
    with_sigma = not params.fixed_sigma
    exps = pgpe.exponents(w, comm.allreduce_max(local.max_abs))
    D = state.center.numel()
    device = next((z.device for z in local.z if z is not None), state.center.device)
    acc = torch.zeros((2, D), dtype=torch.int64, device=device)
    for pairs, z in zip(local.pairs, local.z):
        if not pairs:
            continue
        if z is None:
            z = pgpe.pair_noise(seed, state.generation, pairs, D).to(device)
        acc += pgpe.partial_sums(w, pairs, z, exps, with_sigma)
    rows = 2 if with_sigma else 1
    total = comm.allreduce_sum_int(acc[:rows].to("cpu").reshape(-1)).reshape(rows, D)
    if not with_sigma:
        total = torch.cat([total, torch.zeros((1, D), dtype=torch.int64)])
    return total, exps
