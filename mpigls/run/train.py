"""The training loop: ties data, population, bounds, optimizer, communication and checkpoints.

One generation = one minibatch (identical on every rank, from the shared seed). The optimizer
(``cfg.optimizer.name``, a unit of mpigls.optim.registry; see mpigls.optim.unit) names its work
items (PGPE pairs, RGS samples, GRAD examples); they are cut into fixed-size blocks that do not
depend on the number of ranks, and rank r evaluates a contiguous run of blocks. The optimizer's
``exchange`` combines the ranks' parts exactly (fixed-point sums, gathers in global order) and
every rank applies the same pure ``tell``, so all ranks hold bitwise identical state for any world
size (with the same threads per rank on CPU).

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
from typing import Any

import numpy as np
import torch

from mpigls import data, parallel
from mpigls.config import Config, changed_keys, stored_config, to_dict
from mpigls.interop import fetch
from mpigls.nn import models
from mpigls.numerics import noise, precision
from mpigls.objectives import losses
from mpigls.optim import registry as optimizers, schedules, unit
from mpigls.run import checkpoint, finaleval, hostmem, monitor, preflight, rundir, runlock

__all__ = [
    "Plan",
    "TrainResult",
    "TrainingDiverged",
    "bound_options",
    "build_problem",
    "generation_work",
    "plan",
    "train",
]


@dataclasses.dataclass(frozen=True)
class TrainResult:
    generation: int
    theta: torch.Tensor
    stopped_by_signal: bool
    checkpoint_path: str | None
    metrics: dict
    device: torch.device = torch.device("cpu")  # where this rank trained
    total_generations: int = 0  # the run's full length (train.epochs)

    @property
    def finished(self) -> bool:
        return self.generation >= self.total_generations


@dataclasses.dataclass(frozen=True)
class Plan:
    """What ``train(cfg, out_dir)`` will do, checked before any work (``train --dry-run`` prints it):
    the dataset and network of the config, and whether the run starts or resumes (``start``)."""

    cfg: Config
    out_dir: Path
    dataset: Any
    model: Any
    arch: dict
    start: str  # "start a new run in DIR", "resume DIR from generation G", ...

    @property
    def resumes(self) -> bool:
        return self.start.startswith("resume")

    def summary(self, world_size: int) -> str:
        """The dry run's one line."""
        cfg, ds = self.cfg, self.dataset
        return (
            f"config ok: {cfg.optimizer.name} + {cfg.bound.method} on {cfg.data.name} "
            f"({len(ds.train_y)} train / {len(ds.test_y)} test, shape {ds.in_shape}); "
            f"{cfg.model.name} with D={models.num_params(self.model)} parameters; {world_size} rank(s); "
            f"would {self.start}"
        )


def plan(cfg: Config, out_dir: str | Path, comm=None, *, restart: bool = False, say=None, check_lock=False) -> Plan:
    """The checks ``train`` makes before it takes the run directory: the dataset (downloaded by rank 0
    when data.download asks for it), the network, what would happen to ``out_dir`` (``rundir.describe``;
    with ``check_lock`` also whether another run holds it) and ``preflight.validate`` (with
    model.init_from when the run would start fresh). Raises the same error on every rank."""
    comm = comm or parallel.SerialComm()
    say = say or (lambda msg: None)
    out_dir = rundir.out_path(out_dir)
    if cfg.data.download:  # rank 0 downloads a missing dataset, the others wait
        fetch.ensure(comm, cfg.data.name, cfg.data.root, say=say if comm.is_root else (lambda msg: None))
    dataset, model, arch = build_problem(cfg)

    def describe() -> str:
        if check_lock and out_dir.is_dir():  # a directory in use: train would be refused
            runlock.check_free(out_dir, cfg.train.lock_stale_s)
        what = rundir.describe(out_dir, restart=restart)
        return what if what.startswith("resume") else f"start {what}"

    start = parallel.on_root(comm, describe)
    preflight.validate(cfg, dataset, model, comm, arch=None if start.startswith("resume") else arch)
    return Plan(cfg, out_dir, dataset, model, arch, start)


