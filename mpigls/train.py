"""The training loop: ties data, population, bounds, optimizer, communication and checkpoints.

One generation = one minibatch (identical on every rank, from the shared seed). The distributed
work of a generation (PGPE pairs, RGS samples, GRAD examples) is cut into fixed-size blocks that
do not depend on the number of ranks; rank r evaluates a contiguous run of blocks. PGPE ranks
exchange their scalar losses, then one exact fixed-point sum of their own pairs'
noise-weighted sums (mpigls.pgpe_dist); RGS/GRAD ranks exchange per-block gradient rows through an
exact fixed-point sum. Every rank then applies the same pure optimizer update, so all ranks hold
bitwise identical state, for any world size (with the same threads per rank on CPU).

Shapes: P population, D parameters, B batch, K classes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, data, dist, losses, models, monitor, noise, pgpe_dist, precision, preflight, rundir, stopping
from .config import Config, changed_keys, to_dict
from .optim import grad as grad_opt, pgpe, rgs, schedules

__all__ = ["TrainResult", "train", "build_problem", "optimizer_module", "optimizer_params"]

_OPTIMIZERS = {"pgpe": pgpe, "rgs": rgs, "grad": grad_opt}


@dataclasses.dataclass(frozen=True)
class TrainResult:
    generation: int
    theta: torch.Tensor
    stopped_by_signal: bool
    checkpoint_path: str | None
    metrics: dict
    device: torch.device = torch.device("cpu")  # where this rank trained
    total_generations: int = 0                   # the run's full length (train.epochs)

    @property
    def finished(self) -> bool:
        return self.generation >= self.total_generations


def optimizer_module(cfg: Config):
    return _OPTIMIZERS[cfg.optimizer.name]


def optimizer_params(cfg: Config):
    """The optimizer's frozen Params built 1:1 from the matching config fields."""
    params_cls = {"pgpe": pgpe.PGPEParams, "rgs": rgs.RGSParams, "grad": grad_opt.GRADParams}[cfg.optimizer.name]
    values = to_dict(cfg.optimizer)
    values["sigma"] = values["sigma_init"]
    names = {f.name for f in dataclasses.fields(params_cls)}
    return params_cls(**{k: v for k, v in values.items() if k in names})


def build_problem(cfg: Config):
    """Dataset and model (on CPU) for a config; the model's initial weights come from train.seed."""
    dataset = data.load(cfg.data.name, cfg.data.root, num_train=cfg.data.num_train, num_test=cfg.data.num_test)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model = models.build(cfg.model.name, dataset.in_shape, dataset.num_classes, dataset.mean, dataset.std)
    arch = models.architecture_dict(cfg.model.name, dataset.in_shape, dataset.num_classes, dataset.mean, dataset.std)
    return dataset, model, arch


def _augment_kind(cfg: Config) -> str:
    if cfg.data.augment != "auto":
        return cfg.data.augment
    return "cifar" if cfg.data.name in ("cifar10", "tinyimagenet") else "none"


def _root_load(comm, path_or_none_fn: Callable[[], object]):
    """Run a disk-reading function on rank 0 and broadcast its result (or its exception) to all ranks."""
    result, error = None, None
    if comm.is_root:
        try:
            result = path_or_none_fn()
        except Exception as exc:  # noqa: BLE001 - re-raised identically on every rank below
            error = exc
    result, error = comm.bcast_obj((result, error))
    if error is not None:
        raise error
    return result


def _exact_row_sum(comm, rows: torch.Tensor, num_params: int) -> torch.Tensor:
    """Sum of all ranks' rows (n_local, D), bitwise independent of how rows are split over ranks."""
    return comm.allreduce_sum_exact(rows.reshape(-1, num_params))


