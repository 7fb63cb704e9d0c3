"""Typed run configuration: nested frozen dataclasses loaded from YAML, with ``--set`` overrides.

Precedence: ``--set section.key=value`` > YAML file > defaults. Unknown keys, wrong types and
impossible values raise ``ConfigError`` (a ValueError) with the offending key, the value given,
what is allowed and how to fix it. Each field's ``help`` metadata is the documentation shown by
``mpigls train --help-config`` and in README. Derived quantities are properties, never fields.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ConfigError", "DataConfig", "ModelConfig", "BoundConfig", "OptimizerConfig",
           "TrainConfig", "EvalConfig", "Config", "load_config", "from_dict", "to_dict",
           "apply_overrides", "describe", "short_repr", "yaml_load"]


class ConfigError(ValueError):
    """A user error in a configuration file or override."""


def _f(default: Any, help: str, **kw) -> Any:  # noqa: A002 - mirrors argparse naming
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: error messages never print an unbounded value."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 15]}... ({len(text)} chars)"


MAX_VALUE_LEN = 4096  # no config value (a name, a path, a list of milestones) is longer
MAX_SEED = 2**63 - 1  # torch.manual_seed and the noise keys take any integer in [0, 2**63 - 1]


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    name: str = _f("digits", "dataset: digits (scikit-learn, offline default), mnist, cifar10, tinyimagenet, synthetic")
    root: str | None = _f(None, "directory holding the dataset files (required for mnist, cifar10, tinyimagenet)")
    num_train: int | None = _f(None, "use only the first N training examples (null: all)")
    num_test: int | None = _f(None, "use only the first N test examples (null: all)")
    augment: str = _f("auto", "augmentation: auto (cifar-style for cifar10/tinyimagenet, none otherwise), none, flip, cifar")

    def __post_init__(self):
        names = ("digits", "mnist", "cifar10", "tinyimagenet", "synthetic")
        _require(self.name in names, f"data.name must be one of {list(names)}, got {self.name!r}")
        _require(self.augment in ("auto", "none", "flip", "cifar"),
                 f"data.augment must be auto, none, flip or cifar, got {self.augment!r}")
        if self.name in ("mnist", "cifar10", "tinyimagenet"):
            _require(self.root is not None,
                     f"data.root is required for data.name={self.name!r}: set it to the directory holding the "
                     f"dataset, e.g. --set data.root=/scratch/datasets")
        for key in ("num_train", "num_test"):
            value = getattr(self, key)
            _require(value is None or value > 0, f"data.{key} must be positive or null, got {value}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name: str = _f("cnn3", "architecture: cnn3, cnn5 (paper Table 4), cnn7, mlp, mlp-tiny")
    init_from: str | None = _f(None, "warm start: path of an mpigls checkpoint whose theta initialises training "
                                     "(the paper starts PGPE from a PGD-trained network)")

    def __post_init__(self):
        from .models import ARCHITECTURES
        _require(self.name in ARCHITECTURES, f"model.name must be one of {list(ARCHITECTURES)}, got {self.name!r}")


# the bound methods that are sound over the whole eps box (mpigls.bounds.SOUND_METHODS; a test
# keeps the two equal without importing torch here)
CERTIFY_METHODS = ("ibp", "hbox", "crown-ibp", "deeppoly", "crown", "alpha-crown")
BOUND_METHODS = ("ibp", "hbox", "crown-ibp", "deeppoly", "crown", "alpha-crown", "sabr", "staps", "pgd", "natural")


@dataclass(frozen=True, kw_only=True)
class BoundConfig:
    method: str = _f("ibp", "training loss: ibp, hbox, crown-ibp, deeppoly (= crown), alpha-crown, sabr, staps, pgd, natural")
    eps: float = _f(0.1, "l_inf radius in pixel space ([0, 1] images)")
    eps_schedule: str = _f("smooth", "eps annealing per batch: constant, linear, smooth (polynomial then linear)")
    eps_start: float = _f(0.0, "eps at the start of annealing")
    warmup_epochs: float = _f(0.0, "epochs at eps_start before annealing begins")
    anneal_epochs: float = _f(0.0, "epochs over which eps grows from eps_start to eps (0: no annealing)")
    options: dict = _f({}, "method-specific options passed to the bound engine (e.g. memory_budget_mb, "
                           "sabr_lambda, alpha_steps)")

    def __post_init__(self):
        _require(self.method in BOUND_METHODS, f"bound.method must be one of {list(BOUND_METHODS)}, got {self.method!r}")
        _require(0 <= self.eps <= 1, f"bound.eps must lie in [0, 1], got {self.eps}; eps is an l_inf radius in "
                                     f"[0, 1] pixel space (MNIST papers use 0.1 or 0.3, CIFAR-10 2/255 = 0.0078)")
        _require(0 <= self.eps_start <= max(self.eps, 0.0) or self.eps_start == 0,
                 f"bound.eps_start must lie in [0, bound.eps={self.eps}], got {self.eps_start}")
        _require(self.eps_schedule in ("constant", "linear", "smooth"),
                 f"bound.eps_schedule must be constant, linear or smooth, got {self.eps_schedule!r}")
        _require(self.warmup_epochs >= 0 and self.anneal_epochs >= 0,
                 f"bound.warmup_epochs and bound.anneal_epochs must be >= 0, got {self.warmup_epochs}, {self.anneal_epochs}")


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    name: str = _f("pgpe", "pgpe (zeroth order GLS), rgs (first order GLS) or grad (plain backprop baseline)")
    lr: float = _f(3e-4, "learning rate of the centre (paper: 3e-4 for PGPE)")
    step_rule: str = _f("adam", "step rule of the centre: adam or clipup")
    beta1: float = _f(0.9, "Adam beta1")
    beta2: float = _f(0.999, "Adam beta2")
    adam_eps: float = _f(1e-8, "Adam epsilon")
    max_speed: float | None = _f(None, "ClipUp max speed (null: 2 * lr)")
    momentum: float = _f(0.9, "ClipUp momentum")
    weight_decay: float = _f(0.0, "decoupled weight decay on the centre")
    grad_clip: float | None = _f(10.0, "global-norm gradient clipping for grad/rgs (null: none)")
    lr_milestones: list = _f([], "epochs after which the lr is multiplied by lr_factor (paper PGPE: [110, 130])")
    lr_factor: float = _f(0.4, "lr decay factor at each milestone (paper: 0.4 PGPE, 0.2 GRAD)")
    popsize: int = _f(256, "PGPE population size, even (antithetic pairs); paper: 256")
    sigma_init: float = _f(1e-3, "initial per-parameter sigma of the Gaussian (PGPE and RGS); paper: 1e-3")
    sigma_lr: float = _f(0.0, "PGPE learning rate of sigma (0 with fixed_sigma)")
    sigma_max_change: float = _f(0.2, "PGPE bound on the relative change of sigma per step")
    sigma_min: float = _f(1e-6, "PGPE lower clamp of sigma")
    sigma_max: float = _f(1.0, "PGPE upper clamp of sigma")
    fixed_sigma: bool = _f(True, "keep sigma fixed (PGPE)")
    fitness_shaping: str = _f("centered_ranks", "PGPE fitness shaping: centered_ranks, normalized or raw")
    num_samples: int = _f(8, "RGS samples per step")
    antithetic: bool = _f(True, "RGS antithetic samples (pairs share +-z)")
    block_size: int = _f(8, "members (PGPE pairs, RGS samples) or examples (GRAD) per work block; blocks are the "
                            "unit of distribution, fixed so results do not depend on the number of ranks")

    def __post_init__(self):
        _require(self.name in ("pgpe", "rgs", "grad"), f"optimizer.name must be pgpe, rgs or grad, got {self.name!r}")
        _require(self.step_rule in ("adam", "clipup"), f"optimizer.step_rule must be adam or clipup, got {self.step_rule!r}")
        _require(self.lr > 0, f"optimizer.lr must be > 0, got {self.lr}")
        _require(0 <= self.beta1 < 1, f"optimizer.beta1 must lie in [0, 1), got {self.beta1}")
        _require(0 <= self.beta2 < 1, f"optimizer.beta2 must lie in [0, 1), got {self.beta2}")
        _require(self.adam_eps > 0, f"optimizer.adam_eps must be > 0, got {self.adam_eps}")
        _require(0 <= self.momentum < 1, f"optimizer.momentum must lie in [0, 1), got {self.momentum}")
        _require(self.max_speed is None or self.max_speed > 0, f"optimizer.max_speed must be > 0 or null, got {self.max_speed}")
        _require(self.weight_decay >= 0, f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")
        _require(self.sigma_lr >= 0, f"optimizer.sigma_lr must be >= 0, got {self.sigma_lr}")
        _require(self.popsize >= 2 and self.popsize % 2 == 0,
                 f"optimizer.popsize must be even and >= 2 for antithetic sampling, got {self.popsize}; "
                 f"use {max(2, self.popsize - 1 if self.popsize % 2 else self.popsize)} or {max(2, self.popsize + 1)}")
        _require(self.sigma_init > 0, f"optimizer.sigma_init must be > 0, got {self.sigma_init}")
        _require(0 < self.sigma_min <= self.sigma_init <= self.sigma_max,
                 f"optimizer sigma bounds must satisfy 0 < sigma_min <= sigma_init <= sigma_max, got "
                 f"{self.sigma_min}, {self.sigma_init}, {self.sigma_max}")
        _require(0 < self.sigma_max_change <= 1, f"optimizer.sigma_max_change must lie in (0, 1], got {self.sigma_max_change}")
        _require(self.fitness_shaping in ("centered_ranks", "normalized", "raw"),
                 f"optimizer.fitness_shaping must be centered_ranks, normalized or raw, got {self.fitness_shaping!r}")
        _require(self.num_samples >= 1, f"optimizer.num_samples must be >= 1, got {self.num_samples}")
        _require(not (self.antithetic and self.num_samples % 2),
                 f"optimizer.num_samples must be even with antithetic=true, got {self.num_samples}")
        _require(self.block_size >= 1, f"optimizer.block_size must be >= 1, got {self.block_size}")
        _require(all(isinstance(m, (int, float)) and not isinstance(m, bool) and 0 <= m < math.inf
                     for m in self.lr_milestones),
                 f"optimizer.lr_milestones must be a list of non-negative epochs, got {short_repr(self.lr_milestones)}")
        _require(list(self.lr_milestones) == sorted(self.lr_milestones),
                 f"optimizer.lr_milestones must be increasing, got {short_repr(self.lr_milestones)}")
        _require(0 < self.lr_factor <= 1, f"optimizer.lr_factor must lie in (0, 1], got {self.lr_factor}")
        _require(self.grad_clip is None or self.grad_clip > 0, f"optimizer.grad_clip must be > 0 or null, got {self.grad_clip}")

    @property
    def num_members(self) -> int:
        """Work items per generation that are distributed: PGPE pairs or RGS samples."""
        return self.popsize // 2 if self.name == "pgpe" else self.num_samples


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    epochs: float = _f(10, "training length in epochs (one generation = one minibatch)")
    batch_size: int = _f(128, "minibatch size; every rank draws the same minibatch")
    seed: int = _f(0, "seed of everything: init, batch order, noise (never changed per rank)")
    checkpoint_every: int = _f(50, "generations between checkpoints (one is always written at the end and on a stop signal)")
    keep_last: int = _f(3, "checkpoints kept in the output directory")
    log_every: int = _f(10, "generations between log lines on rank 0")
    consistency_every: int = _f(100, "generations between cross-rank theta hash checks (0: off)")
    max_skipped_steps: int = _f(20, "consecutive skipped steps (every loss or the gradient non-finite) "
                                    "before the run stops with an error (0: never stop)")
    device: str = _f("auto", "auto (GPU by node-local rank if available), cpu or cuda")
    deterministic: bool = _f(True, "deterministic GPU kernels (torch.use_deterministic_algorithms, cuDNN "
                                   "deterministic, no benchmark): same command, same GPU model -> same theta bits; "
                                   "false may be faster on GPU but runs differ in the last bits")
    tf32: bool = _f(False, "allow TF32 matmuls/convolutions on GPU during training (faster, ~1e-3 relative "
                           "rounding); certificates are always recomputed in true fp32")
    threads: int | None = _f(None, "torch CPU threads per rank (null: cores per node / ranks per node); "
                                   "bitwise world-size invariance on CPU needs the same value for every run")
    fake_nodes: int | None = _f(None, "split ranks into this many simulated nodes (testing node-level code on one machine)")
    progress: bool = _f(True, "progress bar on rank 0 when attached to a terminal")

    def __post_init__(self):
        _require(self.epochs > 0, f"train.epochs must be > 0, got {self.epochs}")
        _require(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        _require(0 <= self.seed <= MAX_SEED, f"train.seed must be an integer in [0, 2**63 - 1], got "
                                             f"{short_repr(self.seed, 40)}; use e.g. 0 or 12345")
        _require(self.checkpoint_every >= 1, f"train.checkpoint_every must be >= 1, got {self.checkpoint_every}")
        _require(self.keep_last >= 1, f"train.keep_last must be >= 1, got {self.keep_last}")
        _require(self.max_skipped_steps >= 0, f"train.max_skipped_steps must be >= 0, got {self.max_skipped_steps}")
        _require(self.log_every >= 1, f"train.log_every must be >= 1, got {self.log_every}")
        _require(self.consistency_every >= 0, f"train.consistency_every must be >= 0, got {self.consistency_every}")
        _require(self.device in ("auto", "cpu", "cuda"), f"train.device must be auto, cpu or cuda, got {self.device!r}")
        _require(self.threads is None or self.threads >= 1, f"train.threads must be >= 1 or null, got {self.threads}")
        _require(self.fake_nodes is None or self.fake_nodes >= 1, f"train.fake_nodes must be >= 1 or null, got {self.fake_nodes}")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    methods: list = _f(["ibp", "deeppoly"], "bound methods used to certify at the end of training and by `mpigls certify`")
    num_test: int | None = _f(None, "certify only the first N test examples (null: all)")
    batch_size: int = _f(100, "test examples per bound call")
    pgd_steps: int = _f(20, "PGD steps of the empirical robustness attack (0: skip)")
    every: int = _f(0, "generations between validation evaluations during training, stored as val/* metrics (0: off)")
    num_val: int = _f(256, "validation subset for eval.every: the first N test examples (fixed for the whole run)")

    def __post_init__(self):
        bad = [m for m in self.methods if m not in CERTIFY_METHODS]
        _require(not bad, f"eval.methods entries must be sound bound methods, among {list(CERTIFY_METHODS)}, "
                          f"got {short_repr(bad)} (sabr bounds only a small box: a training loss, not a certificate)")
        _require(self.num_test is None or self.num_test >= 1,
                 f"eval.num_test must be >= 1 or null (all test examples), got {self.num_test}")
        _require(self.batch_size >= 1, f"eval.batch_size must be >= 1, got {self.batch_size}")
        _require(self.pgd_steps >= 0, f"eval.pgd_steps must be >= 0, got {self.pgd_steps}")
        _require(self.every >= 0, f"eval.every must be >= 0 (0: no validation during training), got {self.every}")
        _require(self.num_val >= 1, f"eval.num_val must be >= 1, got {self.num_val}")


@dataclass(frozen=True, kw_only=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    bound: BoundConfig = field(default_factory=BoundConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


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


def _build(cls: type, values: dict, path: str) -> Any:
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(values, dict):
        raise ConfigError(f"config section {path or 'top level'} must be a mapping, got {type(values).__name__}")
    unknown = [k for k in values if k not in valid]
    if unknown:
        where = f"section '{path}'" if path else "the top level"
        raise ConfigError(f"unknown config key(s) {short_repr(unknown)} in {where}; valid keys are {valid}")
    kwargs = {}
    for name, value in values.items():
        annotation = hints[name]
        key = f"{path}.{name}" if path else name
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, value or {}, key)
            continue
        if isinstance(value, (str, list, dict)) and len(value) > MAX_VALUE_LEN:
            raise ConfigError(f"config key {key} has a {type(value).__name__} value of length {len(value)} "
                              f"({short_repr(value, 60)}); values longer than {MAX_VALUE_LEN} are refused")
        ok, coerced = _type_ok(value, annotation)
        if not ok:
            hint = ""
            if isinstance(value, float) and math.isfinite(value) and value == int(value):
                hint = f"; write it as a whole number, e.g. {int(value)}"
            raise ConfigError(f"config key {key} must be of type {_type_name(annotation)}, got {short_repr(value)} "
                              f"({type(value).__name__}){hint}")
        if isinstance(coerced, float) and not math.isfinite(coerced):
            raise ConfigError(f"config key {key} must be a finite number, got {coerced}")
        kwargs[name] = coerced
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid config section '{path}': {short_repr(str(exc), 300)}") from None


def from_dict(values: dict) -> Config:
    """Build and validate a Config from a (YAML-shaped) nested dict."""
    return _build(Config, values or {}, "")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


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
RUNTIME_KEYS = frozenset({"model.init_from", "train.threads", "train.progress", "train.log_every", "train.device",
                          "train.fake_nodes", "train.checkpoint_every", "train.keep_last",
                          "train.consistency_every", "train.max_skipped_steps", "train.epochs"})


def changed_keys(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """Keys (dotted) whose value differs between two config dicts and changes the computation:
    ``{key: (old, new)}``, eval.* and RUNTIME_KEYS left out."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in RUNTIME_KEYS and not k.startswith("eval.")}


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
            raise ConfigError(f"{self._source} uses the YAML {kind}{short_repr(event.anchor, 40)[1:-1]} "
                              f"({event.start_mark.line + 1 if event.start_mark else '?'}:"
                              f"{event.start_mark.column + 1 if event.start_mark else '?'}); anchors and aliases are "
                              "not allowed in mpigls configs (nested aliases can expand to gigabytes): write each "
                              "value out in full")
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
                    raise ConfigError(f"{self._source} gives the key {short_repr(key, 60)} twice in one mapping "
                                      f"(lines {seen[key]} and {key_node.start_mark.line + 1}); keep only one")
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_ConfigLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


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


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load YAML ``path`` (None: defaults only), apply overrides, validate."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        name = short_repr(str(path), 200)
        if not path.exists():
            raise FileNotFoundError(f"config file {name} does not exist; pass a YAML file such as configs/quickstart.yaml")
        if path.is_dir():
            raise ConfigError(f"config path {name} is a directory, not a YAML file; pass a file such as "
                              "configs/quickstart.yaml")
        if not path.is_file():
            raise ConfigError(f"config path {name} is not a regular file (a device, pipe or socket); pass a YAML "
                              "file such as configs/quickstart.yaml")
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {name} has {size} bytes, more than the {MAX_CONFIG_BYTES} a config may "
                              "have (they are a few hundred bytes); check the path")
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {name} is not a UTF-8 text file (byte 0x{raw[exc.start]:02x} at offset "
                              f"{exc.start}); pass a YAML config such as configs/quickstart.yaml") from None
        try:
            values = yaml_load(text, source=f"config file {name}") or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {name} is not valid YAML: {short_repr(str(exc), 400)[1:-1]}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {name} must contain a mapping of sections, got {type(values).__name__}")
    return from_dict(apply_overrides(values, overrides or []))


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) rows for every field, for --help-config and README."""
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            rows += describe(hint, key + ".")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((key, repr(default), f.metadata.get("help", "")))
    return rows