def train(
    cfg: Config,
    out_dir: str | Path,
    comm=None,
    *,
    max_generations: int | None = None,
    log: Callable[[str], None] | None = None,
    restart: bool = False,
    evaluate: bool = False,
) -> TrainResult:
    """Train (or resume) according to ``cfg``, writing checkpoints to ``out_dir``. ``restart``
    moves an earlier run's files aside instead of resuming (``rundir.prepare``). ``evaluate``: when
    the run is finished, certify it on the test set into ``out_dir/eval.json`` (``run.finaleval``)
    while the run directory is still locked."""
    comm = comm or parallel.SerialComm()
    log = log or (lambda msg: print(msg, flush=True))
    say = log if comm.is_root else (lambda msg: None)
    if max_generations is not None and max_generations < 0:
        raise ValueError(f"--max-generations must be >= 0, got {max_generations}")
    p = plan(cfg, out_dir, comm, restart=restart, say=say)
    out_dir, model, arch = p.out_dir, p.model, p.arch
    device = parallel.bind_device(comm, cfg.train.device, cfg.train.threads)
    gens_per_epoch = len(p.dataset.train_y) // cfg.train.batch_size  # >= 1: preflight refuses a larger batch
    total = math.ceil(cfg.train.epochs * gens_per_epoch)
    stop_at = total if max_generations is None else min(total, max_generations)
    opt = optimizers.get(cfg.optimizer.name)
    lock = _lock(comm, cfg, out_dir, say)  # rank 0 holds it until train returns or raises
    with contextlib.ExitStack() as held:
        if lock is not None:
            held.callback(lock.release)
        state, history, resumed = _start(cfg, comm, out_dir, restart, opt, model, arch, gens_per_epoch, say)
        model = model.to(device)
        if resumed and stop_at <= state.generation:  # nothing to train: nothing is written for it
            evaluating = evaluate and state.generation >= total
            result = _nothing_to_do(comm, out_dir, state, history, device, total, max_generations, evaluating, say)
        else:
            loop = _Loop(cfg, comm, out_dir, p.dataset, model, arch, opt, device, gens_per_epoch, lock, say)
            result = loop.run(state, history, stop_at, total)
        if evaluate and result.finished and not result.stopped_by_signal:
            on_abort = lock.release if lock is not None else None  # a stopped rank: named, the job ended
            with parallel.watchdog.final_evaluation(
                comm, cfg.train.hang_timeout, abort=cfg.train.hang_abort, on_abort=on_abort
            ):
                _final_evaluation(cfg, result, out_dir, comm, say)
    return result


def _nothing_to_do(
    comm, out_dir: Path, state, history: dict, device, total: int, max_generations, evaluating: bool, say
) -> TrainResult:
    generation = state.generation
    why = (
        f"the end of the run ({total} generations)"
        if generation >= total
        else f"and --max-generations {max_generations} asks for no more"
    )
    then = "only the final evaluation is checked" if evaluating else "nothing was written"
    say(f"nothing to do: {out_dir} is already at generation {generation}, {why}; no generation was run and {then}")
    latest = comm.bcast_obj(str(rundir.find_latest(out_dir)) if comm.is_root else None)
    last = {k: v[-1] for k, v in history.items() if v}
    return TrainResult(generation, state.center.detach().cpu().clone(), False, latest, last, device, total)


def _final_evaluation(cfg: Config, result: TrainResult, out_dir: Path, comm, say) -> None:
    """eval.json for a finished run, unless it already holds this θ's evaluation with these settings."""
    sha = checkpoint.theta_sha256(result.theta.numpy())
    if parallel.on_root(comm, lambda: finaleval.is_current(out_dir, result.generation, sha, cfg)):
        say(
            f"the final evaluation in {out_dir / finaleval.EVAL_FILE} is of this generation ({result.generation}) "
            "and these settings already: it was not repeated and nothing was written"
        )
        return
    dataset, model, _ = build_problem(cfg)  # a fresh network: the loop's is left as it was
    res = finaleval.evaluate(cfg, dataset, model, result.theta, result.device, comm, say)
    path = out_dir / finaleval.EVAL_FILE
    record = finaleval.record(cfg, result.generation, sha, result.checkpoint_path, res)
    parallel.on_root(comm, lambda: rundir.write_json(path, record))
    say(f"wrote {path}")


