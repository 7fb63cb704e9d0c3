"""Checks of a run before any training: one function that ``train`` and ``train --dry-run`` share.

``validate`` refuses (ConfigError, a ValueError: one paragraph, exit code 2) what the config
dataclasses cannot see alone because it depends on the data, the model or the machine:

* ``train.device=cuda`` without a GPU; ``train.threads`` above the CPU count; a ``track.*``
  tracker whose package is not installed;
* ``train.batch_size`` above the training set size; an ``optimizer.batch_chunks`` the loss cannot
  be split by (``work.check``);
* ``bound.options`` the bound method rejects (tried once on one training example);
* a ``model.init_from`` checkpoint, ONNX file or PyTorch state dict that is missing, unreadable,
  for another architecture or not finite (checked here for the dry run; ``train`` reads it where a fresh run starts);
* sizes the machine cannot hold: an estimate of the host memory of one generation
  (population-sized vectors, one work block's parameter rows and activations, optimizer state),
  times the ranks on this node, against the available memory (``MemAvailable`` and the cgroup
  limit), plus an explicit ``bound.options.memory_budget_mb`` of the CROWN-family bounds; on
  GPUs the work block's part is compared with the GPU memory instead. The estimate is
  deliberately low (IBP-sized activations, no allocator overhead), so it refuses only sizes that
  certainly do not fit, such as ``optimizer.popsize=1000000000``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from mpigls.config import Config, ConfigError, short_repr, short_text
from mpigls.interop import onnx_io, trackers
from mpigls.nn import models
from mpigls.numerics import noise
from mpigls.objectives import losses
from mpigls.parallel import work
from mpigls.run import checkpoint

__all__ = ["validate", "estimate_memory_bytes", "available_memory_bytes"]

GIB = float(1 << 30)
BUDGETED_METHODS = ("crown-ibp", "deeppoly", "crown", "alpha-crown")


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory_bytes() -> int | None:
    """Memory a new allocation can get on this node: MemAvailable, capped by a cgroup limit; None if unknown."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            pass
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < (1 << 60):
            found.append(max(0, limit - usage))
            break
    return min(found) if found else None


def _activations_per_example(model: torch.nn.Module, x1: torch.Tensor) -> int:
    """Sum of the output sizes of every layer for one example (a shape-only forward pass)."""
    total = 0

    def hook(_m, _i, out):
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out[0].numel() if out.dim() > 0 else 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            model(x1)
    finally:
        for h in handles:
            h.remove()
    return max(total, int(x1[0].numel()))


def estimate_memory_bytes(cfg: Config, num_params: int, acts_per_example: int) -> dict[str, float]:
    """A low estimate of one rank's host memory for one generation, by part (bytes)."""
    o, D, B = cfg.optimizer, num_params, cfg.train.batch_size
    if o.name == "pgpe":
        members, rows, batch = o.popsize, 2 * o.block_size, B
    elif o.name == "rgs":
        members, rows, batch = o.num_samples, o.block_size, B
    else:
        members, rows, batch = 1, 1, min(B, o.block_size)
    grads = 1 if o.name == "pgpe" else 2
    parts = {
        "population": members * 8.0 * 12,  # gathered float64 losses, shaping, masks, weights
        "block parameters": rows * D * 4.0 * 3 * grads,  # one block's parameter rows (+ noise, + gradients)
        "block activations": rows * batch * acts_per_example * 4.0 * 4 * grads,  # IBP-style lo/hi/centre/radius
        "optimizer state": D * 8.0 * 6,  # centre, sigma, moments, float64 accumulators
    }
    budget_mb = cfg.bound.options.get("memory_budget_mb")
    if cfg.bound.method in BUDGETED_METHODS and isinstance(budget_mb, (int, float)):
        # an explicit budget: back-substitution chunks grow up to it (the default is not counted:
        # small problems stay far below it)
        parts["bound memory_budget_mb"] = float(budget_mb) * 2**20
    return parts


def _check_memory(cfg: Config, model, dataset, comm) -> None:
    acts = _activations_per_example(model, dataset.train_x[:1])
    parts = estimate_memory_bytes(cfg, models.num_params(model), acts)
    ranks = max(1, getattr(comm, "local_size", 1))
    work = {"pgpe": "optimizer.popsize", "rgs": "optimizer.num_samples"}.get(cfg.optimizer.name, "train.batch_size")
    fix = (
        f"lower {work} (now {getattr(cfg.optimizer, work.split('.')[1], cfg.train.batch_size)}), "
        f"optimizer.block_size (now {cfg.optimizer.block_size}) or train.batch_size (now {cfg.train.batch_size}), "
        "or run fewer ranks per node"
    )
    host = dict(parts)
    if cfg.train.device != "cpu" and torch.cuda.is_available():  # the work blocks run on the GPUs
        block = sum(
            host.pop(k) for k in ("block parameters", "block activations", "bound memory_budget_mb") if k in host
        )
        gpus = torch.cuda.device_count()
        per_gpu = block * math.ceil(ranks / gpus)
        total = min(torch.cuda.get_device_properties(i).total_memory for i in range(gpus))
        if per_gpu > total:
            raise ConfigError(
                f"one work block needs at least about {per_gpu / GIB:.3g} GiB of GPU memory "
                f"({math.ceil(ranks / gpus)} rank(s) per GPU), more than the {total / GIB:.3g} GiB "
                f"of a GPU here; {fix}"
            )
    avail = available_memory_bytes()
    need = sum(host.values()) * ranks
    if avail is not None and need > avail:
        detail = ", ".join(f"{k} {v / GIB:.3g}" for k, v in host.items())
        raise ConfigError(
            f"this run needs at least about {need / GIB:.3g} GiB of memory per generation ({ranks} rank(s) on this "
            f"node, each: {detail} GiB), but only {avail / GIB:.3g} GiB are available; {fix}"
        )


