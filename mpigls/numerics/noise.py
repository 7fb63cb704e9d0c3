"""Counter-based perturbation noise: the same numbers for (seed, generation, member) on every rank.

Every MPI rank must be able to regenerate the noise of any population member without
communication, and the numbers must not depend on the number of ranks, the device or the GPU
model. Device generators cannot promise that (torch's CPU and CUDA streams differ for the same
seed), so the noise comes from numpy's Philox-4x64 counter-based bit generator, keyed by a
SeedSequence of the words (seed, stream, generation, member). numpy's Generator streams are
stable across platforms and releases for a fixed bit generator, and the result is copied to the
compute device afterwards.

That is the ``host`` scheme (``optimizer.noise: host``, the default). The ``device`` scheme
(``mpigls.numerics.philox``: Philox-4x32-10 and an inverse normal CDF in plain torch ops) generates the
numbers on the training device itself, with the same bits on a CPU and on any GPU, but different
numbers from ``host``. ``scheme_id`` names each construction; it is stored in every checkpoint so
that a change of scheme is detected instead of silently changing the optimisation trajectory.

Shapes: D parameters, M members.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from mpigls.numerics import philox, schemes
from mpigls.numerics.schemes import SCHEME_HELP, SCHEMES, check_scheme, scheme_id

__all__ = [
    "NOISE_SCHEME",
    "SCHEMES",
    "SCHEME_HELP",
    "check_scheme",
    "scheme_id",
    "STREAM_PGPE",
    "STREAM_RGS",
    "STREAM_ATTACK",
    "STREAM_DATA",
    "member_noise",
    "noise_block",
    "numpy_generator",
    "torch_generator",
]

NOISE_SCHEME = schemes.HOST_SCHEME
STREAM_PGPE = 0
STREAM_RGS = 1
STREAM_ATTACK = 2
STREAM_DATA = 3


def _check_words(words: Sequence[int]) -> list[int]:
    out = []
    for w in words:
        if isinstance(w, (bool, np.bool_)) or not isinstance(w, (int, np.integer)):
            raise TypeError(f"noise key words must be integers, got {w!r} of type {type(w).__name__}")
        if w < 0:
            raise ValueError(f"noise key words must be non-negative, got {int(w)}")
        out.append(int(w))
    return out


def numpy_generator(seed: int, *words: int) -> np.random.Generator:
    """A numpy Generator (Philox) keyed by (seed, *words); identical on every machine."""
    return np.random.Generator(np.random.Philox(np.random.SeedSequence(_check_words((seed, *words)))))


def member_noise(seed: int, generation: int, member: int, num_params: int, stream: int = STREAM_PGPE) -> torch.Tensor:
    """z ~ N(0, I_D) for one population member, float32 on the CPU: shape (D,)."""
    rng = numpy_generator(seed, stream, generation, member)
    return torch.from_numpy(rng.standard_normal(num_params, dtype=np.float32))


def noise_block(
    seed: int,
    generation: int,
    members: Sequence[int],
    num_params: int,
    stream: int = STREAM_PGPE,
    scheme: str = "host",
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Stacked member noise, shape (M, D) float32; with the host scheme row i equals
    ``member_noise(..., members[i], ...)``. Host: drawn on the CPU, then moved to ``device`` (if
    given); device: generated on ``device`` (default CPU), the same bits wherever."""
    if check_scheme(scheme) == "device":
        members = _check_words(members)
        _check_words((seed, generation, stream))
        return philox.gaussian(seed, stream, generation, members, num_params, device or "cpu")
    out = np.empty((len(members), num_params), dtype=np.float32)
    for row, member in enumerate(members):
        numpy_generator(seed, stream, generation, member).standard_normal(num_params, dtype=np.float32, out=out[row])
    block = torch.from_numpy(out)
    return block if device is None else block.to(device)


def torch_generator(seed: int, *words: int) -> torch.Generator:
    """A CPU torch.Generator seeded from a hash of (seed, *words); same on every rank."""
    key = ",".join(str(w) for w in _check_words((seed, *words))).encode()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1))
    return gen
