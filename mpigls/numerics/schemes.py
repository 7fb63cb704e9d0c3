"""The names of the perturbation-noise schemes (``optimizer.noise``) and the ids a checkpoint records
for them, without the generators (``noise``: host, ``philox``: device), so that reading a config does
not import torch."""

from __future__ import annotations

__all__ = ["HOST_SCHEME", "DEVICE_SCHEME", "SCHEMES", "SCHEME_HELP", "check_scheme", "scheme_id"]

HOST_SCHEME = "philox4x64-seedseq-v1"  # noise.NOISE_SCHEME: numpy Philox on the host
DEVICE_SCHEME = "philox4x32-10-as241-v1"  # philox.SCHEME: Philox-4x32 in torch ops on the device
SCHEMES = {"host": HOST_SCHEME, "device": DEVICE_SCHEME}  # optimizer.noise -> checkpoint noise_scheme
SCHEME_HELP = (
    "where the perturbation noise is generated: host (numpy Philox on the CPU, copied to the device; on a "
    "GPU drawn ahead on a host thread) or device (Philox-4x32 in torch ops on the training device; the same "
    "bits on CPU and GPU, other numbers than host)"
)


def check_scheme(name: str) -> str:
    """``name`` if it is a noise scheme (``optimizer.noise``), else a ValueError listing them."""
    if name not in SCHEMES:
        raise ValueError(f"optimizer.noise must be one of {', '.join(SCHEMES)}, got {name!r}")
    return name


def scheme_id(name: str) -> str:
    """The checkpoint's ``noise_scheme`` for ``optimizer.noise`` = name."""
    return SCHEMES[check_scheme(name)]