def _eval_pgpe(cfg, model, state, params, x, y, eps, device, comm, blocks, bound_opts, source):
    """All P losses (every rank) and what this rank keeps for its share of the update (pgpe_dist)."""
    def loss_fn(points):  # (2*len(pairs), D) on device
        return losses.certified_loss(model, x, y, eps, cfg.bound.method, params=points, **bound_opts)
    local, kept = pgpe_dist.evaluate(state, params, blocks, cfg.optimizer.block_size, source, loss_fn, device)
    return comm.allgather_concat(local), kept  # (P,) in global member order


def _grad_rows(model, x, y, eps, method, points, bound_opts):
    """Per-row gradients (n, D) of the loss at each parameter vector in ``points`` (n, D)."""
    points = points.detach().clone().requires_grad_(True)
    loss = losses.certified_loss(model, x, y, eps, method, params=points, **bound_opts)
    (grads,) = torch.autograd.grad(loss.sum(), points)
    return grads, loss.detach()


def _eval_rgs(cfg, model, state, params, x, y, eps, device, comm, blocks, bound_opts):
    n, bs = cfg.optimizer.num_samples, cfg.optimizer.block_size
    rows, local_losses = [], []
    for block in blocks:
        idx = list(range(block * bs, min((block + 1) * bs, n)))
        points = rgs.sample_points(state, params, cfg.train.seed, idx).to(device)
        g, loss = _grad_rows(model, x, y, eps, cfg.bound.method, points, bound_opts)
        rows.append(g.to("cpu", torch.float32))
        local_losses.append(loss.to("cpu", torch.float64))
    D = state.center.numel()
    grad_sum = _exact_row_sum(comm, torch.cat(rows) if rows else torch.zeros(0, D), D)
    all_losses = comm.allgather_concat(torch.cat(local_losses) if local_losses else torch.zeros(0, dtype=torch.float64))
    return grad_sum, all_losses


def _eval_grad(cfg, model, state, params, x, y, eps, device, comm, blocks, bound_opts):
    B, bs = x.shape[0], cfg.optimizer.block_size
    rows, local_losses = [], []
    theta = state.center.to(device)
    for block in blocks:
        sl = slice(block * bs, min((block + 1) * bs, B))
        g, loss = _grad_rows(model, x[sl], y[sl], eps, cfg.bound.method, theta[None], bound_opts)
        n_ex = sl.stop - sl.start
        rows.append((g[0] * n_ex / B).to("cpu", torch.float32))  # mean over the batch = sum of weighted block means
        local_losses.append((loss * n_ex / B).to("cpu", torch.float64))
    D = theta.numel()
    grad_sum = _exact_row_sum(comm, torch.stack(rows) if rows else torch.zeros(0, D), D)
    block_losses = comm.allgather_concat(torch.cat(local_losses) if local_losses else torch.zeros(0, dtype=torch.float64))
    return grad_sum, block_losses.sum().reshape(1)


def _num_blocks(cfg: Config, batch_size: int) -> int:
    items = batch_size if cfg.optimizer.name == "grad" else cfg.optimizer.num_members
    return math.ceil(items / cfg.optimizer.block_size)


def _initial_state(cfg, params, theta0):
    return optimizer_module(cfg).init(params, theta0)


def _bound_options(cfg: Config, generation: int) -> dict:
    opts = dict(cfg.bound.options)
    if cfg.bound.method in ("sabr", "staps", "pgd"):
        opts.setdefault("generator", noise.torch_generator(cfg.train.seed, noise.STREAM_ATTACK, generation))
    return opts


def _append_metrics(history: dict, metrics: dict, generation: int) -> None:
    history.setdefault("generation", []).append(float(generation))
    for key, value in metrics.items():
        series = history.setdefault(key, [])
        series.extend([math.nan] * (len(history["generation"]) - 1 - len(series)))
        series.append(float(value))


