"""The bound engine: certified lower bounds on the logit margins of (populations of) networks.

``margin_lower_bounds(model, x, y, eps, method, weights=None, **opts)`` bounds, for every
example, the margins z_y - z_i (i != y, ascending) over [x - eps, x + eps] ∩ [0, 1] (pixel space)
with a relaxation of the registry (``registry.py``; ``METHODS`` are the built-in ones):

- ``ibp``: interval bounds (``ibp.py``);
- ``hbox``: hybrid zonotope / box (``hbox.py``), never looser than ibp;
- ``crown-ibp``: IBP intermediate bounds + one CROWN back-substitution (``crown.py``);
- ``deeppoly`` (alias ``crown``): back-substitution for every layer (``crown.py``);
- ``alpha-crown``: DeepPoly with optimised lower ReLU slopes (``alpha_crown.py``; detached);
- ``sabr``: IBP over a small box around a PGD point (``sabr.py``; sound for that box only).

Options accepted by every method: ``memory_budget_mb`` (chunking never changes the result beyond
float rounding and identical calls give identical bits) and ``population`` ("auto", "batched":
all members in one pass, "loop": member by member; same results). The others are each
relaxation's own (``options(method)``): deeppoly and alpha-crown: ``conv_mode`` ("auto",
"patches", "dense", "matrix": every layer as an explicit matrix, ``matrix.py``, which "auto"
picks on CPU for small networks), ``rows`` ("auto", "packed", "groups", "padded"; see
``crown.intermediate_bounds``); alpha-crown: ``alpha_steps``, ``alpha_lr``; sabr:
``sabr_lambda``, ``pgd_steps``, ``pgd_step_size``, ``generator``.

Shapes: P population, D weights (parameters of one network), B batch, K classes.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from mpigls.bounds import alpha_crown, crown, hbox, ibp, matrix, registry, sabr
from mpigls.bounds.common import DEFAULT_MEMORY_BUDGET_MB, make_problem, plan_chunks
from mpigls.bounds.registry import Relaxation, register
from mpigls.nn.population import renamed_weights

__all__ = [
    "METHODS",
    "SOUND_METHODS",
    "COMMON_OPTIONS",
    "POPULATION_MODES",
    "Relaxation",
    "register",
    "options",
    "margin_lower_bounds",
    "make_problem",
    "alpha_crown",
    "crown",
    "hbox",
    "ibp",
    "matrix",
    "registry",
    "sabr",
]

# The built-in relaxations, in registration order (a relaxation registered later is accepted by
# margin_lower_bounds and certified_loss too: see registry.RELAXATIONS).
METHODS = tuple(registry.RELAXATIONS)
# Sound over the whole eps box, so they may certify; sabr bounds only a small box around a PGD
# point (a training loss, never a certificate).
SOUND_METHODS = tuple(name for name, r in registry.RELAXATIONS.items() if r.sound)

POPULATION_MODES = ("auto", "batched", "loop")
COMMON_OPTIONS = ("memory_budget_mb", "population")


def options(method: str) -> tuple[str, ...]:
    """Every option ``margin_lower_bounds`` accepts for ``method``."""
    return (*COMMON_OPTIONS, *registry.get(method).options)


def _member_loop(method: str, population: str, num_members: int) -> bool:
    """Whether to bound member by member. "auto" is batched: measured on CPU (CNN3 MNIST, P=8,
    B=128, benchmarks/bench_generation.py --options population=loop|batched) the two are within
    noise for deeppoly, whose row work runs per member anyway (rows.py); batched keeps ibp and
    crown-ibp in single passes."""
    if population != "auto":
        return population == "loop"
    return False


# Share of memory_budget_mb for the per-(member, example) state that lives through a whole call
# (pre-activation bounds, relaxations, window tables: ``Relaxation.state``); the engines chunk
# their rows in the rest.
_STATE_SHARE = 0.4


def margin_lower_bounds(
    model: nn.Sequential,
    x: torch.Tensor,
    y: torch.Tensor,
    eps,
    method: str,
    weights: torch.Tensor | None = None,
    *,
    params: torch.Tensor | None = None,
    **opts,
) -> torch.Tensor:
    """Lower bounds on z_y - z_i, i != y ascending: (B, K-1), or (P, B, K-1) for weights (P, D).

    ``params=`` is the deprecated name of ``weights=`` (``population.renamed_weights``).
    """
    weights = renamed_weights(weights, params, "margin_lower_bounds")
    relaxation = registry.get(method)
    budget = opts.pop("memory_budget_mb", DEFAULT_MEMORY_BUDGET_MB)
    population = opts.pop("population", "auto")
    if population not in POPULATION_MODES:
        raise ValueError(f"population must be one of {list(POPULATION_MODES)}, got {population!r}")
    unknown = sorted(set(opts) - set(relaxation.options))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; allowed: {list(options(method))}")
    if weights is not None and weights.ndim == 2 and _member_loop(method, population, weights.shape[0]):
        return torch.stack(
            [margin_lower_bounds(model, x, y, eps, method, w, memory_budget_mb=budget, **opts) for w in weights]
        )
    prob = make_problem(model, x, y, eps, weights, budget)
    num_p, num_b = prob.net.num_members, x.shape[0]
    pc, bc = num_p, num_b
    if relaxation.state is not None:
        pc, bc, _ = plan_chunks(num_p, num_b, 1, relaxation.state(prob), budget * _STATE_SHARE, work_factor=1)
    if (pc, bc) == (num_p, num_b):
        out = relaxation.engine(dataclasses.replace(prob, memory_budget_mb=budget * (1 - _STATE_SHARE)), **opts)
    else:  # every (member, example) pair is bounded on its own: chunk them
        out = _state_chunks(relaxation, model, x, y, prob.eps.view(-1), weights, pc, bc, budget, opts)
    return out[0] if prob.net.single else out


def _state_chunks(
    relaxation: Relaxation, model, x, y, eps, weights, pc: int, bc: int, budget: float, opts: dict
) -> torch.Tensor:
    """The engine on chunks of ``pc`` members x ``bc`` examples: (P, B, K-1).

    Unlike ``common.over_pairs`` (which slices a built problem), each chunk's problem is built
    anew from the member chunk's flat weights, sliced once per member chunk: autograd then sums
    the example chunks' gradients at those flat weights, in the order it always has (gradients
    stay bit-identical to the releases before the registry).
    """
    num_p = 1 if weights is None or weights.ndim == 1 else weights.shape[0]
    out_p = []
    for p0 in range(0, num_p, pc):
        part = weights if weights is None or weights.ndim == 1 else weights[p0 : p0 + pc]
        out_b = []
        for b0 in range(0, x.shape[0], bc):
            sub = make_problem(
                model, x[b0 : b0 + bc], y[b0 : b0 + bc], eps[b0 : b0 + bc], part, budget * (1 - _STATE_SHARE)
            )
            out_b.append(relaxation.engine(sub, **opts))
        out_p.append(torch.cat(out_b, 1))
    return torch.cat(out_p, 0)
