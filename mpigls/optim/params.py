"""The optimizers' hyperparameters: each optimizer's frozen Params class and the loop's ``LoopParams``.

A Params field carries its ONE default, its ONE check (``__post_init__``, a ValueError naming
``optimizer.<key>``) and its help text (``param``); ``mpigls.config`` builds the ``optimizer`` section
and ``mpigls config`` from these classes (through ``mpigls.optim.registry``). The module imports no
tensors, so that reading a config does not import torch; each optimizer's module re-exports its class
(``pgpe.PGPEParams``, ``rgs.RGSParams``, ``grad.GRADParams``, ``steprules.StepRuleParams``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from mpigls.numerics import schemes

__all__ = [
    "CONTROL_VARIATES",
    "GRADParams",
    "LoopParams",
    "PGPEParams",
    "RGSParams",
    "SHAPINGS",
    "STEP_RULES",
    "StepRuleParams",
    "check_params",
    "check_positive",
    "check_shaping",
    "check_step_rule",
    "help_of",
    "param",
]


def param(default: Any, help: str) -> Any:  # noqa: A002 - the metadata key, as in argparse
    """A Params field with its ONE default and its documentation (shown by ``mpigls config``)."""
    if isinstance(default, (list, dict)):

        def fresh() -> Any:  # a new list/dict per instance
            return copy.copy(default)

        return dataclasses.field(default_factory=fresh, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def help_of(f: dataclasses.Field) -> str:
    return str(f.metadata.get("help", ""))


@dataclass(frozen=True, kw_only=True)
class LoopParams:
    """Keys of the ``optimizer`` section that belong to the training loop, not to an optimizer.

    The lr schedule is in epochs, which an optimizer never sees (``tell`` takes the lr of the
    generation); ``block_size`` cuts the work into the rank-independent units of distribution.
    """

    lr_milestones: list = param([], "epochs after which the lr is multiplied by lr_factor (paper PGPE: [110, 130])")
    lr_factor: float = param(0.4, "lr decay factor at each milestone (paper: 0.4 PGPE, 0.2 GRAD)")
    block_size: int = param(
        8,
        "members (PGPE pairs, RGS samples) or examples (GRAD) per work block; blocks are the "
        "unit of distribution, fixed so results do not depend on the number of ranks",
    )
    batch_chunks: int = param(
        1,
        "example chunks each PGPE member's minibatch is split into: work blocks are (pair "
        "block, chunk), so more ranks than pair blocks get work; 1 = unsplit. Losses equal "
        "the unsplit ones to float rounding, bitwise the same for any number of ranks",
    )

    def __post_init__(self):
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"optimizer.block_size must be >= 1, got {self.block_size!r}")
        if not isinstance(self.batch_chunks, int) or self.batch_chunks < 1:
            raise ValueError(f"optimizer.batch_chunks must be >= 1, got {self.batch_chunks!r}")
        ms = self.lr_milestones
        if not all(isinstance(m, (int, float)) and not isinstance(m, bool) and 0 <= m < math.inf for m in ms):
            raise ValueError(f"optimizer.lr_milestones must be a list of non-negative epochs, got {ms!r:.200}")
        if list(ms) != sorted(ms):
            raise ValueError(f"optimizer.lr_milestones must be increasing, got {ms!r:.200}")
        if not 0 < self.lr_factor <= 1:
            raise ValueError(f"optimizer.lr_factor must lie in (0, 1], got {self.lr_factor}")


SHAPINGS = ("centered_ranks", "normalized", "raw")


def check_shaping(kind: str, owner: str = "optimizer") -> None:
    if kind not in SHAPINGS:
        raise ValueError(f"{owner}.fitness_shaping must be one of {list(SHAPINGS)}, got {kind!r}")


STEP_RULES = ("adam", "clipup", "sgd")


@dataclass(frozen=True, kw_only=True)
class StepRuleParams:
    """The step-rule fields shared by the Params of PGPE, RGS and GRAD (each adds its own)."""

    lr: float = param(3e-4, "learning rate of the centre (Adam lr, ClipUp step size; paper: 3e-4 PGPE, 5e-5 GRAD)")
    step_rule: str = param("adam", "step rule of the centre: " + ", ".join(STEP_RULES))
    beta1: float = param(0.9, "Adam beta1")
    beta2: float = param(0.999, "Adam beta2")
    adam_eps: float = param(1e-8, "Adam epsilon")
    max_speed: float | None = param(None, "ClipUp max speed (null: 2 * lr)")
    momentum: float = param(0.9, "ClipUp momentum")
    weight_decay: float = param(0.0, "decoupled weight decay on the centre (theta -= lr * weight_decay * theta)")

    def __post_init__(self):
        check_params(self)


def check_step_rule(rule: str, owner: str = "optimizer") -> None:
    if rule not in STEP_RULES:
        raise ValueError(f"{owner}.step_rule must be one of {list(STEP_RULES)}, got {rule!r}")


def check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
        raise ValueError(f"optimizer.{name} must be a positive finite number, got {value!r}")


def check_params(p) -> None:
    """Validate the step-rule fields (lr, rule, betas, ...): the one check, run by StepRuleParams."""
    check_positive("lr", p.lr)
    check_step_rule(p.step_rule)
    for name in ("beta1", "beta2", "momentum"):
        if not 0 <= getattr(p, name) < 1:
            raise ValueError(f"optimizer.{name} must lie in [0, 1), got {getattr(p, name)}")
    check_positive("adam_eps", p.adam_eps)
    if p.max_speed is not None:
        check_positive("max_speed", p.max_speed)
    if p.weight_decay < 0:
        raise ValueError(f"optimizer.weight_decay must be >= 0, got {p.weight_decay}")


@dataclass(frozen=True, kw_only=True)
class GRADParams(StepRuleParams):
    """GRAD hyperparameters: the step-rule fields and the gradient clip (RGS adds its sampling)."""

    grad_clip: float | None = param(10.0, "global L2-norm clip of the mean gradient (null: off)")

    def __post_init__(self):
        check_params(self)
        if self.grad_clip is not None and not (self.grad_clip > 0 and math.isfinite(self.grad_clip)):
            raise ValueError(f"optimizer.grad_clip must be > 0 or null (off), got {self.grad_clip}")


@dataclass(frozen=True, kw_only=True)
class RGSParams(GRADParams):
    """RGS hyperparameters: GRAD's (step rule, grad_clip) plus the Gaussian sampling."""

    num_samples: int = param(8, "RGS gradient samples per step")
    sigma_init: float = param(1e-3, "standard deviation of the Gaussian smoothing (RGS keeps it fixed); paper: 1e-3")
    antithetic: bool = param(True, "antithetic samples: 2k and 2k+1 use +z_k and -z_k (needs an even num_samples)")
    noise: str = param("host", schemes.SCHEME_HELP)

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ValueError(f"optimizer.num_samples must be a positive integer, got {self.num_samples!r}")
        if self.antithetic and self.num_samples % 2:
            raise ValueError(
                f"optimizer.num_samples must be even when antithetic=true, got {self.num_samples}; "
                f"use {self.num_samples + 1} or set antithetic=false"
            )
        if not (self.sigma_init >= 0 and math.isfinite(self.sigma_init)):
            raise ValueError(f"optimizer.sigma_init must be a finite number >= 0, got {self.sigma_init!r}")
        schemes.check_scheme(self.noise)

    @property
    def sigma(self) -> float:
        """The smoothing standard deviation (fixed: ``sigma_init``)."""
        return self.sigma_init


