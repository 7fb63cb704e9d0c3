"""The optimizers the training loop can run: ``optimizer.name`` -> its unit (``mpigls.optim.unit``).

As ``mpigls.bounds.registry`` is for the relaxations, this is the one list of the optimizers: adding one
is its module (Params, state, the unit's functions: see ``optim/unit.py`` and docs/architecture.md)
plus ONE line in ``OPTIMIZERS``. An entry names where its Params class and its unit live
(``"module:attribute"``) and is imported on first use: reading a config needs only the Params
(``params_of``), so it imports no unit, and the training loop gets the unit with ``get``. An entry may
also be a unit object itself (``tests/test_optimizer_unit.py`` registers a toy one that way).

PGPE's unit is ``mpigls.parallel.pgpe_unit`` (its generation is distributed item by item, with the
noise prepared on a background thread); RGS and GRAD define their units beside their maths.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mpigls.optim.unit import Optimizer

__all__ = ["OPTIMIZERS", "Entry", "get", "names", "params_of"]


@dataclass(frozen=True)
class Entry:
    """Where an optimizer lives: ``params`` and ``unit`` as ``"module:attribute"``."""

    params: str
    unit: str


OPTIMIZERS: dict[str, Entry | Optimizer] = {
    "pgpe": Entry("mpigls.optim.params:PGPEParams", "mpigls.parallel.pgpe_unit:UNIT"),
    "rgs": Entry("mpigls.optim.params:RGSParams", "mpigls.optim.rgs:UNIT"),
    "grad": Entry("mpigls.optim.params:GRADParams", "mpigls.optim.grad:UNIT"),
}


def _resolve(where: str) -> Any:
    module, _, attribute = where.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _entry(name: str) -> Entry | Optimizer:
    try:
        return OPTIMIZERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"optimizer.name must be one of {names()}, got {name!r}") from None


def names() -> list[str]:
    """The registered optimizer names, in registry order."""
    return list(OPTIMIZERS)


def params_of(name: str) -> type:
    """The Params class of optimizer ``name`` (its unit is not imported)."""
    entry = _entry(name)
    return _resolve(entry.params) if isinstance(entry, Entry) else entry.Params


def get(name: str) -> Optimizer:
    """The unit registered as ``name`` (ValueError naming the choices otherwise)."""
    entry = _entry(name)
    return _resolve(entry.unit) if isinstance(entry, Entry) else entry
