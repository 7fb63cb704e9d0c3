"""Diagnostics for a Gaussian Loss Smoothing run that does not improve: is the PGPE gradient
estimate good enough (popsize), and what does the smoothing do to the loss (sigma)?

At a parameter vector θ (a checkpoint) and a fixed set of training examples:

* **Gradient agreement.** The reference is ∇L_σ(θ), the gradient of the smoothed loss
  L_σ(θ) = E_z L(θ + σz), estimated by RGS with many antithetic samples (first order: its
  variance is far below PGPE's). For each popsize P and σ, ``repeats`` PGPE estimates (the
  optimizer's own code: ``optim.pgpe.ask`` / ``gradients``, with the run's fitness shaping) are
  compared with it by cosine similarity. A cosine near 0 means the step is mostly noise ("popsize
  too small"); the reference's own cosine to the plain gradient ∇L(θ) shows how far σ moves
  the target ("σ too large" when it falls).
* **Smoothed loss.** L(θ) and the Monte-Carlo estimate of L_σ(θ) (mean ± standard error over
  ``num_samples`` antithetic pairs) per σ, at each given checkpoint: along training when given
  the run's checkpoints in order.

Estimators take ``loss_fn`` ((n, D) points -> (n,) losses) and ``grad_fn`` ((n, D) -> (n, D)
gradients), so they work on any loss: the tests check them on a quadratic, whose smoothed loss
and gradient are known in closed form. Randomness: counter-based, keyed by ``seed`` and the
repeat index (``mpigls.numerics.noise``). Shapes: n points, D parameters, P popsize.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch

from mpigls.argtypes import count
from mpigls.optim import pgpe, rgs

__all__ = [
    "pgpe_estimate",
    "cv_estimate",
    "CONTROL_VARIATES",
    "rgs_estimate",
    "smoothed_loss",
    "cosine",
    "gradient_agreement",
    "network_functions",
]

LossFn = Callable[[torch.Tensor], torch.Tensor]
GradFn = Callable[[torch.Tensor], torch.Tensor]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two vectors (0 when either is zero)."""
    a, b = a.double().flatten(), b.double().flatten()
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else 0.0