def _check_bound_options(cfg: Config, model, dataset) -> None:
    opts = dict(cfg.bound.options)
    if cfg.bound.method in ("sabr", "staps", "pgd"):
        opts.setdefault("generator", noise.torch_generator(cfg.train.seed, noise.STREAM_ATTACK, 0))
    theta = models.flat_params(model)[None]
    x1, y1 = dataset.train_x[:1], dataset.train_y[:1]
    try:
        with models.private_rng():
            value = losses.certified_loss(model, x1, y1, cfg.bound.eps, cfg.bound.method, weights=theta, **opts)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"bound.options {short_repr(dict(cfg.bound.options), 200)} are not accepted by "
            f"bound.method={cfg.bound.method}: {short_text(str(exc))}"
        ) from None
    del value


def check_init_from(cfg: Config, arch: dict) -> checkpoint.Checkpoint | None:
    """The warm-start checkpoint (None if none): it exists, loads, fits the architecture, is finite.
    An ONNX file or PyTorch state dict (``onnx_io.IMPORT_SUFFIXES``) is imported as a generation-0
    checkpoint of the architecture; its layer shapes are checked against ``model.name``."""
    path = cfg.model.init_from
    if not path:
        return None
    if not Path(path).exists():
        raise FileNotFoundError(
            f"model.init_from {short_repr(path, 200)} does not exist; give an mpigls checkpoint "
            "(.h5), an ONNX file (.onnx) or a PyTorch state dict (.pt), or set model.init_from=null"
        )
    if onnx_io.foreign_kind(path) is not None:
        theta = onnx_io.load_foreign(path, arch)
        return checkpoint.Checkpoint(
            generation=0, epoch=0, batch_in_epoch=0, theta=theta, sigma=None, opt_state={}, config={}, arch=dict(arch)
        )
    warm = checkpoint.load(path)
    checkpoint.check_compatible(warm, arch, advice="use a checkpoint of the same model and data as the config")
    if not np.isfinite(warm.theta).all():
        raise ConfigError(
            f"model.init_from {short_repr(path, 200)} holds non-finite parameters (NaN/inf); use an earlier checkpoint"
        )
    return warm


def _check_control_variate(cfg: Config) -> None:
    """PGPE's "grad" control variate backpropagates through the bound: refuse one gradients do not reach."""
    o = cfg.optimizer
    if o.name != "pgpe" or o.control_variate != "grad":
        return
    from mpigls.bounds import registry

    if not registry.get(cfg.bound.method).differentiable:
        raise ConfigError(
            f"optimizer.control_variate=grad backpropagates through the bound, but bound.method="
            f"{cfg.bound.method!r} is not differentiable; use a zeroth-order control variate "
            "(optimizer.control_variate=previous or running) or none"
        )


def validate(cfg: Config, dataset, model, comm, *, arch: dict | None = None) -> None:
    """Every check of the module docstring; ``arch`` given: also check model.init_from (dry run)."""
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "train.device=cuda was requested but torch sees no CUDA GPU on this machine; use "
            "--set train.device=auto (a GPU when there is one) or cpu"
        )
    cores = os.cpu_count() or 1
    if cfg.train.threads is not None and cfg.train.threads > cores:
        raise ConfigError(
            f"train.threads={cfg.train.threads} is more than the {cores} CPU cores of this machine; "
            f"use at most {cores} (or null: cores per node / ranks per node)"
        )
    n_train = len(dataset.train_y)
    if cfg.train.batch_size > n_train:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is larger than the training set ({n_train} "
            "examples); lower train.batch_size or raise data.num_train"
        )
    try:
        work.check(cfg.optimizer.name, cfg.bound.method, cfg.optimizer.batch_chunks, cfg.train.batch_size)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    _check_control_variate(cfg)
    trackers.check_available(cfg)  # a missing tracker package: the error names its extra, on every rank
    if arch is not None:
        check_init_from(cfg, arch)
    _check_bound_options(cfg, model, dataset)
    _check_memory(cfg, model, dataset, comm)