class _Loop:
    """The generation loop of one call of ``train``: from a start state to ``stop_at``, a stop signal or
    a failure, with validation, logs, checkpoints and the hang watchdog."""

    def __init__(self, cfg, comm, out_dir, dataset, model, arch, opt, device, gens_per_epoch, lock, say):
        self.cfg, self.comm, self.out_dir, self.dataset, self.model = cfg, comm, out_dir, dataset, model
        self.opt, self.params, self.device, self.gens_per_epoch = opt, cfg.optimizer.params, device, gens_per_epoch
        self.lock, self.say = lock, say
        self.save = _Saver(comm, out_dir, cfg, opt, arch, gens_per_epoch, lock)

    def run(self, state, history: dict, stop_at: int, total: int) -> TrainResult:
        cfg, comm, opt, params, say = self.cfg, self.comm, self.opt, self.params, self.say
        generation = state.generation
        # blocks x example chunks (optimizer.batch_chunks, PGPE; 1 for the others: mpigls.parallel.work.check)
        num_blocks = (
            unit.num_blocks(opt.num_items(params, cfg.train.batch_size), cfg.optimizer.block_size)
            * cfg.optimizer.batch_chunks
        )
        say(
            f"mpigls: {cfg.optimizer.name} + {cfg.bound.method} on {cfg.data.name}/{cfg.model.name} "
            f"(D={models.num_params(self.model)}), {comm.world_size} rank(s), {num_blocks} work blocks per "
            f"generation, generations {generation}->{stop_at} of {total}"
        )
        stop_signal = parallel.StopSignal().install()
        # this rank's blocks; iterating stops early once a stop signal arrives (a generation in progress)
        blocks = parallel.StoppableBlocks(parallel.my_blocks(num_blocks, comm.rank, comm.world_size), stop_signal)
        ckpt_path, stopped = None, False
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(stop_signal.uninstall)
            # val/* metrics, metrics.jsonl
            live = monitor.Monitor(cfg, comm, self.out_dir, self.dataset, self.model, generation, total, say)
            cleanup.callback(live.close)
            progress = _progress(comm, cfg, generation, stop_at)
            if progress is not None:
                cleanup.callback(progress.close)
            hostmem.keep_freed_memory()  # reuse freed tensor memory instead of faulting pages in again
            lock = self.lock
            watch = parallel.watchdog.start(
                comm, cfg.train.hang_timeout, abort=cfg.train.hang_abort, on_abort=lock.release if lock else None
            )  # train.hang_timeout: names the ranks a stuck generation waits for
            cleanup.callback(watch.close)
            resource = cleanup.enter_context(opt.open(cfg.train.seed, self.device, params))
            # the optimizer state lives on the training device: on a GPU the fixed-point sums and the step
            # run there (checkpoints and the returned theta are copied to the CPU)
            state = unit.to_device(state, self.device)
            # train.tf32 / train.deterministic, restored when training ends
            cleanup.enter_context(
                precision.training(tf32=cfg.train.tf32, deterministic=cfg.train.deterministic, device=self.device)
            )
            if generation == 0 and stop_at == 0:  # --max-generations 0: the initial state as a checkpoint
                ckpt_path = self.save(state, history)
            steps = _Steps(self, blocks, stop_signal, watch, live, progress, resource, stop_at)
            while generation < stop_at and not stopped:
                state, generation, stopped, saved = steps.one(state, history, generation)
                ckpt_path = saved or ckpt_path
            if blocks.stopped:  # a signal cut generation `generation + 1` short: keep the last completed one
                stopped = True
                watch.mark(parallel.watchdog.CHECKPOINT)
                ckpt_path = self.save(state, history)
                say(
                    f"stop requested ({stop_signal.name or 'signal on another rank'}) during generation "
                    f"{generation + 1}: its partial work was dropped; checkpoint written at generation {generation} "
                    f"({ckpt_path}); run the same command to resume"
                )
        if ckpt_path is None and comm.is_root:
            ckpt_path = str(rundir.find_latest(self.out_dir) or "") or None
        ckpt_path = comm.bcast_obj(ckpt_path)
        last = {k: v[-1] for k, v in history.items() if v}
        return TrainResult(
            generation, state.center.detach().cpu().clone(), stopped, ckpt_path, last, self.device, total
        )


