"""Gaussian noise from plain torch ops that gives the same bits on the CPU and on every GPU.

The ``device`` noise scheme (``optimizer.noise: device``): perturbation noise generated where it
is used, so a GPU rank neither draws normals on its host nor copies them to the device. torch's own
generators cannot serve (the CPU and CUDA streams differ for the same seed, and a device generator
is not counter-based), so this module computes

1. **Philox-4x32-10** (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) in
   int64 tensor ops: counter (c0, c1, c2, c3) = (i, member, generation, stream), key = the 64-bit
   seed as two 32-bit words; counter i gives the numbers 4i .. 4i+3 of a member's vector. The
   32x32-bit products are formed from 16-bit halves of the multiplier, so no int64 product
   overflows: integer results, exact on every device.
2. a uniform u = (w + 1/2) 2^-32 in float64 (exact) from each 32-bit word w, so u is in
   [2^-33, 1 - 2^-33];
3. the standard normal quantile z = Phi^-1(u) with Wichura's AS241 (PPND16, Applied Statistics
   37, 1988; relative error ~1e-16) in float64. Its tail branch needs log: computed here from the
   exponent and mantissa bits and a series in +, *, / only. With 32-bit uniforms r = sqrt(-log
   min(u, 1 - u)) <= 4.79, so AS241's far-tail branch (r > 5) never occurs and is left out;
4. z rounded to float32.

Every floating-point step is one IEEE-754 operation (+, -, *, /, sqrt: correctly rounded on CPUs
and, with CUDA's default -prec-div / -prec-sqrt, on GPUs) in its own elementwise kernel, so no
fused multiply-add can change a rounding; integer ops and comparisons are exact; nothing calls a
library log, exp or trig function (whose last bits differ between libm and CUDA). Hence the same
bits on any device, for any chunking of the work (``tests/test_philox.py``; the CUDA comparison is
``tests/gpu``). The numbers differ from the ``host`` scheme's (numpy Philox-4x64 with SeedSequence
keys, ``mpigls.numerics.noise``), so the scheme is recorded in each checkpoint.

Shapes: M members, D numbers per member.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mpigls.numerics import schemes

__all__ = ["SCHEME", "philox4x32", "uniform_words", "normal_quantile", "gaussian"]

SCHEME = schemes.DEVICE_SCHEME  # "philox4x32-10-as241-v1"

_MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # Philox-4x32 multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
_ROUNDS = 10

# AS241 PPND16 coefficients, lowest order first (Wichura 1988)
_A = (
    3.3871328727963666080e0,
    1.3314166789178437745e2,
    1.9715909503065514427e3,
    1.3731693765509461125e4,
    4.5921953931549871457e4,
    6.7265770927008700853e4,
    3.3430575583588128105e4,
    2.5090809287301226727e3,
)
_B = (
    1.0,
    4.2313330701600911252e1,
    6.8718700749205790830e2,
    5.3941960214247511077e3,
    2.1213794301586595867e4,
    3.9307895800092710610e4,
    2.8729085735721942674e4,
    5.2264952788528545610e3,
)
_C = (
    1.42343711074968357734e0,
    4.63033784615654529590e0,
    5.76949722146069140550e0,
    3.64784832476320460504e0,
    1.27045825245236838258e0,
    2.41780725177450611770e-1,
    2.27238449892691845833e-2,
    7.74545014278341407640e-4,
)
_D = (
    1.0,
    2.05319162663775882187e0,
    1.67638483018380384940e0,
    6.89767334985100004550e-1,
    1.48103976427480074590e-1,
    1.51986665636164571966e-2,
    5.47593808499534494600e-4,
    1.05075007164441684324e-9,
)
_LOG_SERIES = tuple(1.0 / (2 * k + 1) for k in range(12))  # atanh series: |s| <= 0.172, error < 2e-17
_LN2 = math.log(2.0)
_SQRT_HALF = math.sqrt(0.5)
_MANTISSA = (1 << 52) - 1
_HALF_EXPONENT = 1022 << 52  # the exponent bits of a float64 in [0.5, 1)


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * m for int64 ``a`` in [0, 2^32) and a constant m < 2^32, with
    no intermediate above 2^49 (a * m itself can exceed int64)."""
    p = a * (m >> 16)  # < 2^48
    t = ((p & 0xFFFF) << 16) + a * (m & 0xFFFF)  # < 2^32 + 2^48
    return (p >> 16) + (t >> 32), t & _MASK32


def philox4x32(counter: Sequence[torch.Tensor], key: tuple[int, int]) -> list[torch.Tensor]:
    """Philox-4x32-10 of the counter words (four broadcastable int64 tensors with values in
    [0, 2^32)) under ``key`` (two 32-bit ints): four int64 tensors of 32-bit output words."""
    c0, c1, c2, c3 = counter
    k0, k1 = (int(k) & _MASK32 for k in key)
    for r in range(_ROUNDS):
        if r:
            k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]


