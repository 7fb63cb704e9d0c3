"""The work items of a generation: (member block, example chunk), fixed by the config, never by the ranks.

A generation evaluates ``num_members`` members (PGPE pairs, RGS samples) on one minibatch of B
examples. Members are cut into units of ``unit_size`` (``optimizer.block_size``) and the minibatch
into ``chunks`` example chunks (``optimizer.batch_chunks``); a work item is one (unit, chunk)
pair, numbered unit-major (item = unit * chunks + chunk) so that a rank's contiguous run of items
covers whole units where it can and evaluates each unit's noise once. Neither number depends on the
world size, so every item is computed on the same inputs (same shapes, same bits) whichever rank
owns it, and ranks beyond the number of units still get work: with P = 256, block_size 1 and
batch_chunks 8, 1024 items instead of 128.

Chunk c holds examples [start_c, stop_c) of a near-equal split (the first B % chunks chunks get one
more). An item's result is the per-member MEAN loss over its chunk. The mean over the minibatch is
recombined on every rank in the same fixed order from the all-gathered item results:

    L_m = sum_{c=0..C-1} (n_c / B) * mean_c(m)        (float64, added in order c = 0, 1, ...)

With one chunk n_0 / B = 1.0 and the sum starts from that one term, so the losses are exactly the
means as evaluated: batch_chunks = 1 is today's trajectory bit for bit. With C > 1 the result is the
unchunked mean to float rounding (float32 per-chunk means), identical for any number of ranks.
This requires a loss that is a mean of per-example terms that do not depend on the other examples
of the batch: methods whose attack noise is drawn for the whole batch (``ATTACK_METHODS``) are
refused with batch_chunks > 1 (``check``). GRAD splits the minibatch already (its units ARE
example blocks) and takes batch_chunks = 1 only; RGS too (its optimizer unit evaluates whole
examples; ``WorkSplit`` with per_member=1 is what it would use).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mpigls.optim import unit

__all__ = ["ATTACK_METHODS", "WorkSplit", "check"]

# per-example losses keyed on a per-generation attack generator drawn for the whole batch: a chunk
# would draw different attack noise for its examples than the full batch does
ATTACK_METHODS = ("sabr", "staps", "pgd")


def check(optimizer: str, method: str, batch_chunks: int, batch_size: int) -> None:
    """Refuse a chunking the loss cannot be split by (ValueError: what, why, how to fix)."""
    if batch_chunks < 1:
        raise ValueError(f"optimizer.batch_chunks must be >= 1, got {batch_chunks}")
    if batch_chunks == 1:
        return
    if batch_chunks > batch_size:
        raise ValueError(
            f"optimizer.batch_chunks={batch_chunks} is more than train.batch_size={batch_size} "
            f"examples; use at most {batch_size}"
        )
    if optimizer == "grad":
        raise ValueError(
            f"optimizer.batch_chunks={batch_chunks} with optimizer grad: GRAD already splits the "
            "minibatch into work blocks of optimizer.block_size examples; set batch_chunks=1 and "
            "lower block_size for more work items"
        )
    if optimizer != "pgpe":
        raise ValueError(
            f"optimizer.batch_chunks={batch_chunks} with optimizer {optimizer}: only PGPE splits a "
            "member's minibatch so far; set batch_chunks=1"
        )
    if method in ATTACK_METHODS:
        raise ValueError(
            f"optimizer.batch_chunks={batch_chunks} with bound.method={method!r}: its attack draws "
            "noise for the whole minibatch, so a chunk's per-example losses would differ from the "
            f"unchunked ones; use batch_chunks=1 with {list(ATTACK_METHODS)}"
        )


@dataclass(frozen=True)
class WorkSplit:
    """Items (unit, chunk) of one generation; ``per_member`` loss values per member (2 for a PGPE pair)."""

    num_members: int
    unit_size: int
    batch_size: int
    chunks: int = 1
    per_member: int = 1

    def __post_init__(self):
        if self.num_members < 1 or self.unit_size < 1 or self.batch_size < 1 or self.per_member < 1:
            raise ValueError(f"WorkSplit sizes must be >= 1, got {self}")
        if not 1 <= self.chunks <= self.batch_size:
            raise ValueError(f"batch chunks must lie in [1, batch size {self.batch_size}], got {self.chunks}")

    @property
    def num_units(self) -> int:
        return unit.num_blocks(self.num_members, self.unit_size)

    @property
    def num_items(self) -> int:
        return self.num_units * self.chunks

    def item(self, i: int) -> tuple[int, int]:
        """(unit, chunk) of item ``i``."""
        if not 0 <= i < self.num_items:
            raise ValueError(f"work item must be in [0, {self.num_items}), got {i}")
        return divmod(i, self.chunks)

    def members(self, u: int) -> list[int]:
        """Member indices (pairs or samples) of unit ``u``."""
        return list(unit.block_items(u, self.unit_size, self.num_members))

    def examples(self, chunk: int) -> slice:
        """Example rows [start, stop) of a chunk of the minibatch."""
        base, extra = divmod(self.batch_size, self.chunks)
        start = chunk * base + min(chunk, extra)
        return slice(start, start + base + (1 if chunk < extra else 0))

    def item_size(self, i: int) -> int:
        """Loss values item ``i`` produces."""
        return len(self.members(self.item(i)[0])) * self.per_member

    def combine(self, gathered: torch.Tensor) -> torch.Tensor:
        """Per-member means over the minibatch (num_members * per_member,) float64 from ALL items'
        chunk means in item order (the all-gather of every rank's ``evaluate``), in a fixed order.

        A shorter input means some rank stopped early (a stop signal): the generation is dropped by
        the caller after ``agree_stop``, so NaNs of the right length come back instead of an error.
        """
        total = self.num_members * self.per_member
        gathered = gathered.to(torch.float64)
        if gathered.numel() != total * self.chunks:
            return torch.full((total,), float("nan"), dtype=torch.float64)
        if self.chunks == 1:
            return gathered
        out = torch.empty(total, dtype=torch.float64)
        at = 0
        for u in range(self.num_units):
            width = len(self.members(u)) * self.per_member
            lo = u * self.unit_size * self.per_member
            parts = gathered[at : at + width * self.chunks].reshape(self.chunks, width)
            acc = parts[0] * (self.examples(0).stop / self.batch_size)
            for c in range(1, self.chunks):
                sl = self.examples(c)
                acc = acc + parts[c] * ((sl.stop - sl.start) / self.batch_size)
            out[lo : lo + width] = acc
            at += width * self.chunks
        return out