class _Steps:
    """One generation of the loop (``one``), with what it needs from the loop."""

    def __init__(self, loop: _Loop, blocks, stop_signal, watch, live, progress, resource, stop_at: int):
        self.loop, self.blocks, self.stop_signal, self.watch = loop, blocks, stop_signal, watch
        self.live, self.progress, self.resource, self.stop_at = live, progress, resource, stop_at
        self.batches = _Batches(loop.cfg, loop.dataset, loop.gens_per_epoch, loop.device)
        self.skipped_in_a_row = 0

    def one(self, state, history: dict, generation: int):
        """Run generation ``generation + 1``: (state, generation, stopped, checkpoint path or None). A
        generation a stop signal cut short leaves state and generation as they were (``blocks.stopped``)."""
        loop, watch, blocks = self.loop, self.watch, self.blocks
        cfg, comm, opt, params, say = loop.cfg, loop.comm, loop.opt, loop.params, loop.say
        t0 = time.perf_counter()
        watch.begin(generation + 1)
        x, y = self.batches.at(generation)
        eps, lr = _schedules(cfg, generation, loop.gens_per_epoch)
        work = generation_work(cfg, loop.model, x, y, eps, bound_options(cfg, generation), loop.device, self.resource)
        local = opt.evaluate(work, state, params, blocks)
        watch.mark(parallel.watchdog.EXCHANGE)
        # the stop flags ride in the exchange's first collective (one all-gather of the losses)
        control = unit.Control(cut_short=blocks.cut_short, stop=self.stop_signal.requested)
        all_losses, reduced, agreed = opt.exchange(comm, work, state, params, local, control)
        if blocks.settle(agreed.cut_short):  # a stop signal cut this generation short on some rank
            return state, generation, True, None
        watch.mark(parallel.watchdog.TELL)
        state, metrics = opt.tell(work, state, params, all_losses, reduced, lr)
        generation += 1
        self.skipped_in_a_row = _check_finite(metrics, all_losses, generation, self.skipped_in_a_row, cfg, say)
        watch.mark(parallel.watchdog.VALIDATE)
        metrics = self.live.update(generation, state.center, _metrics(all_losses, eps, lr, metrics, t0))
        _append_metrics(history, metrics, generation)
        _report(self.progress, say, cfg, metrics, generation, loop.gens_per_epoch, self.stop_at)
        if cfg.train.consistency_every and generation % cfg.train.consistency_every == 0:
            comm.check_consistent("theta", state.center.detach().cpu().numpy().tobytes(), generation=generation)
        if loop.lock is not None:
            loop.lock.heartbeat(force=False)
        stopped = agreed.stop  # requested on some rank by the exchange: this generation is the last
        saved = None
        if stopped or generation % cfg.train.checkpoint_every == 0 or generation == self.stop_at:
            watch.mark(parallel.watchdog.CHECKPOINT)
            saved = loop.save(state, history)
        watch.mark(parallel.watchdog.DONE)
        if stopped:
            say(
                f"stop requested ({self.stop_signal.name or 'signal on another rank'}): checkpoint written at "
                f"generation {generation} ({saved}); run the same command to resume"
            )
        return state, generation, stopped, saved


# ----------------------------------------------------------------------------- start: resume or fresh


def _lock(comm, cfg: Config, out_dir: Path, say: Callable[[str], None]) -> runlock.RunLock | None:
    """Create --out and take its run lock on rank 0 (None on the other ranks); every rank raises
    the same RunDirError when another run holds it."""
    lock, error = None, None
    if comm.is_root:
        try:
            d = rundir.make_dir(out_dir)
            lock = runlock.acquire(d, stale_after_s=cfg.train.lock_stale_s, command=" ".join(sys.argv), say=say)
        except Exception as exc:  # noqa: BLE001 - re-raised identically on every rank below
            error = exc
    error = comm.bcast_obj(error)
    if error is not None:
        raise error
    return lock


