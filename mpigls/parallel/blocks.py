"""Which rank evaluates which block: a contiguous, balanced split of ``range(num_blocks)``.

The blocks of a generation (population pairs, samples, evaluation batches) are numbered
independently of the number of ranks; rank r evaluates ``my_blocks(num_blocks, r, world_size)``.
Since every block is computed the same way wherever it runs, results do not depend on the split.
"""

from __future__ import annotations

__all__ = ["block_range", "my_blocks"]


def _check_split(num_blocks: int, world_size: int) -> None:
    if not isinstance(num_blocks, int) or num_blocks < 0:
        raise ValueError(f"num_blocks must be an integer >= 0, got {num_blocks!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")


def block_range(num_blocks: int, rank: int, world_size: int) -> range:
    """Contiguous, balanced share of ``range(num_blocks)`` for ``rank``: sizes differ by at most
    one, the first ``num_blocks % world_size`` ranks get the extra block; may be empty."""
    _check_split(num_blocks, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    base, extra = divmod(num_blocks, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def my_blocks(num_blocks: int, rank: int, world_size: int) -> list[int]:
    """``list(block_range(...))``: the block indices rank ``rank`` owns."""
    return list(block_range(num_blocks, rank, world_size))
