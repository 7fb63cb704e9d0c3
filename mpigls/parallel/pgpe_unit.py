"""PGPE as the training loop runs it (its ``UNIT``): one distributed generation in which each rank
evaluates and sums only its own work items; the maths (ask, weights, sums, tell) is ``mpigls.optim.pgpe``.

The work of a generation is cut into items (pair block, example chunk) (``mpigls.parallel.work``) whose
number does not depend on the number of ranks; rank r owns a contiguous run of items
(``parallel.my_blocks`` over the items). Per generation each rank

1. draws the noise z_j of its pair blocks once per block (``NoiseSource``: counter-based,
   optionally prepared one block ahead on a background thread while the bounds of the current
   block run), evaluates the population rows [theta + sigma z_j, theta - sigma z_j] on each of its
   example chunks, and keeps z_j of the pairs it sums (pair j of a block: the owner of chunk
   j % chunks, so the ranks sharing a block share its sums; up to a memory budget);
2. all-gathers the item results (per-member chunk means) and recombines the P losses in a fixed
   order on every rank (``gather_losses``; one chunk: the losses as evaluated); max |z| (for the
   shared fixed-point exponent) and the loop's stop flags ride in the same all-gather;
3. sums w_j z_j and v_j (z_j^2 - 1) over the pairs it keeps in fixed point (``pgpe.partial_sums``;
   each pair exactly once) and adds the int64 vectors of all
   ranks with ONE ``allreduce_sum_int`` of 2 D integers (D with fixed sigma). With a control variate
   g (``optimizer.control_variate``; every rank holds the same g) the evaluator of a pair also forms
   c_j = eps_j . g exactly from the noise it has (``pgpe.cv_products``), max |c_j| rides in the
   all-gather with max |z|, and the sums use the weights w_j - c_j. Integer addition is
   exact, so every rank gets the same bits whatever the number of ranks, and
   ``pgpe.tell(..., summed=...)`` applies the same update everywhere.

Per-rank cost: O(P D / N) noise and sums plus O(D) communication, instead of regenerating the
whole population's noise on every rank (O(P D)). The result is bitwise the serial ``pgpe.tell``
on the same losses; with optimizer.batch_chunks = 1 those are exactly the unchunked losses.

Shapes: P population, n = P/2 pairs, M pairs in a block, D parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from mpigls.optim import pgpe, unit
from mpigls.parallel import work

__all__ = [
    "KEEP_NOISE_BYTES",
    "LocalNoise",
    "NoiseSource",
    "prefetch_default",
    "split_of",
    "summed_by",
    "evaluate",
    "gather_losses",
    "reduce_sums",
]

# Keep the evaluated noise for the update when it fits in this many bytes per rank, else
# regenerate it (same bits, one more noise pass). Env MPIGLS_KEEP_NOISE_BYTES overrides.
KEEP_NOISE_BYTES = int(os.environ.get("MPIGLS_KEEP_NOISE_BYTES", 4 << 30))


def prefetch_default(device: torch.device) -> bool:
    """Prepare noise on a background thread? Env MPIGLS_NOISE_PREFETCH=0/1 decides, else on for GPUs
    (the host is idle while the device computes bounds) and off on CPU (it would compete with the
    bounds for the rank's cores; measured in benchmarks/bench_pgpe_update.py)."""
    env = os.environ.get("MPIGLS_NOISE_PREFETCH")
    if env is not None and env != "":
        return env not in ("0", "false", "no")
    return torch.device(device).type != "cpu"


class NoiseSource:
    """Counter-based PGPE noise for (generation, pairs), optionally one request ahead.

    ``get(gen, pairs, D)`` returns the block's noise (float32): with the host scheme drawn on the CPU
    (the caller moves it), with the device scheme generated on ``device``. With ``prefetch`` (host
    scheme only: device noise is queued on the device like the bounds), ``hint(gen, pairs, D)``
    starts generating a block expected next on a worker thread (numpy releases the GIL while it
    fills the array). A wrong hint costs time, never bits.
    """

    def __init__(
        self, seed: int, prefetch: bool = False, scheme: str = "host", device: torch.device | str = "cpu"
    ) -> None:
        self.seed = seed
        self.scheme = scheme
        self.device = torch.device(device) if scheme == "device" else None
        self.prefetch = prefetch and scheme == "host"
        self._pool = ThreadPoolExecutor(max_workers=1) if self.prefetch else None
        self._pending: dict[tuple, Future] = {}

    def _make(self, gen: int, pairs: tuple[int, ...], num_params: int) -> torch.Tensor:
        return pgpe.pair_noise(self.seed, gen, pairs, num_params, self.scheme, self.device)

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
    c: list[torch.Tensor] | None = None  # per entry of ``pairs``: eps_j . g (float64), with a control variate
    max_abs_c: float = 0.0
    g: torch.Tensor | None = None  # the generation's control variate (D,) float64, identical on every rank


def split_of(params: pgpe.PGPEParams, block_size: int, batch_size: int = 1, chunks: int = 1) -> work.WorkSplit:
    """The work items of a PGPE generation: (pair block, example chunk), two losses per pair."""
    return work.WorkSplit(params.popsize // 2, block_size, batch_size, chunks, per_member=2)


def summed_by(split: work.WorkSplit, item: int) -> list[int]:
    """The pairs whose fixed-point sums the evaluator of ``item`` contributes: those of its block with
    j % chunks == its chunk (all of them with one chunk)."""
    block, chunk = split.item(item)
    return [j for j in split.members(block) if j % split.chunks == chunk]


def evaluate(
    state: pgpe.PGPEState,
    params: pgpe.PGPEParams,
    items: Sequence[int],
    split: work.WorkSplit,
    source: NoiseSource,
    loss_fn: Callable[[torch.Tensor, slice], torch.Tensor],
    device: torch.device,
    keep_bytes: int = KEEP_NOISE_BYTES,
    g: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LocalNoise]:
    """This rank's item results in item order (float64 CPU: per pair block and chunk, 2 per pair) and
    its LocalNoise. ``gather_losses`` turns every rank's results into the P losses.

    ``loss_fn(points (2M, D) on device, examples: slice of the minibatch) -> (2M,)`` mean loss of
    each row over those examples. A pair block's noise is drawn once for the consecutive items of
    the block; item (block, c) keeps the noise of the pairs it sums (``summed_by``: each pair
    exactly once over all items). The next block of this rank (or, after the last, its first block of the
    next generation) is hinted to the noise source, so it is prepared during the bounds/exchange.
    ``items`` is iterated once (a StoppableBlocks ends early on a stop signal: then the result
    covers the items done, and the caller drops the generation after agreeing on the stop).
    ``g``: the control variate (D,) float64 (the same on every rank) or None; with it the products
    eps_j . g of the pairs this rank sums are formed from the block's noise (``LocalNoise.c``).
    """
    D, gen = state.center.numel(), state.generation
    # len() and indexing only: iterating ``items`` (a stopping.StoppableBlocks in train) may end
    # early on a stop signal, so it is iterated exactly once, below
    unit_of = [split.item(items[i])[0] for i in range(len(items))]
    units = list(dict.fromkeys(unit_of))  # this rank's blocks, in order
    # pair j of a block is summed by the rank that evaluates the block's chunk j % chunks (each pair
    # once; the C ranks sharing a block share its sums)
    summed_pairs = sum(len(summed_by(split, items[i])) for i in range(len(items)))
    keep = summed_pairs * D * 4 <= keep_bytes
    # centre and sigma go to the device once; the population rows are formed there (only z travels)
    on_device = dataclasses.replace(state, center=state.center.to(device), sigma=state.sigma.to(device))
    out: list[torch.Tensor] = []
    kept: list[torch.Tensor | None] = []
    done: list[list[int]] = []
    max_abs, unit = 0.0, -1
    h = None if g is None else pgpe.cv_scaled(on_device, g.to(device))
    cs: list[torch.Tensor] = []
    z = points = torch.zeros(0)
    for item in items:
        block, chunk = split.item(item)
        pairs = split.members(block)
        if block != unit:
            unit = block
            z = source.get(gen, pairs, D)
            nxt = units.index(block) + 1
            if nxt < len(units):
                source.hint(gen, split.members(units[nxt]), D)
            else:
                source.hint(gen + 1, split.members(units[0]), D)
            max_abs = max(max_abs, pgpe.max_abs_noise(z))
            z = z.to(device, non_blocking=True)  # kept on the device: the sums run where the state is
            with torch.no_grad():
                points = pgpe.population(on_device, z)
        mine = summed_by(split, item)
        if mine:
            rows = z if len(mine) == len(pairs) else z[[j - pairs[0] for j in mine]]
            kept.append(rows if keep else None)
            if h is not None:
                cs.append(pgpe.cv_products(rows, h))
            done.append(mine)
        with torch.no_grad():
            r = loss_fn(points, split.examples(chunk))
        out.append(r.detach().to("cpu", torch.float64))
    losses = torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
    if h is None:
        return losses, LocalNoise(done, kept, max_abs)
    max_c = max((float(c.abs().max()) for c in cs if c.numel()), default=0.0)
    return losses, LocalNoise(done, kept, max_abs, cs, max_c, g)


def gather_losses(
    comm,
    split: work.WorkSplit,
    local: torch.Tensor,
    control: unit.Control | None = None,
    max_abs: float = 0.0,
    max_abs_c: float | None = None,
) -> tuple:
    """(All P losses (P,) float64, the agreed loop ``control``, max |z| over all ranks) on every rank:
    ONE all-gather of the item results with the flags and this rank's max |z| riding along
    (``unit.gather_losses``); the chunks are recombined in a fixed order (``work.WorkSplit.combine``).
    With ``max_abs_c`` (a control variate's max |eps_j . g|) its maximum over the ranks rides along
    too and is returned fourth. Collective."""
    extra = [max_abs] if max_abs_c is None else [max_abs, max_abs_c]
    body, agreed, tops = unit.gather_losses(comm, local, control or unit.Control(), extra)
    if max_abs_c is None:
        return split.combine(body), agreed, tops[0]
    return split.combine(body), agreed, tops[0], tops[1]


def reduce_sums(
    comm,
    state: pgpe.PGPEState,
    params: pgpe.PGPEParams,
    seed: int,
    all_losses: torch.Tensor,
    local: LocalNoise,
    max_abs: float | None = None,
    max_abs_c: float | None = None,
) -> tuple[torch.Tensor, tuple[int, int], pgpe.Weights] | None:
    """The exact fixed-point totals over all ranks' pairs, their exponents and the pair weights, for
    ``pgpe.tell(..., summed=...)`` (which then does not shape the losses again).

    Collective: every rank must call it with the same ``all_losses``. None when no pair is valid
    (every rank sees the same losses, so every rank skips the collectives alike). ``max_abs``: max |z|
    over all ranks when already agreed (``gather_losses``), else one scalar allreduce finds it; likewise
    ``max_abs_c`` for a control variate (``local.c`` set: the sums use the weights w_j - c_j).
    """
    w = pgpe.weights(params, all_losses)
    if w.num_valid == 0:
        return None
    with_sigma = not params.fixed_sigma
    top_z = comm.allreduce_max(local.max_abs) if max_abs is None else max_abs
    top_c = 0.0
    if local.c is not None:
        top_c = comm.allreduce_max(local.max_abs_c) if max_abs_c is None else max_abs_c
    exps = pgpe.exponents(w, top_z, top_c)
    D = state.center.numel()
    device = next((z.device for z in local.z if z is not None), state.center.device)
    acc = torch.zeros((2, D), dtype=torch.int64, device=device)
    for i, (pairs, z) in enumerate(zip(local.pairs, local.z)):
        if not pairs:
            continue
        if z is None:
            z = pgpe.pair_noise(seed, state.generation, pairs, D, params.noise, device)
        wi = w if local.c is None else pgpe.cv_weights(w, pairs, local.c[i])
        acc += pgpe.partial_sums(wi, pairs, z, exps, with_sigma)
    rows = 2 if with_sigma else 1
    total = comm.allreduce_sum_int(acc[:rows].to("cpu").reshape(-1)).reshape(rows, D)
    if not with_sigma:
        total = torch.cat([total, torch.zeros((1, D), dtype=torch.int64)])
    return total, exps, w


# ----------------------------------------------------------------------------- the loop's unit


def _num_items(params: pgpe.PGPEParams, batch_size: int) -> int:
    return params.popsize // 2  # the work items are the antithetic pairs


def _open(seed: int, device: torch.device, params: pgpe.PGPEParams):
    return contextlib.closing(NoiseSource(seed, prefetch_default(device), params.noise, device))


def _control_variate(work_: unit.Work, state: pgpe.PGPEState, params: pgpe.PGPEParams) -> torch.Tensor | None:
    """g of this generation on every rank alike (a rank without work blocks needs it for ``tell``):
    "grad" backpropagates the loss at theta on the whole batch, the same computation on every rank."""
    if params.control_variate != "grad":
        return pgpe.control_variate(state, params)
    grads, _ = work_.grad(state.center.to(work_.device)[None], slice(None))
    return pgpe.control_variate(state, params, grads[0])


def _evaluate(work_: unit.Work, state: pgpe.PGPEState, params: pgpe.PGPEParams, blocks):
    """This rank's members' losses (global order) and the noise it keeps for its share of the sums."""
    split = split_of(params, work_.block_size, work_.batch_size, work_.chunks)
    g = _control_variate(work_, state, params)
    return evaluate(state, params, blocks, split, work_.resource, work_.loss, work_.device, g=g)


def _exchange(comm, work_: unit.Work, state: pgpe.PGPEState, params: pgpe.PGPEParams, local, control: unit.Control):
    """All P losses, the agreed control and max |z| in ONE all-gather, then one exact int64 allreduce
    of the ranks' fixed-point partial sums (none when the generation was cut short)."""
    losses, kept = local
    split = split_of(params, work_.block_size, work_.batch_size, work_.chunks)
    if kept.g is None:
        all_losses, agreed, max_abs = gather_losses(comm, split, losses, control, kept.max_abs)
        max_c = None
    else:
        all_losses, agreed, max_abs, max_c = gather_losses(comm, split, losses, control, kept.max_abs, kept.max_abs_c)
    if agreed.cut_short:  # the generation is dropped
        return all_losses, None, agreed
    summed = reduce_sums(comm, state, params, work_.seed, all_losses, kept, max_abs, max_c)
    return all_losses, (summed, kept.g), agreed


def _tell(
    work_: unit.Work, state: pgpe.PGPEState, params: pgpe.PGPEParams, all_losses: torch.Tensor, reduced, lr: float
):
    summed, g = reduced
    return pgpe.tell(state, params, work_.seed, all_losses, lr=lr, summed=summed, g=g)


UNIT = unit.Optimizer(
    name="pgpe",
    Params=pgpe.PGPEParams,
    init=pgpe.init,
    num_items=_num_items,
    evaluate=_evaluate,
    exchange=_exchange,
    tell=_tell,
    state_to_dict=pgpe.state_to_dict,
    state_from_dict=pgpe.state_from_dict,
    open=_open,
)
