"""Optimizers over flat float32 parameter vectors: PGPE and RGS (Gaussian Loss Smoothing) and the
GRAD baseline, with their step rules, fitness shaping and schedules.

Convention for the whole package: we MINIMISE a loss; gradients are gradients of the loss and
every update is theta <- theta - delta. Optimizers never see a network, only vectors (D,) and
losses, and import neither mpigls.parallel nor mpigls.run.checkpoint.

Each optimizer is one unit for the training loop (``unit.Optimizer``: Params, init, work items,
evaluate, exchange, tell, state dicts), registered by name in ``mpigls.run.optimizers``. PGPE's unit,
whose generation is distributed item by item, is ``mpigls.parallel.pgpe_unit``.
"""

from mpigls.optim import grad, pgpe, rgs, schedules, shaping, steprules, unit

__all__ = ["grad", "pgpe", "rgs", "schedules", "shaping", "steprules", "unit"]
