"""Optimizers over flat float32 parameter vectors: PGPE and RGS (Gaussian Loss Smoothing) and the
GRAD baseline, with their step rules, fitness shaping and schedules.

Convention for the whole package: we MINIMISE a loss; gradients are gradients of the loss and
every update is theta <- theta - delta. Optimizers never see a network, only vectors (D,) and
losses, and import neither mpigls.parallel nor mpigls.run.checkpoint.

Each optimizer is one unit for the training loop (``unit.Optimizer``: Params, init, work items,
evaluate, exchange, tell, state dicts), registered by name in ``mpigls.optim.registry``. PGPE's unit,
whose generation is distributed item by item, is ``mpigls.parallel.pgpe_unit``.

The submodules are imported on first access, so that ``mpigls.optim.registry`` (and the config built
from it) does not import every optimizer.
"""

from __future__ import annotations

import importlib

__all__ = ["grad", "pgpe", "registry", "rgs", "schedules", "shaping", "steprules", "unit"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'mpigls.optim' has no attribute {name!r}")
