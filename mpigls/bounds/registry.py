"""The relaxation registry: every bound method is one ``Relaxation`` entry with one signature.

An engine is ``engine(prob: Problem, **options) -> (P, B, K-1)`` margin lower bounds for every
member and example of ``prob`` (``common.Problem``: the stacked network, the inputs, labels,
radii and the normalised input box). ``margin_lower_bounds`` validates the inputs and options,
splits the population and batch into chunks whose per-pair state (``state``) fits the memory
budget and calls the engine on each chunk; engines chunk their own working set with the shared
loop ``common.over_pairs``.

Adding a relaxation is one module with its engine plus one ``register(Relaxation(...))`` line
below (see docs/architecture.md, "Adding a relaxation").
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

from mpigls.bounds import alpha_crown, crown, hbox, ibp, patches, sabr
from mpigls.bounds.common import Problem, pair_state

__all__ = ["Relaxation", "register", "unregister", "get", "RELAXATIONS", "window_state"]


@dataclass(frozen=True)
class Relaxation:
    """One bound method.

    name: the method's name (``bound.method`` in a config, ``--methods`` of the tools);
    engine: ``engine(prob, **options)`` -> (P, B, K-1) lower bounds on z_y - z_i, i != y ascending;
    options: the engine's keyword options a caller may pass (defaults: the engine's own, ``defaults``);
    sound: the bounds hold over the whole eps box, so the method may certify;
    differentiable: gradients flow from the bounds to the weights (False: the result is detached);
    state: floats of state per (member, example) pair that live through one engine call, used to
        split a call into chunks whose state fits ``STATE_SHARE`` of ``memory_budget_mb`` (the
        engine chunks its own working set in the rest); None: never split (the engine runs
        whole calls, e.g. sabr's attack).
    """

    name: str
    engine: Callable[..., torch.Tensor]
    options: tuple[str, ...] = ()
    sound: bool = True
    differentiable: bool = True
    state: Callable[[Problem], int] | None = pair_state

    def __post_init__(self):
        signature = inspect.signature(self.engine).parameters
        missing = [o for o in self.options if o not in signature]
        if missing:
            raise TypeError(f"relaxation {self.name!r}: options {missing} are not parameters of its engine")

    @property
    def defaults(self) -> dict[str, Any]:
        """Option name -> the engine's default value."""
        signature = inspect.signature(self.engine).parameters
        return {o: signature[o].default for o in self.options}


_REGISTRY: dict[str, Relaxation] = {}
# Read-only view of the registry, in registration order.
RELAXATIONS: Mapping[str, Relaxation] = MappingProxyType(_REGISTRY)


def register(relaxation: Relaxation, *, replace: bool = False) -> Relaxation:
    """Add a relaxation under its name (``replace`` to overwrite one); returns it."""
    if relaxation.name in _REGISTRY and not replace:
        raise ValueError(f"a relaxation named {relaxation.name!r} is already registered")
    _REGISTRY[relaxation.name] = relaxation
    return relaxation


def unregister(name: str) -> None:
    """Remove a relaxation (tests that register a toy one clean up with this)."""
    del _REGISTRY[name]


def get(name: str) -> Relaxation:
    """The relaxation called ``name``; ValueError naming the registered ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown bound method {name!r}; choose one of {list(_REGISTRY)}") from None


def window_state(prob: Problem) -> int:
    """``pair_state`` plus the window tables (3 floats per patch element) that back-substitution
    keeps for every layer reached through convolutions only (``patches``)."""
    net = prob.net
    per_pair = pair_state(prob)
    for k in range(1, len(net.layers) - 1):
        if all(layer.is_conv for layer in net.layers[: k + 1]):
            per_pair += 3 * math.prod(net.layers[k].out_shape[1:]) * patches.patch_numel(net, k)[1]
    return per_pair


_BACKSUB = ("conv_mode", "rows")
register(Relaxation("ibp", ibp.bound))
register(Relaxation("hbox", hbox.bound))
register(Relaxation("crown-ibp", functools.partial(crown.bound, refine=False)))
register(Relaxation("deeppoly", functools.partial(crown.bound, refine=True), _BACKSUB, state=window_state))
register(Relaxation("crown", functools.partial(crown.bound, refine=True), _BACKSUB, state=window_state))
register(
    Relaxation(
        "alpha-crown",
        alpha_crown.bound,
        ("alpha_steps", "alpha_lr", *_BACKSUB),
        differentiable=False,
        state=window_state,
    )
)
# sabr bounds only a small box around a PGD point: a training loss, never a certificate
register(
    Relaxation("sabr", sabr.bound, ("sabr_lambda", "pgd_steps", "pgd_step_size", "generator"), sound=False, state=None)
)