def _start(
    cfg: Config,
    comm,
    out_dir: Path,
    restart: bool,
    opt: unit.Optimizer,
    model,
    arch: dict,
    gens_per_epoch: int,
    say: Callable[[str], None],
) -> tuple[Any, dict, bool]:
    """The optimizer state and metric history to start from, and whether they are the run directory's
    checkpoint (resume); else ``model.init_from`` (warm start) or the model's initial weights."""
    ckpt = parallel.on_root(comm, lambda: rundir.prepare(out_dir, restart=restart, say=say))
    if ckpt is None:
        theta0 = models.flat_params(model.cpu())
        if cfg.model.init_from:
            warm = parallel.on_root(comm, lambda: preflight.check_init_from(cfg, arch))
            checkpoint.check_compatible(warm, arch)
            theta0 = torch.from_numpy(np.asarray(warm.theta, dtype=np.float32).copy())
            say(f"warm start from {cfg.model.init_from} (generation {warm.generation})")
        return opt.init(cfg.optimizer.params, theta0), {}, False
    checkpoint.check_compatible(ckpt, arch)
    if ckpt.noise_scheme != _noise_scheme(cfg):
        known = {v: k for k, v in noise.SCHEMES.items()}
        hint = (
            f"set optimizer.noise={known[ckpt.noise_scheme]} to resume it"
            if ckpt.noise_scheme in known
            else "use the mpigls version that wrote it"
        )
        raise ValueError(
            f"checkpoint in {out_dir} uses noise scheme {ckpt.noise_scheme!r} but this run "
            f"generates {_noise_scheme(cfg)!r} (optimizer.noise); resuming would change the trajectory. "
            f"{hint}, or start a new output directory"
        )
    stored = stored_config(ckpt.config)
    if stored.get("optimizer", {}).get("name") != cfg.optimizer.name:
        raise ValueError(
            f"checkpoint in {out_dir} was written by optimizer "
            f"{stored.get('optimizer', {}).get('name')!r}, the config asks for "
            f"{cfg.optimizer.name!r}; use a new --out directory or model.init_from for a warm start"
        )
    state = unit.join_state(opt, ckpt.theta, ckpt.sigma, ckpt.generation, ckpt.opt_state)
    say(
        f"resuming from generation {ckpt.generation} in {out_dir}"
        + (
            f" (checkpoint format {ckpt.format_version}, migrated)"
            if ckpt.format_version != checkpoint.FORMAT_VERSION
            else ""
        )
    )
    changed = changed_keys(stored, to_dict(cfg))
    if changed:
        say(
            "warning: the config differs from the checkpoint's in "
            + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            + "; from here on the run follows the new values (not what an uninterrupted run would do)"
        )
    if (ckpt.epoch, ckpt.batch_in_epoch) != divmod(ckpt.generation, gens_per_epoch):
        say(
            f"warning: the checkpoint was written at epoch {ckpt.epoch}, batch {ckpt.batch_in_epoch}; with "
            f"{gens_per_epoch} batches per epoch now, generation {ckpt.generation} is epoch "
            f"{ckpt.generation // gens_per_epoch}, batch {ckpt.generation % gens_per_epoch}: the batch order "
            "differs from the original run's (train.batch_size or the training set changed)"
        )
    return state, {k: list(map(float, v)) for k, v in ckpt.metrics.items()}, True


def _noise_scheme(cfg: Config) -> str:
    """The run's noise construction as the checkpoint records it (``optimizer.noise``; host for
    optimizers without perturbation noise)."""
    return noise.scheme_id(getattr(cfg.optimizer.params, "noise", "host"))


def build_problem(cfg: Config):
    """Dataset and model (on CPU) for a config; the model's initial weights come from train.seed."""
    dataset = data.load(
        cfg.data.name,
        cfg.data.root,
        num_train=cfg.data.num_train,
        num_test=cfg.data.num_test,
        val_size=cfg.data.val_size,
        val_seed=cfg.data.val_seed,
    )
    with models.private_rng(cfg.train.seed):
        model = models.build(cfg.model.name, dataset.in_shape, dataset.num_classes, dataset.mean, dataset.std)
    arch = models.architecture_dict(cfg.model.name, dataset.in_shape, dataset.num_classes, dataset.mean, dataset.std)
    return dataset, model, arch


# ----------------------------------------------------------------------------- one generation's inputs


