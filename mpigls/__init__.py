"""mpigls: MPI-parallel certified training with Gaussian Loss Smoothing (arXiv 2403.07095).

Public modules (import them directly, e.g. ``from mpigls import bounds``):
``models`` (architectures, flat-vector views), ``bounds`` (``margin_lower_bounds``), ``losses``,
``noise`` (counter-based perturbations), ``optim`` (PGPE, RGS, GRAD), ``data``, ``config``,
``dist`` (the only mpi4py user), ``checkpoint`` (the only h5py user), ``train``, ``certify``, ``cli``.
We minimise loss everywhere.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
__all__ = [
    "attacks",
    "bounds",
    "certify",
    "checkpoint",
    "cli",
    "config",
    "data",
    "dist",
    "landscape",
    "losses",
    "models",
    "noise",
    "optim",
    "population",
    "precision",
    "train",
    "analysis",
    "analysis_report",
    "analysis_tightness",
    "monitor",
    "plotting",
]


def __getattr__(name: str):
    # Lazy submodule access keeps `import mpigls` cheap (no torch/mpi4py until needed).
    if name in __all__:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'mpigls' has no attribute {name!r}")