def _save(comm, out_dir: Path, cfg, arch, state, generation, gens_per_epoch, history, keep_last) -> str | None:
    path = None
    if comm.is_root:
        module = optimizer_module(cfg)
        state_dict = module.state_to_dict(state)
        sigma = state_dict.get("sigma")
        ckpt = checkpoint.Checkpoint(
            generation=generation, epoch=generation // gens_per_epoch, batch_in_epoch=generation % gens_per_epoch,
            theta=state.center.detach().cpu().numpy().astype(np.float32),
            sigma=None if sigma is None else np.asarray(sigma, dtype=np.float32),
            opt_state=state_dict, config=to_dict(cfg), arch=arch,
            metrics={k: np.asarray(v, dtype=np.float64) for k, v in history.items()},
            noise_scheme=noise.NOISE_SCHEME, world_size=comm.world_size)
        try:
            path = str(checkpoint.save(out_dir, ckpt, keep_last=keep_last))
        except checkpoint.CheckpointWriteError as exc:  # disk full: raised alike on every rank below
            path = exc
    path = comm.bcast_obj(path)
    if isinstance(path, BaseException):
        raise path
    return path


def train(cfg: Config, out_dir: str | Path, comm=None, *, max_generations: int | None = None,
          log: Callable[[str], None] | None = None, restart: bool = False) -> TrainResult:
    """Train (or resume) according to ``cfg``, writing checkpoints to ``out_dir``. ``restart``
    moves an earlier run's files aside instead of resuming (``rundir.prepare``)."""
    comm = comm or dist.SerialComm()
    log = log or (lambda msg: print(msg, flush=True))
    say = log if comm.is_root else (lambda msg: None)
    out_dir = rundir.out_path(out_dir)
    if max_generations is not None and max_generations < 0:
        raise ValueError(f"--max-generations must be >= 0, got {max_generations}")
    dataset, model, arch = build_problem(cfg)
    preflight.validate(cfg, dataset, model, comm)  # the same checks as `train --dry-run`
    device = dist.bind_device(comm, cfg.train.device, cfg.train.threads)
    model = model.to(device)
    gens_per_epoch = len(dataset.train_y) // cfg.train.batch_size
    if gens_per_epoch < 1:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is larger than the training set "
                         f"({len(dataset.train_y)} examples); lower train.batch_size or raise data.num_train")
    total = math.ceil(cfg.train.epochs * gens_per_epoch)
    stop_at = total if max_generations is None else min(total, max_generations)
    params = optimizer_params(cfg)
    module = optimizer_module(cfg)

    ckpt = _root_load(comm, lambda: rundir.prepare(out_dir, restart=restart, say=say))
    if ckpt is not None:
        checkpoint.check_compatible(ckpt, arch)
        if ckpt.noise_scheme != noise.NOISE_SCHEME:
            raise ValueError(f"checkpoint in {out_dir} uses noise scheme {ckpt.noise_scheme!r} but this mpigls "
                             f"generates {noise.NOISE_SCHEME!r}; resuming would change the trajectory. "
                             "Use the mpigls version that wrote it, or start a new output directory")
        if ckpt.config.get("optimizer", {}).get("name") != cfg.optimizer.name:
            raise ValueError(f"checkpoint in {out_dir} was written by optimizer "
                             f"{ckpt.config.get('optimizer', {}).get('name')!r}, the config asks for "
                             f"{cfg.optimizer.name!r}; use a new --out directory or model.init_from for a warm start")
        state = module.state_from_dict(ckpt.opt_state)
        generation, history = ckpt.generation, {k: list(map(float, v)) for k, v in ckpt.metrics.items()}
        say(f"resuming from generation {generation} in {out_dir}")
        changed = changed_keys(ckpt.config, to_dict(cfg))
        if changed:
            say("warning: the config differs from the checkpoint's in " + ", ".join(
                f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
                + "; from here on the run follows the new values (not what an uninterrupted run would do)")
    else:
        theta0 = models.flat_params(model.cpu())
        model.to(device)
        if cfg.model.init_from:
            warm = _root_load(comm, lambda: preflight.check_init_from(cfg, arch))
            checkpoint.check_compatible(warm, arch)
            theta0 = torch.from_numpy(np.asarray(warm.theta, dtype=np.float32).copy())
            say(f"warm start from {cfg.model.init_from} (generation {warm.generation})")
        state = _initial_state(cfg, params, theta0)
        generation, history = 0, {}

    num_blocks = _num_blocks(cfg, cfg.train.batch_size)
    say(f"mpigls: {cfg.optimizer.name} + {cfg.bound.method} on {cfg.data.name}/{cfg.model.name} "
        f"(D={models.num_params(model)}), {comm.world_size} rank(s), {num_blocks} work blocks per generation, "
        f"generations {generation}->{stop_at} of {total}")
    live = monitor.Monitor(cfg, comm, out_dir, dataset, model, generation, total, say)  # val/* metrics, metrics.jsonl
    stop_signal = dist.StopSignal().install()
    # this rank's blocks; iterating stops early once a stop signal arrives (a generation in progress)
    blocks = stopping.StoppableBlocks(dist.my_blocks(num_blocks, comm.rank, comm.world_size), stop_signal)
    aug = _augment_kind(cfg)
    evaluate = _eval_rgs if cfg.optimizer.name == "rgs" else _eval_grad  # PGPE calls _eval_pgpe
    ckpt_path, stopped, epoch_cache, skipped_in_a_row = None, False, (None, None), 0
    progress = _progress(comm, cfg, generation, stop_at)
    numerics = contextlib.ExitStack()  # train.tf32 / train.deterministic, restored when training ends
    source = pgpe_dist.NoiseSource(cfg.train.seed, pgpe_dist.prefetch_default(device)) if module is pgpe else None
    try:
        numerics.enter_context(precision.training(tf32=cfg.train.tf32, deterministic=cfg.train.deterministic,
                                                  device=device))
        while generation < stop_at:
            t0 = time.perf_counter()
            epoch, batch = divmod(generation, gens_per_epoch)
            if epoch_cache[0] != epoch:
                epoch_cache = (epoch, data.batch_indices(cfg.train.seed, epoch, len(dataset.train_y), cfg.train.batch_size))
            idx = torch.from_numpy(epoch_cache[1][batch])
            x = data.augment(dataset.train_x[idx], cfg.train.seed, epoch, batch, aug).to(device)
            y = dataset.train_y[idx].to(device)
            eps = schedules.eps_at(generation, eps_max=cfg.bound.eps, kind=cfg.bound.eps_schedule,
                                   start=cfg.bound.warmup_epochs * gens_per_epoch,
                                   length=cfg.bound.anneal_epochs * gens_per_epoch, eps_start=cfg.bound.eps_start)
            lr = schedules.lr_at(epoch, lr=cfg.optimizer.lr, milestones=cfg.optimizer.lr_milestones,
                                 factor=cfg.optimizer.lr_factor)
            opts = _bound_options(cfg, generation)
            if cfg.optimizer.name == "pgpe":
                all_losses, kept = _eval_pgpe(cfg, model, state, params, x, y, eps, device, comm, blocks, opts, source)
                if blocks.agree_stop(comm):
                    break
                summed = pgpe_dist.reduce_sums(comm, state, params, cfg.train.seed, all_losses, kept)
                state, metrics = pgpe.tell(state, params, cfg.train.seed, all_losses, lr=lr, summed=summed)
            else:
                grad_sum, all_losses = evaluate(cfg, model, state, params, x, y, eps, device, comm, blocks, opts)
                if blocks.agree_stop(comm):
                    break
                state, metrics = module.tell(state, params, grad_sum, lr=lr)
            generation += 1
            skipped_in_a_row = _check_finite(metrics, all_losses, generation, skipped_in_a_row, cfg, say)
            finite = all_losses[torch.isfinite(all_losses)]
            metrics = {"loss/mean": float(finite.mean()) if finite.numel() else math.nan,
                       "loss/min": float(finite.min()) if finite.numel() else math.nan,
                       "sched/eps": float(eps), "sched/lr": float(lr), **metrics,
                       "time/generation_s": time.perf_counter() - t0}
            metrics = live.update(generation, state.center, metrics)
            _append_metrics(history, metrics, generation)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{metrics['loss/mean']:.4f}", eps=f"{eps:.3f}")
            elif generation % cfg.train.log_every == 0 or generation == stop_at:
                say(f"gen {generation:6d}  epoch {generation / gens_per_epoch:7.2f}  loss {metrics['loss/mean']:.5f}  "
                    f"eps {eps:.4f}  lr {lr:.2e}  {metrics['time/generation_s']:.3f}s/gen")
            if cfg.train.consistency_every and generation % cfg.train.consistency_every == 0:
                comm.check_consistent("theta", state.center.detach().cpu().numpy().tobytes())
            stopped = comm.agree_any(stop_signal.requested)
            if stopped or generation % cfg.train.checkpoint_every == 0 or generation == stop_at:
                ckpt_path = _save(comm, out_dir, cfg, arch, state, generation, gens_per_epoch, history, cfg.train.keep_last)
            if stopped:
                say(f"stop requested ({stop_signal.name or 'signal on another rank'}): checkpoint written at "
                    f"generation {generation} ({ckpt_path}); run the same command to resume")
                break
        if blocks.stopped:  # a signal cut generation `generation + 1` short: keep the last completed one
            stopped = True
            ckpt_path = _save(comm, out_dir, cfg, arch, state, generation, gens_per_epoch, history, cfg.train.keep_last)
            say(f"stop requested ({stop_signal.name or 'signal on another rank'}) during generation {generation + 1}: "
                f"its partial work was dropped; checkpoint written at generation {generation} ({ckpt_path}); "
                "run the same command to resume")
    finally:
        numerics.close()
        stop_signal.uninstall()
        if source is not None:
            source.close()
        live.close()
        if progress is not None:
            progress.close()
    if ckpt_path is None and comm.is_root:
        ckpt_path = str(checkpoint.find_latest(out_dir) or "") or None
    ckpt_path = comm.bcast_obj(ckpt_path)
    return TrainResult(generation, state.center.detach().cpu().clone(), stopped, ckpt_path,
                       {k: v[-1] for k, v in history.items() if v}, device, total)


class TrainingDiverged(ValueError):
    """Too many consecutive generations without a finite loss or gradient (a user error: the
    hyperparameters need changing, so it is reported as one paragraph, exit code 2)."""


def _check_finite(metrics: dict, all_losses: torch.Tensor, generation: int, skipped_in_a_row: int,
                  cfg: Config, say: Callable[[str], None]) -> int:
    """Warn about non-finite losses and skipped steps; stop a run that keeps skipping. Every rank
    sees the same metrics, so every rank decides alike. Returns the new count of skips in a row."""
    bad = int((~torch.isfinite(all_losses)).sum())
    skipped = any(k.endswith("/skipped") and v for k, v in metrics.items())
    if skipped:
        say(f"warning: generation {generation}: {bad} of {all_losses.numel()} losses non-finite, "
            f"nothing finite to step with: the step was skipped")
    elif bad:
        say(f"warning: generation {generation}: {bad} of {all_losses.numel()} losses non-finite "
            f"(those members got zero weight)")
    skipped_in_a_row = skipped_in_a_row + 1 if skipped else 0
    limit = cfg.train.max_skipped_steps
    if limit and skipped_in_a_row >= limit:
        raise TrainingDiverged(
            f"training stopped at generation {generation}: {skipped_in_a_row} generations in a row had no "
            f"finite loss or gradient (the bound overflows, e.g. {cfg.bound.method} at eps {cfg.bound.eps}). "
            f"The last checkpoint holds the last good state; lower optimizer.lr, optimizer.sigma_init or "
            f"bound.eps, or raise train.max_skipped_steps (0 never stops).")
    return skipped_in_a_row


def _progress(comm, cfg: Config, start: int, stop: int):
    if not (comm.is_root and cfg.train.progress and sys.stderr.isatty()):
        return None
    from tqdm import tqdm
    return tqdm(total=stop, initial=start, unit="gen", dynamic_ncols=True)