def _key(seed: int) -> tuple[int, int]:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 64:
        raise ValueError(f"noise seed must be an integer in [0, 2^64), got {seed!r}")
    return seed & _MASK32, seed >> 32


def _word(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MASK32:
        raise ValueError(f"device noise: {name} must be an integer in [0, 2^32), got {value!r}")
    return value


def uniform_words(
    seed: int, stream: int, generation: int, members: torch.Tensor, start: int, count: int
) -> torch.Tensor:
    """The 32-bit words 4*start .. 4*(start+count)-1 of each member's stream: int64 (M, 4 count) on
    the device of ``members`` ((M,) int64)."""
    idx = torch.arange(start, start + count, dtype=torch.int64, device=members.device)
    c0 = idx.expand(members.numel(), count)
    c1 = members.to(torch.int64)[:, None].expand_as(c0)
    c2 = torch.full_like(c0, _word("generation", generation))
    c3 = torch.full_like(c0, _word("stream", stream))
    return torch.stack(philox4x32((c0, c1, c2, c3), _key(seed)), dim=-1).reshape(members.numel(), 4 * count)


def _horner(coeffs: Sequence[float], x: torch.Tensor) -> torch.Tensor:
    """sum_k coeffs[k] x^k by Horner's rule, one rounding per * and per + (no fused multiply-add)."""
    acc = x * coeffs[-1]
    for c in reversed(coeffs[1:-1]):
        acc = (acc + c) * x
    return acc + coeffs[0]


def _log(x: torch.Tensor) -> torch.Tensor:
    """Natural log of positive normal float64 ``x`` from its bits and an atanh series (+, *, / only):
    x = m 2^e with m in [sqrt(1/2), sqrt(2)), log x = e log 2 + 2 atanh((m - 1)/(m + 1))."""
    bits = x.view(torch.int64)
    e = (bits >> 52) - 1022  # x = m 2^e, m in [0.5, 1)
    m = ((bits & _MANTISSA) | _HALF_EXPONENT).view(torch.float64)
    low = m < _SQRT_HALF
    m = torch.where(low, m * 2.0, m)  # exact
    e = torch.where(low, e - 1, e)
    s = (m - 1.0) / (m + 1.0)
    series = _horner(_LOG_SERIES, s * s)
    return e.to(torch.float64) * _LN2 + (s * 2.0) * series


def normal_quantile(u: torch.Tensor) -> torch.Tensor:
    """Phi^-1(u) for float64 u with min(u, 1 - u) >= 2^-33 (AS241 without its far tail): float64."""
    q = u - 0.5
    z = torch.empty_like(u)
    central = q.abs() <= 0.425
    qc = q[central]
    r = 0.180625 - qc * qc
    z[central] = qc * _horner(_A, r) / _horner(_B, r)
    tail = ~central
    qt, ut = q[tail], u[tail]
    neg = qt < 0
    r = torch.sqrt(-_log(torch.where(neg, ut, 1.0 - ut))) - 1.6
    zt = _horner(_C, r) / _horner(_D, r)
    z[tail] = torch.where(neg, -zt, zt)
    return z


def _chunk_counters(device: torch.device, rows: int) -> int:
    """Counters per chunk (all rows together): cache-sized temporaries on a CPU, large on a GPU."""
    budget = 1 << 14 if device.type == "cpu" else 1 << 22
    return max(1, budget // max(1, rows))


def gaussian(
    seed: int,
    stream: int,
    generation: int,
    members: Sequence[int],
    num_params: int,
    device: torch.device | str = "cpu",
    chunk: int | None = None,
) -> torch.Tensor:
    """z ~ N(0, I_D) per member: (M, D) float32 on ``device``; the same bits on every device and for
    every ``chunk`` (counters per step; it only bounds the temporaries)."""
    device = torch.device(device)
    members = [_word("member", int(j)) for j in members]
    out = torch.empty((len(members), num_params), dtype=torch.float32, device=device)
    if not members or num_params == 0:
        return out
    rows = torch.tensor(members, dtype=torch.int64, device=device)
    counters = -(-num_params // 4)
    step = chunk or _chunk_counters(device, len(members))
    for start in range(0, counters, step):
        count = min(step, counters - start)
        words = uniform_words(seed, stream, generation, rows, start, count)
        u = (words.to(torch.float64) + 0.5) * 2.0**-32
        lo, hi = 4 * start, min(num_params, 4 * (start + count))
        out[:, lo:hi] = normal_quantile(u[:, : hi - lo].reshape(-1)).reshape(len(members), hi - lo).to(torch.float32)
    return out