class _Batches:
    """The minibatch of a generation (the same on every rank): epoch order from the seed, augmented."""

    def __init__(self, cfg: Config, dataset, gens_per_epoch: int, device: torch.device):
        self.cfg, self.dataset, self.gens_per_epoch, self.device = cfg, dataset, gens_per_epoch, device
        self.aug = (
            cfg.data.augment
            if cfg.data.augment != "auto"
            else ("cifar" if cfg.data.name in ("cifar10", "tinyimagenet") else "none")
        )
        self._epoch: tuple[int | None, np.ndarray | None] = (None, None)

    def at(self, generation: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, batch = divmod(generation, self.gens_per_epoch)
        seed, n = self.cfg.train.seed, len(self.dataset.train_y)
        if self._epoch[0] != epoch:
            self._epoch = (epoch, data.batch_indices(seed, epoch, n, self.cfg.train.batch_size))
        order = self._epoch[1]
        assert order is not None
        idx = torch.from_numpy(order[batch])
        x = data.augment(self.dataset.train_x[idx], seed, epoch, batch, self.aug).to(self.device)
        return x, self.dataset.train_y[idx].to(self.device)


def _schedules(cfg: Config, generation: int, gens_per_epoch: int) -> tuple[float, float]:
    """(eps, lr) of a generation: bound.eps_schedule per batch, the lr milestones per epoch."""
    b = cfg.bound
    eps = schedules.eps_at(
        generation,
        eps_max=b.eps,
        kind=b.eps_schedule,
        start=b.warmup_epochs * gens_per_epoch,
        length=b.anneal_epochs * gens_per_epoch,
        eps_start=b.eps_start,
    )
    lr = schedules.lr_at(
        generation // gens_per_epoch,
        lr=cfg.optimizer.lr,
        milestones=cfg.optimizer.lr_milestones,
        factor=cfg.optimizer.lr_factor,
    )
    return eps, lr


def bound_options(cfg: Config, generation: int) -> dict:
    """The bound's options of a generation: bound.options, plus the attack's seeded generator."""
    opts = dict(cfg.bound.options)
    if cfg.bound.method in ("sabr", "staps", "pgd"):
        opts.setdefault("generator", noise.torch_generator(cfg.train.seed, noise.STREAM_ATTACK, generation))
    return opts


def generation_work(
    cfg: Config, model, x: torch.Tensor, y: torch.Tensor, eps: float, opts: dict, device: torch.device, resource
) -> unit.Work:
    """The generation's loss and per-point gradient functions for the optimizer's ``evaluate``."""
    method = cfg.bound.method

    def loss(points: torch.Tensor, examples: slice = slice(None)) -> torch.Tensor:  # (n, D) on device -> (n,)
        return losses.certified_loss(model, x[examples], y[examples], eps, method, weights=points, **opts)

    def grad(points: torch.Tensor, examples: slice) -> tuple[torch.Tensor, torch.Tensor]:
        points = points.detach().clone().requires_grad_(True)
        value = losses.certified_loss(model, x[examples], y[examples], eps, method, weights=points, **opts)
        (g,) = torch.autograd.grad(value.sum(), points)
        return g, value.detach()

    return unit.Work(
        seed=cfg.train.seed,
        device=device,
        block_size=cfg.optimizer.block_size,
        batch_size=x.shape[0],
        loss=loss,
        grad=grad,
        resource=resource,
        chunks=cfg.optimizer.batch_chunks,
    )


# ----------------------------------------------------------------------------- metrics, logs, saves


def _metrics(all_losses: torch.Tensor, eps: float, lr: float, metrics: dict, t0: float) -> dict:
    finite = all_losses[torch.isfinite(all_losses)]
    return {
        "loss/mean": float(finite.mean()) if finite.numel() else math.nan,
        "loss/min": float(finite.min()) if finite.numel() else math.nan,
        "sched/eps": float(eps),
        "sched/lr": float(lr),
        **metrics,
        "time/generation_s": time.perf_counter() - t0,
    }


def _append_metrics(history: dict, metrics: dict, generation: int) -> None:
    history.setdefault("generation", []).append(float(generation))
    for key, value in metrics.items():
        series = history.setdefault(key, [])
        series.extend([math.nan] * (len(history["generation"]) - 1 - len(series)))
        series.append(float(value))


def _report(progress, say, cfg: Config, metrics: dict, generation: int, gens_per_epoch: int, stop_at: int) -> None:
    if progress is not None:
        progress.update(1)
        progress.set_postfix(loss=f"{metrics['loss/mean']:.4f}", eps=f"{metrics['sched/eps']:.3f}")
    elif generation % cfg.train.log_every == 0 or generation == stop_at:
        say(
            f"gen {generation:6d}  epoch {generation / gens_per_epoch:7.2f}  loss {metrics['loss/mean']:.5f}  "
            f"eps {metrics['sched/eps']:.4f}  lr {metrics['sched/lr']:.2e}  {metrics['time/generation_s']:.3f}s/gen"
        )


@dataclasses.dataclass(frozen=True)
class _Saver:
    """Writes a checkpoint on rank 0 (θ, σ, generation once; the rest of the state under /optimizer)."""

    comm: Any
    out_dir: Path
    cfg: Config
    opt: unit.Optimizer
    arch: dict
    gens_per_epoch: int
    lock: runlock.RunLock | None = None  # rank 0: its heartbeat is rewritten after every save

    def __call__(self, state, history: dict) -> str | None:
        comm = self.comm
        path: str | BaseException | None = None
        if comm.is_root:
            theta, sigma, generation, rest = unit.split_state(self.opt, state)
            ckpt = checkpoint.Checkpoint(
                generation=generation,
                epoch=generation // self.gens_per_epoch,
                batch_in_epoch=generation % self.gens_per_epoch,
                theta=theta,
                sigma=sigma,
                opt_state=rest,
                config=to_dict(self.cfg),
                arch=self.arch,
                metrics={k: np.asarray(v, dtype=np.float64) for k, v in history.items()},
                noise_scheme=_noise_scheme(self.cfg),
                world_size=comm.world_size,
            )
            try:
                if self.lock is not None:
                    self.lock.heartbeat()  # refuses to write when another run took the directory over
                path = str(checkpoint.save(self.out_dir, ckpt, keep_last=self.cfg.train.keep_last))
            except (checkpoint.CheckpointWriteError, rundir.RunDirError) as exc:  # raised alike on every rank
                path = exc
        path = comm.bcast_obj(path)
        if isinstance(path, BaseException):
            raise path
        return path


class TrainingDiverged(ValueError):
    """Too many consecutive generations without a finite loss or gradient (a user error: the
    hyperparameters need changing, so it is reported as one paragraph, exit code 2)."""


def _check_finite(
    metrics: dict,
    all_losses: torch.Tensor,
    generation: int,
    skipped_in_a_row: int,
    cfg: Config,
    say: Callable[[str], None],
) -> int:
    """Warn about non-finite losses and skipped steps; stop a run that keeps skipping. Every rank
    sees the same metrics, so every rank decides alike. Returns the new count of skips in a row."""
    bad = int((~torch.isfinite(all_losses)).sum())
    skipped = any(k.endswith("/skipped") and v for k, v in metrics.items())
    if skipped:
        say(
            f"warning: generation {generation}: {bad} of {all_losses.numel()} losses non-finite, "
            f"nothing finite to step with: the step was skipped"
        )
    elif bad:
        say(
            f"warning: generation {generation}: {bad} of {all_losses.numel()} losses non-finite "
            f"(those members got zero weight)"
        )
    skipped_in_a_row = skipped_in_a_row + 1 if skipped else 0
    limit = cfg.train.max_skipped_steps
    if limit and skipped_in_a_row >= limit:
        raise TrainingDiverged(
            f"training stopped at generation {generation}: {skipped_in_a_row} generations in a row had no "
            f"finite loss or gradient (the bound overflows, e.g. {cfg.bound.method} at eps {cfg.bound.eps}). "
            f"The last checkpoint holds the last good state; lower optimizer.lr, optimizer.sigma_init or "
            f"bound.eps, or raise train.max_skipped_steps (0 never stops)."
        )
    return skipped_in_a_row


def _progress(comm, cfg: Config, start: int, stop: int):
    if not (comm.is_root and cfg.train.progress and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=stop, initial=start, unit="gen", dynamic_ncols=True)
