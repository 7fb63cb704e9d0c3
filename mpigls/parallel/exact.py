"""World-size-invariant exact sums: fixed-point quantisation and ``allreduce_sum_exact``.

Floating-point addition is not associative, so an ``MPI_SUM`` of float partial sums depends on the
number of ranks and on the reduction tree. We sum in fixed point instead, where addition *is*
associative:

1. Every contributing row (ideally one per sample / population member, see below) is an element
   of ``t`` of shape (n_local, D) (a 1-D ``t`` is one row). All ranks agree on
   ``m = max |t|`` over every row of every rank (an exact operation) and on ``e = ceil(log2 m)``.
2. Each element is scaled by ``2**(FRACTION_BITS - e)`` (exact: a power of two, in float64) and
   rounded half-to-even to an int64, so ``|q| <= 2**FRACTION_BITS``.
3. Rows are summed as int64 locally, then ``MPI_SUM`` over ranks: integer addition is exact and
   associative, so the total is the same for every split of the rows and every reduction order.
   With ``FRACTION_BITS = 40`` and ``HEADROOM_BITS = 22`` up to 2**22 rows fit in 62 bits.
4. The int64 total is converted back: ``float64(q) * 2**(e - FRACTION_BITS)``, then to float32.

Precision: each element of each row is quantised with absolute error at most
``2**(e - FRACTION_BITS - 1) <= m * 2**-40``; the sum of n rows is exact for the quantised values,
so its error is at most ``n * m * 2**-41`` before the final (deterministic) rounding to float32.

Invariance holds for *the rows passed in*: if a caller first sums samples in float32 and passes the
per-rank partial sum, that partial sum already depends on which samples the rank owns. Callers
that need bitwise invariance either pass the per-sample rows (n_local, D) or quantise each sample
themselves with ``fixed_point(row, exponent)`` (exponent from ``fixed_point_exponent`` of a global
max), sum the int64 rows locally and call ``comm.allreduce_sum_int``.

Non-finite inputs: all ranks learn how many non-finite values each rank had (in the same
collective as the max) and all raise ``FloatingPointError`` naming those ranks, so a NaN never
becomes a silently divergent or hung run.

Shapes: D parameters (vector length), n rows (samples / members) held by this rank.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch

__all__ = [
    "FRACTION_BITS",
    "HEADROOM_BITS",
    "MAX_ROWS",
    "fixed_point_exponent",
    "fixed_point",
    "from_fixed_point",
    "allreduce_sum_exact",
]

FRACTION_BITS = 40  # bits below the largest magnitude kept by the fixed-point sum
HEADROOM_BITS = 22  # room for 2**22 summed rows in a signed 64-bit integer
MAX_ROWS = 1 << HEADROOM_BITS


class Collectives(Protocol):
    """The two collectives ``allreduce_sum_exact`` needs (every ``Comm`` has them)."""

    def allgather_obj(self, obj: Any) -> list: ...
    def allreduce_sum_int(self, q: torch.Tensor) -> torch.Tensor: ...


def fixed_point_exponent(max_abs: float) -> int:
    """The shared exponent e with ``max_abs <= 2**e`` (0 for max_abs == 0)."""
    if not math.isfinite(max_abs) or max_abs < 0:
        raise ValueError(f"max_abs must be finite and >= 0, got {max_abs}")
    if max_abs == 0:
        return 0
    mantissa, exponent = math.frexp(max_abs)  # max_abs = mantissa * 2**exponent, 0.5 <= m < 1
    return exponent


def fixed_point(t: torch.Tensor, exponent: int) -> torch.Tensor:
    """Quantise t to int64 multiples of ``2**(exponent - FRACTION_BITS)`` (round half to even).

    ``|t| <= 2**exponent`` is required (checked): then ``|result| <= 2**FRACTION_BITS``.
    """
    t64 = t.detach().to(device="cpu", dtype=torch.float64)
    scaled = torch.ldexp(t64, torch.tensor(float(FRACTION_BITS - exponent), dtype=torch.float64))
    if t64.numel() and not bool(torch.isfinite(scaled).all()):
        raise FloatingPointError(f"fixed_point: input has NaN/inf values or is too large for exponent {exponent}")
    q = torch.round(scaled)
    if q.numel() and float(q.abs().max()) > 2.0**FRACTION_BITS:
        raise ValueError(
            f"fixed_point: |t| exceeds 2**{exponent}; compute the exponent from the "
            "global max |t| with fixed_point_exponent"
        )
    return q.to(torch.int64)


def from_fixed_point(q: torch.Tensor, exponent: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of ``fixed_point`` (deterministic: int64 -> float64 -> dtype, round to nearest)."""
    q64 = q.to(device="cpu", dtype=torch.float64)
    return torch.ldexp(q64, torch.tensor(float(exponent - FRACTION_BITS), dtype=torch.float64)).to(dtype)


def allreduce_sum_exact(comm: Collectives, t: torch.Tensor) -> torch.Tensor:
    """Sum rows of t (n_local, D) — or one row (D,) — over all ranks of ``comm``; float32 (D,) result
    on t's device whose bits do not depend on world size, on which rank holds which row, or on the
    reduction order (see the module docstring for the scheme and its precision). Collective."""
    rows = t.detach()
    if rows.dim() == 1:
        rows = rows.unsqueeze(0)
    if rows.dim() != 2:
        raise ValueError(f"allreduce_sum_exact takes (D,) or (n, D), got shape {tuple(t.shape)}")
    rows = rows.to(device="cpu", dtype=torch.float64)
    num_bad = int((~torch.isfinite(rows)).sum())
    local_max = float(rows.abs().max()) if rows.numel() and num_bad == 0 else 0.0
    # One small collective for the max, the non-finite counts and the row counts of every rank.
    stats = comm.allgather_obj((local_max, num_bad, rows.shape[0], rows.shape[1]))
    bad = [(r, s[1]) for r, s in enumerate(stats) if s[1] > 0]
    if bad:
        counts = ", ".join(f"rank {r}: {n}" for r, n in bad)
        raise FloatingPointError(
            f"allreduce_sum_exact: non-finite values (NaN/inf) in the input on "
            f"{counts}; the run has diverged (lower the learning rate or check "
            "the loss)"
        )
    widths = [s[3] for s in stats]
    if len(set(widths)) != 1:
        raise RuntimeError(f"allreduce_sum_exact: ranks passed different D: {widths}")
    total_rows = sum(s[2] for s in stats)
    if total_rows > MAX_ROWS:
        raise ValueError(
            f"allreduce_sum_exact: {total_rows} rows exceed the fixed-point headroom of "
            f"{MAX_ROWS}; pre-sum rows in int64 with fixed_point + allreduce_sum_int"
        )
    exponent = fixed_point_exponent(max(s[0] for s in stats))
    q = fixed_point(rows, exponent).sum(dim=0)
    total = comm.allreduce_sum_int(q)
    return from_fixed_point(total, exponent, torch.float32).to(t.device)
