"""The optimizers the training loop can run: ``config optimizer.name`` -> its unit (mpigls.optim.unit).

Adding an optimizer: write its module (Params, state, the unit's functions: see optim/unit.py and
docs/architecture.md) and add ONE line here. PGPE's unit lives in ``mpigls.parallel.pgpe_unit`` (its
generation is distributed item by item); RGS and GRAD exchange gradient rows and define their units
beside their maths. The config section, ``mpigls config`` and the checkpoint
follow from the unit.
"""

from __future__ import annotations

from mpigls.optim import grad, rgs
from mpigls.optim.unit import Optimizer
from mpigls.parallel import pgpe_unit

__all__ = ["OPTIMIZERS", "get"]

OPTIMIZERS: dict[str, Optimizer] = {
    "pgpe": pgpe_unit.UNIT,
    "rgs": rgs.UNIT,
    "grad": grad.UNIT,
}


def get(name: str) -> Optimizer:
    """The unit registered as ``name`` (ValueError naming the choices otherwise)."""
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"optimizer.name must be one of {list(OPTIMIZERS)}, got {name!r}") from None
