"""mpigls: MPI-parallel certified training with Gaussian Loss Smoothing (arXiv 2403.07095).

The packages, from the bottom up (``docs/architecture.md`` draws the map):

``nn``          the networks, their batched forward over P weight vectors, the margins, the PGD attack
``numerics``    counter-based noise (``noise``, ``philox``) and deterministic float settings
``bounds``      the relaxations behind ``bounds.margin_lower_bounds`` (IBP, CROWN/DeepPoly, ...)
``objectives``  natural, PGD and certified losses
``optim``       PGPE, RGS and GRAD as pure maths over flat vectors
``parallel``    ranks: communicators, exact sums, the work split, PGPE's distributed generation
``evaluation``  certification, the complete verifier, loss landscapes
``run``         one training run: the loop, run directory, checkpoints, monitoring
``analysis``    runs as data (``analysis.load_run``), report tables, plots
``config``, ``data``, ``cli``  the YAML config, the datasets, the command line

We minimise loss everywhere.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
__all__ = [
    "analysis",
    "bounds",
    "cli",
    "config",
    "data",
    "evaluation",
    "nn",
    "numerics",
    "objectives",
    "optim",
    "parallel",
    "run",
]


def __getattr__(name: str):
    # Lazy submodule access keeps `import mpigls` cheap (no torch/mpi4py until needed).
    if name in __all__:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'mpigls' has no attribute {name!r}")