def _batched(fn: Callable[[torch.Tensor], torch.Tensor], points: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([fn(points[i : i + chunk]) for i in range(0, len(points), chunk)])


def pgpe_estimate(
    loss_fn: LossFn,
    theta: torch.Tensor,
    sigma: float,
    popsize: int,
    seed: int,
    *,
    shaping: str = "centered_ranks",
    repeat: int = 0,
    chunk: int = 64,
    g: torch.Tensor | None = None,
) -> torch.Tensor:
    """One PGPE estimate of the descent direction at θ: (D,) float64 (with ``shaping="raw"`` an
    unbiased estimate of ∇L_σ(θ); shaped estimates point the same way up to a positive scale).
    ``repeat`` picks an independent population (the generation counter of the noise). With a control
    variate ``g`` (``mpigls.optim.pgpe``; raw losses, as the optimizer uses them) the estimate is
    unbiased for ∇L_σ(θ) for any ``g`` independent of this population."""
    kind = "none" if g is None else "previous"
    shaping = shaping if g is None else "raw"
    params = pgpe.PGPEParams(
        popsize=popsize, sigma_init=sigma, fixed_sigma=True, fitness_shaping=shaping, control_variate=kind
    )
    state = dataclasses.replace(pgpe.init(params, theta.detach().float()), generation=repeat)
    rows = pgpe.ask(state, params, seed, range(popsize // 2))  # (P, D)
    losses = _batched(loss_fn, rows, chunk).detach().double()
    est, _, _ = pgpe.gradients(state, params, seed, losses, with_sigma=False, g=None if g is None else g.double())
    if est is None:
        raise ValueError(f"every PGPE loss at this point is non-finite (sigma {sigma}); lower sigma")
    return est


CONTROL_VARIATES = ("grad", "previous", "running")


def _running_steps(popsize: int, dim: int) -> int:
    n = popsize // 2
    return math.ceil(3 * (n + dim) / n)


def _cv_cost(kind: str, popsize: int, dim: int) -> int:
    """Loss evaluations of one ``cv_estimate``."""
    return {"grad": 1, "previous": 2}.get(kind, _running_steps(popsize, dim) + 1) * popsize


def cv_estimate(
    kind: str,
    loss_fn: LossFn,
    exact: torch.Tensor,
    theta: torch.Tensor,
    sigma: float,
    popsize: int,
    seed: int,
    repeat: int,
) -> tuple[torch.Tensor, int]:
    """(The control-variate estimate with g of ``kind`` at θ, the loss evaluations it cost).

    "grad": g = ∇L(θ) (``exact``). "previous": g = an independent plain raw estimate (the previous
    generation's, with θ unchanged). "running": the running average of the optimizer (gain n/(n + D))
    after 3 (n + D)/n generations at θ from zero: its value without the drift of θ, the best case."""
    if kind == "grad":
        return pgpe_estimate(loss_fn, theta, sigma, popsize, seed, g=exact, repeat=repeat), popsize
    base = (repeat + 1) << 16  # populations independent of the repeats' own
    if kind == "previous":
        g = pgpe_estimate(loss_fn, theta, sigma, popsize, seed, shaping="raw", repeat=base)
        return pgpe_estimate(loss_fn, theta, sigma, popsize, seed, g=g, repeat=repeat), 2 * popsize
    n, dim = popsize // 2, theta.numel()
    rate, steps = n / (n + dim), _running_steps(popsize, dim)
    m = torch.zeros(dim, dtype=torch.float64)
    for k in range(steps):
        m = m * (1 - rate) + pgpe_estimate(loss_fn, theta, sigma, popsize, seed, g=m, repeat=base + k) * rate
    return pgpe_estimate(loss_fn, theta, sigma, popsize, seed, g=m, repeat=repeat), _cv_cost(kind, popsize, dim)


def rgs_estimate(
    grad_fn: GradFn, theta: torch.Tensor, sigma: float, num_samples: int, seed: int, *, repeat: int = 0, chunk: int = 16
) -> torch.Tensor:
    """The RGS estimate of ∇L_σ(θ): the mean gradient at θ + σz_i over ``num_samples`` antithetic
    samples, (D,) float64 (exact for a quadratic loss: the antithetic pairs cancel the noise)."""
    params = rgs.RGSParams(num_samples=num_samples, sigma_init=sigma, antithetic=num_samples % 2 == 0)
    state = dataclasses.replace(rgs.init(params, theta.detach().float()), generation=repeat)
    points = rgs.sample_points(state, params, seed, range(num_samples))
    return _batched(grad_fn, points, chunk).detach().double().mean(dim=0)


def smoothed_loss(
    loss_fn: LossFn, theta: torch.Tensor, sigma: float, num_samples: int, seed: int, *, chunk: int = 64
) -> tuple[float, float]:
    """(mean, standard error) of L(θ + σz) over ``num_samples`` points (antithetic pairs: the
    standard error is taken over the pair means, which are independent)."""
    pairs = max(1, num_samples // 2)
    params = pgpe.PGPEParams(popsize=2 * pairs, sigma_init=sigma, fixed_sigma=True)
    state = pgpe.init(params, theta.detach().float())
    losses = _batched(loss_fn, pgpe.ask(state, params, seed, range(pairs)), chunk).detach().double()
    pair_means = losses.view(pairs, 2).mean(dim=1)
    se = float(pair_means.std(unbiased=True) / math.sqrt(pairs)) if pairs > 1 else math.nan
    return float(pair_means.mean()), se


def gradient_agreement(
    loss_fn: LossFn,
    grad_fn: GradFn,
    theta: torch.Tensor,
    popsizes: Sequence[int],
    sigmas: Sequence[float],
    seed: int,
    *,
    repeats: int = 3,
    reference_samples: int = 64,
    shaping: str = "centered_ranks",
    log: Callable[[str], None] = lambda msg: None,
    progress: bool = False,
    control_variates: Sequence[str] = (),
) -> list[dict]:
    """Rows {sigma, popsize, cos_mean, cos_std, cos_min, repeats, reference_vs_gradient,
    L_sigma, L_sigma_se, cv}: the PGPE estimates' cosine to the RGS reference ∇L_σ(θ), and in ``cv``
    per control variate in ``control_variates`` (``cv_estimate``) {cos_mean, cos_std, cos_min}. ``progress``:
    done/total loss evaluations and an ETA on stderr (``mpigls.parallel.progress``)."""
    from mpigls.parallel import progress as progress_mod

    cv_cost = sum(_cv_cost(k, p, theta.numel()) for k in control_variates for p in popsizes)
    cost = len(sigmas) * (2 * reference_samples + repeats * (sum(popsizes) + cv_cost))
    report = progress_mod.for_comm(None, "diagnose", cost, unit="losses", quiet=not progress)
    exact = grad_fn(theta.detach().float()[None])[0].double()
    base = float(loss_fn(theta.detach().float()[None])[0])
    rows = []
    for sigma in sigmas:
        ref = rgs_estimate(grad_fn, theta, sigma, reference_samples, seed, repeat=1 << 20)
        l_sigma, se = smoothed_loss(loss_fn, theta, sigma, reference_samples, seed + 1)
        report.update(2 * reference_samples)
        for popsize in popsizes:
            cos = [
                cosine(pgpe_estimate(loss_fn, theta, sigma, popsize, seed, shaping=shaping, repeat=r), ref)
                for r in range(repeats)
            ]
            report.update(repeats * popsize)
            cv_rows = {}
            for kind in control_variates:
                cv_cos = []
                for r in range(repeats):
                    est, evals = cv_estimate(kind, loss_fn, exact, theta, sigma, popsize, seed, r)
                    cv_cos.append(cosine(est, ref))
                    report.update(evals)
                t = torch.tensor(cv_cos, dtype=torch.float64)
                cv_rows[kind] = {
                    "cos_mean": float(t.mean()),
                    "cos_std": float(t.std(unbiased=True)) if repeats > 1 else None,
                    "cos_min": float(t.min()),
                }
            c = torch.tensor(cos, dtype=torch.float64)
            rows.append(
                {
                    "sigma": sigma,
                    "popsize": popsize,
                    "cos_mean": float(c.mean()),
                    "cos_std": float(c.std(unbiased=True)) if repeats > 1 else None,
                    "cos_min": float(c.min()),
                    "repeats": repeats,
                    "reference_vs_gradient": cosine(ref, exact),
                    "L": base,
                    "L_sigma": l_sigma,
                    "L_sigma_se": se,
                    "cv": cv_rows,
                }
            )
            log(
                f"sigma {sigma:g}  popsize {popsize:5d}  cos(PGPE, grad L_sigma) {rows[-1]['cos_mean']:+.3f}"
                f" (min {rows[-1]['cos_min']:+.3f}, {repeats} repeats)"
                + "".join(f"  cv {k} {v['cos_mean']:+.3f}" for k, v in cv_rows.items())
            )
    report.close()
    return rows


def network_functions(model, x: torch.Tensor, y: torch.Tensor, eps: float, method: str, opts: dict | None = None):
    """(loss_fn, grad_fn) of a run's training loss on fixed examples (x, y), as functions of the
    flat parameter vectors."""
    from mpigls.objectives import losses

    opts = dict(opts or {})

    def loss_fn(points: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return losses.certified_loss(model, x, y, eps, method, weights=points, **opts)

    def grad_fn(points: torch.Tensor) -> torch.Tensor:
        points = points.detach().clone().requires_grad_(True)
        value = losses.certified_loss(model, x, y, eps, method, weights=points, **opts)
        (g,) = torch.autograd.grad(value.sum(), points)
        return g

    return loss_fn, grad_fn


# ------------------------------------------------------------------------------------ command line


def add_parser(sub) -> None:
    d = sub.add_parser(
        "diagnose", help="PGPE gradient agreement against popsize and sigma, and the smoothed loss, at checkpoints"
    )
    d.add_argument(
        "checkpoints", nargs="+", metavar="CKPT", help="checkpoints, in training order (the last: agreement)"
    )
    d.add_argument("--popsizes", default="16,64,256", help="comma-separated PGPE popsizes")
    d.add_argument("--sigmas", default="1e-3,1e-2", help="comma-separated smoothing sigmas")
    d.add_argument("--repeats", type=count(1), default=3, help="independent PGPE estimates per (popsize, sigma)")
    d.add_argument("--reference-samples", type=count(1), default=64, help="RGS samples of the reference gradient")
    d.add_argument("--num-examples", type=count(1), default=128, help="the first N training examples form the loss")
    d.add_argument("--shaping", default=None, help="PGPE fitness shaping (default: the run's, else centered_ranks)")
    d.add_argument(
        "--control-variates",
        default="grad,previous",
        help="PGPE control variates compared with plain PGPE: comma-separated among grad, previous, running "
        "(running: 3 (n + D)/n generations at the checkpoint each), or none",
    )
    d.add_argument("--out", default=None, help="JSON file (default: print only)")


def _parse_list(text: str, kind, name: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{name} must be comma-separated numbers, got {text!r}") from None
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise ValueError(f"--{name} needs positive finite values, got {text!r}")
    return values


def run(args, comm, load_checkpoint: Callable) -> int:
    """``mpigls diagnose``: rank 0 computes (one process suffices: the points are few). ``load_checkpoint``
    reads a usable checkpoint (the CLI's own, passed in)."""
    import json

    from mpigls import config as config_mod
    from mpigls.run import train as train_mod
    from mpigls.run.rundir import json_safe

    popsizes = _parse_list(args.popsizes, int, "popsizes")
    if any(p % 2 for p in popsizes):
        raise ValueError(f"--popsizes must be even (antithetic pairs), got {popsizes}")
    sigmas = _parse_list(args.sigmas, float, "sigmas")
    cvs = [] if args.control_variates.strip() in ("", "none") else args.control_variates.split(",")
    cvs = [k.strip() for k in cvs]
    if any(k not in CONTROL_VARIATES for k in cvs):
        raise ValueError(
            f"--control-variates must be among {list(CONTROL_VARIATES)} or none, got {args.control_variates!r}"
        )
    if args.repeats < 1 or args.reference_samples < 2 or args.num_examples < 1:
        raise ValueError("--repeats and --num-examples must be >= 1 and --reference-samples >= 2")
    if not comm.is_root:
        return 0
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    out: dict = {"popsizes": popsizes, "sigmas": sigmas, "checkpoints": []}
    for i, path in enumerate(args.checkpoints):
        ckpt = load_checkpoint(path)
        cfg = config_mod.from_dict(ckpt.config)
        dataset, model, _ = train_mod.build_problem(cfg)
        n = min(args.num_examples, len(dataset.train_y))
        x, y = dataset.train_x[:n], dataset.train_y[:n]
        loss_fn, grad_fn = network_functions(model, x, y, cfg.bound.eps, cfg.bound.method, cfg.bound.options)
        theta = torch.from_numpy(ckpt.theta.copy())
        entry: dict = {
            "checkpoint": str(path),
            "generation": ckpt.generation,
            "method": cfg.bound.method,
            "eps": cfg.bound.eps,
            "L": float(loss_fn(theta[None])[0]),
            "L_sigma": {},
        }
        for sigma in sigmas:
            m, se = smoothed_loss(loss_fn, theta, sigma, args.reference_samples, cfg.train.seed)
            entry["L_sigma"][f"{sigma:g}"] = {"mean": m, "se": se}
        say(
            f"{path} (generation {ckpt.generation}): L {entry['L']:.5f}  "
            + "  ".join(f"L_sigma={s} {v['mean']:.5f} ± {v['se']:.5f}" for s, v in entry["L_sigma"].items())
        )
        if i == len(args.checkpoints) - 1:
            shaping = args.shaping or getattr(cfg.optimizer.params, "fitness_shaping", "centered_ranks")
            entry["agreement"] = gradient_agreement(
                loss_fn,
                grad_fn,
                theta,
                popsizes,
                sigmas,
                cfg.train.seed,
                repeats=args.repeats,
                reference_samples=args.reference_samples,
                shaping=shaping,
                log=say,
                progress=True,
                control_variates=cvs,
            )
            entry["shaping"] = shaping
        out["checkpoints"].append(entry)
    last = out["checkpoints"][-1]["agreement"]
    heads = "".join(f" cos(PGPE cv {k}, ∇L_σ) |" for k in cvs)
    say(f"\n| sigma | popsize | cos(PGPE, ∇L_σ) mean | min |{heads} cos(∇L_σ, ∇L) |\n" + "|---:" * (5 + len(cvs)) + "|")
    for r in last:
        cells = "".join(f" {r['cv'][k]['cos_mean']:.3f} |" for k in cvs)
        say(
            f"| {r['sigma']:g} | {r['popsize']} | {r['cos_mean']:.3f} | {r['cos_min']:.3f} |{cells} "
            f"{r['reference_vs_gradient']:.3f} |"
        )
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(json.dumps(json_safe(out), indent=2) + "\n")
        say(f"wrote {args.out}")
    return 0