CONTROL_VARIATES = ("none", "grad", "previous", "running")


def _even_choices(p: int) -> str:
    """The nearest valid population sizes to ``p`` (even, >= 2), for an error message."""
    below, above = p - 1 if p % 2 else p - 2, p + 1 if p % 2 else p + 2
    return f"{below} or {above}" if below >= 2 else f"{max(2, above if p >= 2 else 2)}"


@dataclass(frozen=True, kw_only=True)
class PGPEParams(StepRuleParams):
    """PGPE hyperparameters (defaults: the GLS paper, Sec. 4 and App. B.2: fixed sigma)."""

    popsize: int = param(256, "PGPE population size P, even (P/2 antithetic pairs); paper: 256")
    sigma_init: float = param(1e-3, "initial per-parameter sigma of the search Gaussian; paper: 1e-3")
    sigma_lr: float = param(0.0, "learning rate of sigma, relative (see mpigls.optim.pgpe); 0 with fixed_sigma")
    sigma_max_change: float | None = param(0.2, "bound on the relative change of sigma per step (null: unbounded)")
    sigma_min: float = param(1e-6, "lower clamp of sigma (> 0)")
    sigma_max: float = param(1.0, "upper clamp of sigma")
    fixed_sigma: bool = param(True, "keep sigma at sigma_init (the paper's setting)")
    fitness_shaping: str = param("centered_ranks", "fitness shaping of the losses: " + ", ".join(SHAPINGS))
    noise: str = param("host", schemes.SCHEME_HELP)
    control_variate: str = param(
        "none",
        "control variate g of the centre gradient (unbiased; needs fitness_shaping raw): none, grad "
        "(backpropagated gradient at theta: a differentiable bound), previous (the last estimate), "
        "running (a running average of estimates, rate cv_rate); see mpigls.optim.pgpe",
    )
    cv_rate: float | None = param(
        None,
        "weight of the newest estimate in the running control variate, in (0, 1]; null: n/(n + D) "
        "(n = popsize/2 pairs, D parameters), the gain that shrinks the average's error fastest",
    )

    def __post_init__(self):
        if not isinstance(self.popsize, int) or self.popsize < 2 or self.popsize % 2:
            p = self.popsize if isinstance(self.popsize, int) else 2
            raise ValueError(
                f"optimizer.popsize must be even and >= 2 for antithetic sampling, got {self.popsize!r}; "
                f"use {_even_choices(p)}"
            )
        check_positive("sigma_init", self.sigma_init)
        check_positive("sigma_min", self.sigma_min)
        if self.sigma_lr < 0:
            raise ValueError(f"optimizer.sigma_lr must be >= 0, got {self.sigma_lr}")
        if self.sigma_max_change is not None and not 0 < self.sigma_max_change <= 1:
            raise ValueError(
                f"optimizer.sigma_max_change must lie in (0, 1] or be null (unbounded), got {self.sigma_max_change}"
            )
        if not self.sigma_min <= self.sigma_init <= self.sigma_max:
            raise ValueError(
                f"optimizer.sigma_init={self.sigma_init} must lie in [sigma_min, sigma_max] = "
                f"[{self.sigma_min}, {self.sigma_max}]; change one of the three"
            )
        if self.popsize // 2 > 1 << 22:
            raise ValueError(
                f"optimizer.popsize={self.popsize} exceeds 2**23, the fixed-point headroom of the "
                "exact PGPE sums; use a smaller population"
            )
        check_params(self)
        check_shaping(self.fitness_shaping)
        schemes.check_scheme(self.noise)
        if self.control_variate not in CONTROL_VARIATES:
            raise ValueError(
                f"optimizer.control_variate must be one of {list(CONTROL_VARIATES)}, got {self.control_variate!r}"
            )
        if self.control_variate != "none" and self.fitness_shaping != "raw":
            raise ValueError(
                f"optimizer.control_variate={self.control_variate!r} subtracts a term linear in the losses, "
                f"which fitness shaping {self.fitness_shaping!r} is not: set optimizer.fitness_shaping=raw "
                "(the step rule normalises the scale) or optimizer.control_variate=none"
            )
        if self.cv_rate is not None and (isinstance(self.cv_rate, bool) or not 0 < self.cv_rate <= 1):
            raise ValueError(f"optimizer.cv_rate must lie in (0, 1] or be null (n/(n + D)), got {self.cv_rate!r}")
