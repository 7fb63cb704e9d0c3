"""Typed run configuration: nested frozen dataclasses loaded from YAML, with ``--set`` overrides.

Precedence: ``--set section.key=value`` > YAML file > defaults. Unknown keys, wrong types and
impossible values raise ``ConfigError`` (a ValueError) with the offending key, the value given,
what is allowed and how to fix it. Each field's ``help`` metadata is the documentation shown by
``mpigls config`` (``--markdown``: the table in docs/guide/configuration.md). Derived quantities are properties, never fields.

The ``optimizer`` section is not written here: it is built from the chosen optimizer's own Params
class (``mpigls.optim.registry``; one default, one validation, one help text per key) plus the
loop's keys (``optim.unit.LoopParams``). Configs stored in checkpoints by older versions hold
every optimizer's keys: read them through ``stored_config``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mpigls.optim import registry as optimizers
from mpigls.optim.params import LoopParams, help_of, param
from mpigls.optim.schedules import EPS_SCHEDULES

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "BoundConfig",
    "OptimizerConfig",
    "TrainConfig",
    "EvalConfig",
    "TrackConfig",
    "Config",
    "load_config",
    "from_dict",
    "to_dict",
    "stored_config",
    "optimizer_keys",
    "apply_overrides",
    "describe",
    "short_repr",
    "yaml_load",
]


class ConfigError(ValueError):
    """A user error in a configuration file or override."""


_f = param  # a field with its one default and its help text


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: error messages never print an unbounded value."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 15]}... ({len(text)} chars)"


def short_text(text: str, limit: int = 600) -> str:
    """``text`` unquoted, cut at a word boundary to about ``limit`` characters with a note of its length
    (ordinary messages stay whole; only an unbounded value is cut)."""
    if len(text) <= limit:
        return text
    head = text[: limit - 30].rsplit(" ", 1)[0]
    return f"{head} … ({len(text)} characters in all)"


MAX_VALUE_LEN = 4096  # no config value (a name, a path, a list of milestones) is longer
MAX_SEED = 2**63 - 1  # torch.manual_seed and the noise keys take any integer in [0, 2**63 - 1]


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    name: str = _f("digits", "dataset: digits (scikit-learn, offline default), mnist, cifar10, tinyimagenet, synthetic")
    root: str | None = _f(None, "directory holding the dataset files (required for mnist, cifar10, tinyimagenet)")
    num_train: int | None = _f(None, "use only the first N training examples (null: all)")
    num_test: int | None = _f(None, "use only the first N test examples (null: all)")
    augment: str = _f(
        "auto", "augmentation: auto (cifar-style for cifar10/tinyimagenet, none otherwise), none, flip, cifar"
    )
    download: bool = _f(
        False,
        "download mnist or cifar10 into data.root when missing (rank 0, torchvision's downloader and "
        "checksums; the other ranks wait); false: a missing dataset is an error",
    )
    val_size: int = _f(
        0,
        "validation split: this many training examples, drawn by data.val_seed, are held out of training "
        "for the live validation (eval.every) and model selection (0: none; then eval.every uses the test set)",
    )
    val_seed: int = _f(0, "seed of the validation split (independent of train.seed: one split for every run)")

    def __post_init__(self):
        from mpigls.data import AUGMENTATIONS, DATASETS

        _require(self.name in DATASETS, f"data.name must be one of {list(DATASETS)}, got {self.name!r}")
        _require(
            self.augment in ("auto", *AUGMENTATIONS),
            f"data.augment must be one of {['auto', *AUGMENTATIONS]}, got {self.augment!r}",
        )
        if self.name in ("mnist", "cifar10", "tinyimagenet"):
            _require(
                self.root is not None,
                f"data.root is required for data.name={self.name!r}: set it to the directory holding the "
                f"dataset, e.g. --set data.root=/scratch/datasets",
            )
        _require(
            not self.download or self.name in ("mnist", "cifar10", "digits", "synthetic"),
            f"data.download=true can fetch mnist and cifar10, not data.name={self.name!r}; place the "
            f"{self.name} files under data.root by hand and set data.download=false",
        )
        for key in ("num_train", "num_test"):
            value = getattr(self, key)
            _require(value is None or value > 0, f"data.{key} must be positive or null, got {value}")
        _require(self.val_size >= 0, f"data.val_size must be >= 0 (0: no validation split), got {self.val_size}")
        _require(
            0 <= self.val_seed <= MAX_SEED,
            f"data.val_seed must be an integer in [0, 2**63 - 1], got {short_repr(self.val_seed, 40)}",
        )


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name: str = _f(
        "cnn3", "architecture: cnn3, cnn5 (paper Table 4), cnn7, mlp, mlp-tiny, or package.module:function (your own)"
    )
    init_from: str | None = _f(
        None,
        "warm start: an mpigls checkpoint (.h5), ONNX file (.onnx) or PyTorch state dict (.pt) of "
        "model.name whose weights initialise training (the paper starts PGPE from a PGD-trained network)",
    )

    def __post_init__(self):
        from mpigls.nn.models import ARCHITECTURES, is_custom

        _require(
            self.name in ARCHITECTURES or is_custom(self.name),
            f"model.name must be one of {list(ARCHITECTURES)} or a network of your own as 'package.module:function' "
            f"(a function returning a torch.nn.Sequential: see mpigls.nn.models), got {self.name!r}",
        )


# the bound methods that are sound over the whole eps box (mpigls.bounds.SOUND_METHODS; the config
# names them without importing the bounds engine, and tests/test_registry.py keeps the two equal)
CERTIFY_METHODS = ("ibp", "hbox", "crown-ibp", "deeppoly", "crown", "alpha-crown")
BOUND_METHODS = ("ibp", "hbox", "crown-ibp", "deeppoly", "crown", "alpha-crown", "sabr", "staps", "pgd", "natural")


@dataclass(frozen=True, kw_only=True)
class BoundConfig:
    method: str = _f(
        "ibp", "training loss: ibp, hbox, crown-ibp, deeppoly (= crown), alpha-crown, sabr, staps, pgd, natural"
    )
    eps: float = _f(0.1, "l_inf radius in pixel space ([0, 1] images)")
    eps_schedule: str = _f(
        "smooth", "eps annealing per batch: " + ", ".join(EPS_SCHEDULES) + " (smooth: polynomial then linear)"
    )
    eps_start: float = _f(0.0, "eps at the start of annealing")
    warmup_epochs: float = _f(0.0, "epochs at eps_start before annealing begins")
    anneal_epochs: float = _f(0.0, "epochs over which eps grows from eps_start to eps (0: no annealing)")
    options: dict = _f(
        {}, "method-specific options passed to the bound engine (e.g. memory_budget_mb, sabr_lambda, alpha_steps)"
    )

    def __post_init__(self):
        _require(
            self.method in BOUND_METHODS, f"bound.method must be one of {list(BOUND_METHODS)}, got {self.method!r}"
        )
        _require(
            0 <= self.eps <= 1,
            f"bound.eps must lie in [0, 1], got {self.eps}; eps is an l_inf radius in "
            f"[0, 1] pixel space (MNIST papers use 0.1 or 0.3, CIFAR-10 2/255 = 0.0078)",
        )
        _require(
            0 <= self.eps_start <= max(self.eps, 0.0) or self.eps_start == 0,
            f"bound.eps_start must lie in [0, bound.eps={self.eps}], got {self.eps_start}",
        )
        _require(
            self.eps_schedule in EPS_SCHEDULES,
            f"bound.eps_schedule must be one of {list(EPS_SCHEDULES)}, got {self.eps_schedule!r}",
        )
        _require(
            self.warmup_epochs >= 0 and self.anneal_epochs >= 0,
            f"bound.warmup_epochs and bound.anneal_epochs must be >= 0, got {self.warmup_epochs}, {self.anneal_epochs}",
        )


@dataclass(frozen=True)
class OptimizerConfig:
    """The ``optimizer`` section: ``name`` + the loop's keys (``optim.unit.LoopParams``) + the chosen
    optimizer's own Params fields, flat in YAML and on ``--set`` (``optimizer.lr=1e-3``).

    Nothing here repeats an optimizer's field: defaults, validation and help come from its Params
    class (registered in ``mpigls.optim.registry``). ``cfg.optimizer.popsize`` reads the Params
    field; a key the chosen optimizer does not have is a ConfigError naming its valid keys.
    """

    name: str = "pgpe"
    loop: LoopParams = field(default_factory=LoopParams)
    params: Any = None  # the chosen optimizer's frozen Params (None: its defaults)

    def __post_init__(self):
        _require(
            self.name in optimizers.OPTIMIZERS,
            f"optimizer.name must be one of {list(optimizers.OPTIMIZERS)}, got {short_repr(self.name)}",
        )
        if self.params is None:
            object.__setattr__(self, "params", optimizers.params_of(self.name)())

    def __getattr__(self, key: str) -> Any:  # only called when normal lookup fails: the flat keys
        if key.startswith("__"):
            raise AttributeError(key)
        for part in ("loop", "params"):
            obj = self.__dict__.get(part)
            if obj is not None and key in {f.name for f in dataclasses.fields(obj)}:
                return getattr(obj, key)
        raise AttributeError(f"optimizer {self.__dict__.get('name')!r} has no key {key!r}")

    def keys(self) -> list[str]:
        """The valid keys of this section for the chosen optimizer, in documentation order."""
        return optimizer_keys(self.name)

    def to_dict(self) -> dict:
        return {"name": self.name, **dataclasses.asdict(self.loop), **dataclasses.asdict(self.params)}


def optimizer_keys(name: str) -> list[str]:
    """``name`` + LoopParams fields + the Params fields of optimizer ``name``."""
    return (
        ["name"]
        + [f.name for f in dataclasses.fields(LoopParams)]
        + [f.name for f in dataclasses.fields(optimizers.params_of(name))]
    )


def _build_optimizer(values: Any, path: str) -> OptimizerConfig:
    if not isinstance(values, dict):
        raise ConfigError(f"config section {path} must be a mapping, got {type(values).__name__}")
    name = values.get("name", OptimizerConfig.name)
    if name not in optimizers.OPTIMIZERS:
        raise ConfigError(f"{path}.name must be one of {list(optimizers.OPTIMIZERS)}, got {short_repr(name)}")
    params_cls = optimizers.params_of(name)
    loop_names = {f.name for f in dataclasses.fields(LoopParams)}
    own = {f.name for f in dataclasses.fields(params_cls)}
    unknown = [k for k in values if k != "name" and k not in loop_names and k not in own]
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {short_repr(unknown)}{_key_hints(unknown, optimizer_keys(name), True)} in section "
            f"'{path}' for optimizer {name!r}; its valid keys are {optimizer_keys(name)}"
        )
    loop = _build(LoopParams, {k: v for k, v in values.items() if k in loop_names}, path)
    params = _build(params_cls, {k: v for k, v in values.items() if k in own}, path)
    return OptimizerConfig(name, loop, params)


def stored_config(values: dict) -> dict:
    """A config dict stored in a checkpoint, made loadable by ``from_dict``: configs written before
    the optimizer section was built from the optimizers' Params hold every optimizer's keys; the
    ones the stored optimizer does not own are dropped (only here: a user's YAML is never trimmed)."""
    if not isinstance(values, dict) or not isinstance(values.get("optimizer"), dict):
        return values
    opt = values["optimizer"]
    name = opt.get("name", OptimizerConfig.name)
    if name not in optimizers.OPTIMIZERS:
        return values
    keep = set(optimizer_keys(name))
    # a key added later (optimizer.batch_chunks, optimizer.noise) is absent from older configs: they
    # ran with its default (a new key's default keeps the old behaviour)
    defaults = {**to_dict(LoopParams()), **to_dict(optimizers.params_of(name)())}
    added = {k: v for k, v in defaults.items() if k not in opt}
    return {**values, "optimizer": {**{k: v for k, v in opt.items() if k in keep}, **added}}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    epochs: float = _f(10, "training length in epochs (one generation = one minibatch)")
    batch_size: int = _f(128, "minibatch size; every rank draws the same minibatch")
    seed: int = _f(0, "seed of everything: init, batch order, noise (never changed per rank)")
    checkpoint_every: int = _f(
        50, "generations between checkpoints (one is always written at the end and on a stop signal)"
    )
    keep_last: int = _f(3, "checkpoints kept in the output directory")
    log_every: int = _f(10, "generations between log lines on rank 0")
    consistency_every: int = _f(100, "generations between cross-rank theta hash checks (0: off)")
    lock_stale_s: float = _f(
        3600.0,
        "seconds without a heartbeat after which another run takes over the run-directory lock "
        "(a dead process on the same host is taken over at once; 0: only then)",
    )
    hang_timeout: float = _f(
        0.0,
        "seconds a generation may take (at least; 10x the recent median if longer) before the "
        "hang watchdog names the ranks that have not arrived (0: off)",
    )
    hang_abort: bool = _f(True, "the watchdog also ends the job, exit code 4 (requeue resumes it)")
    max_skipped_steps: int = _f(
        20,
        "consecutive skipped steps (every loss or the gradient non-finite) "
        "before the run stops with an error (0: never stop)",
    )
    device: str = _f("auto", "auto (GPU by node-local rank if available), cpu or cuda")
    deterministic: bool = _f(
        True,
        "deterministic GPU kernels (torch.use_deterministic_algorithms, cuDNN "
        "deterministic, no benchmark): same command, same GPU model -> same theta bits; "
        "false may be faster on GPU but runs differ in the last bits",
    )
    tf32: bool = _f(
        False,
        "allow TF32 matmuls/convolutions on GPU during training (faster, ~1e-3 relative "
        "rounding); certificates are always recomputed in true fp32",
    )
    threads: int | None = _f(
        None,
        "torch CPU threads per rank (null: cores per node / ranks per node); "
        "bitwise world-size invariance on CPU needs the same value for every run",
    )
    fake_nodes: int | None = _f(
        None, "split ranks into this many simulated nodes (testing node-level code on one machine)"
    )
    progress: bool = _f(True, "progress bar on rank 0 when attached to a terminal")

    def __post_init__(self):
        _require(self.epochs > 0, f"train.epochs must be > 0, got {self.epochs}")
        _require(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        _require(
            0 <= self.seed <= MAX_SEED,
            f"train.seed must be an integer in [0, 2**63 - 1], got {short_repr(self.seed, 40)}; use e.g. 0 or 12345",
        )
        _require(self.checkpoint_every >= 1, f"train.checkpoint_every must be >= 1, got {self.checkpoint_every}")
        _require(self.keep_last >= 1, f"train.keep_last must be >= 1, got {self.keep_last}")
        _require(self.max_skipped_steps >= 0, f"train.max_skipped_steps must be >= 0, got {self.max_skipped_steps}")
        _require(self.log_every >= 1, f"train.log_every must be >= 1, got {self.log_every}")
        _require(self.consistency_every >= 0, f"train.consistency_every must be >= 0, got {self.consistency_every}")
        _require(self.lock_stale_s >= 0, f"train.lock_stale_s must be >= 0 seconds, got {self.lock_stale_s}")
        _require(self.hang_timeout >= 0, f"train.hang_timeout must be >= 0 seconds (0: off), got {self.hang_timeout}")
        _require(self.device in ("auto", "cpu", "cuda"), f"train.device must be auto, cpu or cuda, got {self.device!r}")
        _require(self.threads is None or self.threads >= 1, f"train.threads must be >= 1 or null, got {self.threads}")
        _require(
            self.fake_nodes is None or self.fake_nodes >= 1,
            f"train.fake_nodes must be >= 1 or null, got {self.fake_nodes}",
        )


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    methods: list = _f(
        ["ibp", "deeppoly"], "bound methods used to certify at the end of training and by `mpigls certify`"
    )
    num_test: int | None = _f(None, "certify only the first N test examples (null: all)")
    batch_size: int = _f(100, "test examples per bound call")
    pgd_steps: int = _f(20, "PGD steps of the empirical robustness attack (0: skip)")
    every: int = _f(0, "generations between validation evaluations during training, stored as val/* metrics (0: off)")
    num_val: int = _f(
        256,
        "validation subset for eval.every: the first N examples of the validation split (data.val_size > 0), "
        "else of the test set (fixed for the whole run)",
    )

    def __post_init__(self):
        _require(
            bool(self.methods) and len(set(map(str, self.methods))) == len(self.methods),
            f"eval.methods must name each bound method once, at least one, got {short_repr(self.methods)}; e.g. "
            "[ibp, deeppoly] (to skip the final certification, pass --no-eval to mpigls train)",
        )
        bad = [m for m in self.methods if m not in CERTIFY_METHODS]
        _require(
            not bad,
            f"eval.methods entries must be sound bound methods, among {list(CERTIFY_METHODS)}, "
            f"got {short_repr(bad)} (sabr bounds only a small box: a training loss, not a certificate)",
        )
        _require(
            self.num_test is None or self.num_test >= 1,
            f"eval.num_test must be >= 1 or null (all test examples), got {self.num_test}",
        )
        _require(self.batch_size >= 1, f"eval.batch_size must be >= 1, got {self.batch_size}")
        _require(self.pgd_steps >= 0, f"eval.pgd_steps must be >= 0, got {self.pgd_steps}")
        _require(self.every >= 0, f"eval.every must be >= 0 (0: no validation during training), got {self.every}")
        _require(self.num_val >= 1, f"eval.num_val must be >= 1, got {self.num_val}")


WANDB_MODES = ("offline", "online")


@dataclass(frozen=True, kw_only=True)
class TrackConfig:
    tensorboard: bool = _f(
        False, "write TensorBoard event files to OUT/tensorboard (rank 0; pip install mpigls[tensorboard])"
    )
    wandb: bool = _f(False, "log to Weights & Biases, files under OUT/wandb (rank 0; pip install mpigls[wandb])")
    wandb_mode: str = _f(
        "offline", "W&B mode: offline (no network or account; upload later with `wandb sync`) or online"
    )
    wandb_project: str = _f("mpigls", "W&B project")
    wandb_entity: str | None = _f(None, "W&B entity, a user or team (null: the account's default)")
    wandb_name: str | None = _f(None, "W&B run name (null: the name of the output directory)")

    def __post_init__(self):
        _require(
            self.wandb_mode in WANDB_MODES,
            f"track.wandb_mode must be one of {list(WANDB_MODES)}, got {short_repr(self.wandb_mode)}",
        )
        _require(bool(self.wandb_project.strip()), "track.wandb_project must not be empty; use e.g. mpigls")


@dataclass(frozen=True, kw_only=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    bound: BoundConfig = field(default_factory=BoundConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    track: TrackConfig = field(default_factory=TrackConfig)


def _type_ok(value: Any, annotation: Any) -> tuple[bool, Any]:
    """Check (and mildly coerce: int -> float) ``value`` against a field annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(annotation):
            return True, None
        for arg in typing.get_args(annotation):
            if arg is not type(None):
                ok, coerced = _type_ok(value, arg)
                if ok:
                    return True, coerced
        return False, value
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation in (str, bool, list, dict):
        return isinstance(value, annotation), value
    return True, value


def _type_name(annotation: Any) -> str:
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _check_meaningful(key: str, value: Any) -> None:
    """Refuse values that pass the type check but cannot mean what a user intends: an empty or
    blank string (null is the way to ask for a key's default), a string with a NUL byte (no path
    or name holds one), an integer beyond 64 bits (no count or seed is that large)."""
    if isinstance(value, str) and not value.strip():
        raise ConfigError(
            f"config key {key} is an empty string ({value!r}); give a value, or write null (or leave the key "
            "out) for its default"
        )
    if isinstance(value, str) and "\x00" in value:
        raise ConfigError(f"config key {key} contains a NUL byte ({short_repr(value, 60)}); no name or path holds one")
    if isinstance(value, int) and not isinstance(value, bool) and not -MAX_SEED - 1 <= value <= MAX_SEED:
        raise ConfigError(
            f"config key {key} is {short_repr(value, 40)}, beyond the 64-bit integers: every count and seed "
            "lies in [0, 2**63 - 1]; use a realistic value"
        )


def did_you_mean(word: Any, choices: Any) -> str | None:
    """The closest of ``choices`` to ``word`` (difflib, as for the recipe names), or None."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return close[0] if close else None


def _key_hints(unknown: list, valid: list, optimizer: bool = False) -> str:
    """`` (popsize: a key of pgpe; epoch: did you mean 'epochs'?)`` for unknown keys, or ``""``."""
    hints = []
    for key in unknown[:5]:
        owners = [n for n in optimizers.OPTIMIZERS if key in optimizer_keys(n)] if optimizer else []
        close = did_you_mean(key, valid)
        if owners:
            hints.append(f"{key}: a key of {', '.join(owners)}")
        elif close:
            hints.append(f"{key}: did you mean {close!r}?")
    return f" ({'; '.join(hints)})" if hints else ""


def _build(cls: type, values: dict, path: str) -> Any:
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(values, dict):
        raise ConfigError(f"config section {path or 'top level'} must be a mapping, got {type(values).__name__}")
    unknown = [k for k in values if k not in valid]
    if unknown:
        where = f"section '{path}'" if path else "the top level"
        raise ConfigError(
            f"unknown config key(s) {short_repr(unknown)}{_key_hints(unknown, valid)} in {where}; valid keys "
            f"are {valid}"
        )
    kwargs = {}
    for name, value in values.items():
        annotation = hints[name]
        key = f"{path}.{name}" if path else name
        if annotation is OptimizerConfig:
            kwargs[name] = _build_optimizer(value or {}, key)
            continue
        if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, value or {}, key)
            continue
        if isinstance(value, (str, list, dict)) and len(value) > MAX_VALUE_LEN:
            raise ConfigError(
                f"config key {key} has a {type(value).__name__} value of length {len(value)} "
                f"({short_repr(value, 60)}); values longer than {MAX_VALUE_LEN} are refused"
            )
        ok, coerced = _type_ok(value, annotation)
        if not ok:
            hint = ""
            if isinstance(value, float) and math.isfinite(value) and value == int(value):
                hint = f"; write it as a whole number, e.g. {int(value)}"
            raise ConfigError(
                f"config key {key} must be of type {_type_name(annotation)}, got {short_repr(value)} "
                f"({type(value).__name__}){hint}"
            )
        if isinstance(coerced, float) and not math.isfinite(coerced):
            raise ConfigError(f"config key {key} must be a finite number, got {coerced}")
        _check_meaningful(key, coerced)
        kwargs[name] = coerced
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        if str(exc).startswith(f"{path}."):  # an optimizer's validation: it names the key already
            raise ConfigError(str(exc)[:600]) from None
        raise ConfigError(f"invalid config section '{path}': {short_repr(str(exc), 300)}") from None


def from_dict(values: dict) -> Config:
    """Build and validate a Config from a (YAML-shaped) nested dict."""
    return _build(Config, values or {}, "")


def to_dict(cfg: Any) -> dict:
    """A config (or one section) as the nested dict of its YAML form (the optimizer section flat)."""
    if isinstance(cfg, OptimizerConfig):
        return cfg.to_dict()
    return {
        f.name: to_dict(getattr(cfg, f.name))
        if dataclasses.is_dataclass(getattr(cfg, f.name))
        else copy.deepcopy(getattr(cfg, f.name))
        for f in dataclasses.fields(cfg)
    }


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (the keys ``--set`` takes)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and key != "options":
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# keys that change how a run executes but not what it computes (on CPU the thread count can change
# the last bits), or that only matter at the start of a run
RUNTIME_KEYS = frozenset(
    {
        "model.init_from",
        "data.download",
        "train.threads",
        "train.progress",
        "train.log_every",
        "train.device",
        "train.fake_nodes",
        "train.checkpoint_every",
        "train.keep_last",
        "train.consistency_every",
        "train.lock_stale_s",
        "train.hang_timeout",
        "train.hang_abort",
        "train.max_skipped_steps",
        "train.epochs",
    }
)


def changed_keys(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """Keys (dotted) whose value differs between two config dicts and changes the computation:
    ``{key: (old, new)}``, eval.*, track.* and RUNTIME_KEYS left out. A key the old config does not
    have (it was stored by a version without that key) is no change when the new value is the key's
    default: the default is what the older version did."""
    a, b = flatten(old), flatten(new)
    missing = set(b) - set(a)
    opt = {"optimizer": {"name": b["optimizer.name"]}} if "optimizer.name" in b else {}
    defaults = flatten(to_dict(from_dict(opt))) if missing else {}
    return {
        k: (a.get(k), b.get(k))
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
        and k not in RUNTIME_KEYS
        and not k.startswith(("eval.", "track."))
        and not (k in missing and k in defaults and b[k] == defaults[k])
    }


class _ConfigLoader(yaml.SafeLoader):
    """YAML for configs: PyYAML's safe loader with three changes.

    * Anchors and aliases are refused: a config never needs them, and nested aliases expand
      exponentially (a few hundred bytes can stand for gigabytes: the "billion laughs").
    * A key given twice in one mapping is refused instead of silently keeping the last value.
    * Every float spelling a user types is a float, as in YAML 1.2: ``1e-3``, ``5E4``, ``1.5e3``
      (PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent, so ``1e-3``
      would be the *string* "1e-3").
    """

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            kind = "alias *" if isinstance(event, yaml.AliasEvent) else "anchor &"
            raise ConfigError(
                f"{self._source} uses the YAML {kind}{short_text(str(event.anchor), 40)} "
                f"({event.start_mark.line + 1 if event.start_mark else '?'}:"
                f"{event.start_mark.column + 1 if event.start_mark else '?'}); anchors and aliases are "
                "not allowed in mpigls configs (nested aliases can expand to gigabytes): write each "
                "value out in full"
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # reported by the base class as an unhashable key
                if key in seen:
                    raise ConfigError(
                        f"{self._source} gives the key {short_repr(key, 60)} twice in one mapping "
                        f"(lines {seen[key]} and {key_node.start_mark.line + 1}); keep only one"
                    )
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_ConfigLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def yaml_load(text: str, source: str = "the YAML text") -> Any:
    """Parse config YAML with ``_ConfigLoader``; ``source`` names the input in error messages."""
    loader = _ConfigLoader(text)
    loader._source = source
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


MAX_CONFIG_BYTES = 1 << 20  # a config is a few hundred bytes; a bigger file is not one


def _parse_value(text: str) -> Any:
    try:
        return yaml_load(text, source=f"--set value {short_repr(text, 60)}")
    except yaml.YAMLError:
        return text


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a nested dict copy."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (values or {}).items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"--set key must look like section.key (e.g. optimizer.lr=1e-3), got {dotted!r}")
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {dotted}: {part!r} is not a section")
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = _parse_value(raw)
    return out


def switch_optimizer(values: dict, overrides: list[str]) -> tuple[dict, list[str]]:
    """``values`` (a config file's dict) without the optimizer keys that the optimizer named by an
    ``optimizer.name=...`` override does not have, and those keys: switching optimizers from the
    command line (``--set optimizer.name=rgs`` on a PGPE recipe) drops the file's keys of the other
    optimizer. Keys given by overrides are never dropped (a wrong one is refused), and a file that
    names its own optimizer keeps every key (a PGPE key beside ``name: rgs`` is refused)."""
    names = [item.split("=", 1)[1] for item in overrides if item.split("=", 1)[0].strip() == "optimizer.name"]
    section = values.get("optimizer")
    if not names or not isinstance(section, dict):
        return values, []
    new = _parse_value(names[-1])
    if not isinstance(new, str) or new not in optimizers.OPTIMIZERS or new == section.get("name", OptimizerConfig.name):
        return values, []
    keep = set(optimizer_keys(new))
    dropped = [k for k in section if k not in keep]
    return {**values, "optimizer": {k: v for k, v in section.items() if k in keep}}, dropped


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, note: typing.Callable[[str], None] | None = None
) -> Config:
    """Load YAML ``path`` (None: defaults only), apply overrides, validate. ``note(text)`` is told
    which keys of the file a change of optimizer on the command line dropped (``switch_optimizer``)."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        name = short_repr(str(path), 200)
        if not path.exists():
            raise FileNotFoundError(
                f"config file {name} does not exist; pass a YAML file such as configs/quickstart.yaml"
            )
        if path.is_dir():
            raise ConfigError(
                f"config path {name} is a directory, not a YAML file; pass a file such as configs/quickstart.yaml"
            )
        if not path.is_file():
            raise ConfigError(
                f"config path {name} is not a regular file (a device, pipe or socket); pass a YAML "
                "file such as configs/quickstart.yaml"
            )
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"config file {name} has {size} bytes, more than the {MAX_CONFIG_BYTES} a config may "
                "have (they are a few hundred bytes); check the path"
            )
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"config file {name} is not a UTF-8 text file (byte 0x{raw[exc.start]:02x} at offset "
                f"{exc.start}); pass a YAML config such as configs/quickstart.yaml"
            ) from None
        try:
            values = yaml_load(text, source=f"config file {name}") or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {name} is not valid YAML: {short_text(str(exc), 400)}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {name} must contain a mapping of sections, got {type(values).__name__}")
    values, dropped = switch_optimizer(values, overrides or [])
    cfg = from_dict(apply_overrides(values, overrides or []))
    if dropped and note is not None:
        kept = [k for k in values["optimizer"] if k != "name"]
        note(
            f"note: optimizer.name={cfg.optimizer.name} from --set: the config file's optimizer keys "
            f"{dropped} belong to another optimizer and were dropped; kept the shared keys {kept}; set "
            f"{cfg.optimizer.name}'s own keys with --set optimizer.KEY=VALUE"
        )
    return cfg


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) rows for every key, for ``mpigls config`` and the docs' key table.

    The optimizer section lists ``name``, the loop keys, then every registered optimizer's Params
    fields once, each help text starting with the optimizers that own the key, e.g. "[pgpe, rgs]"."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        hint = hints[f.name]
        if hint is OptimizerConfig:
            rows += _describe_optimizer(key + ".")
        elif isinstance(hint, type) and dataclasses.is_dataclass(hint):
            rows += describe(hint, key + ".")
        else:
            rows.append((key, repr(_default(f)), f.metadata.get("help", "")))
    return rows


def _describe_optimizer(prefix: str) -> list[tuple[str, str, str]]:
    rows = [
        (
            f"{prefix}name",
            repr(OptimizerConfig.name),
            "the optimizer, one of "
            + ", ".join(optimizers.OPTIMIZERS)
            + " (mpigls.optim.registry); the keys marked [...] below belong to the optimizers named",
        )
    ]
    rows += [(f"{prefix}{f.name}", repr(_default(f)), help_of(f)) for f in dataclasses.fields(LoopParams)]
    owners: dict[str, list[str]] = {}
    fields: dict[str, dataclasses.Field] = {}
    for name in optimizers.names():
        for f in dataclasses.fields(optimizers.params_of(name)):
            owners.setdefault(f.name, []).append(name)
            fields.setdefault(f.name, f)
    for key, f in fields.items():
        defaults = {
            n: repr(_default(next(g for g in dataclasses.fields(optimizers.params_of(n)) if g.name == key)))
            for n in owners[key]
        }
        default = (
            next(iter(defaults.values()))
            if len(set(defaults.values())) == 1
            else ", ".join(f"{n}: {d}" for n, d in defaults.items())
        )
        who = "all" if len(owners[key]) == len(optimizers.OPTIMIZERS) else ", ".join(owners[key])
        rows.append((f"{prefix}{key}", default, f"[{who}] {help_of(f)}"))
    return rows
