"""Loss landscapes: the original and the Gaussian-smoothed certified loss along one direction.

Reproduces Figure 6 of the GLS paper (arXiv 2403.07095, Sec. 3.1): for a trained network theta,
a unit direction d (the gradient of the DeepPoly robust loss) and steps alpha,
    original:  L_m(theta + alpha d)
    smoothed:  L_{m,sigma}(theta + alpha d) = E_z L_m(theta + alpha d + sigma z),  z ~ N(0, I_D),
estimated by the mean over num_samples draws with a 95% normal confidence interval
(1.96 * std / sqrt(n)), for several relaxations m and several sigma. The draws z_k come from
mpigls.numerics.noise (stream STREAM_PGPE, generation 0, member k, under the given seed) and are shared by
every alpha, sigma and relaxation (common random numbers), so differences between curves are not
sampling noise of independent draws. The plot divides every curve by its own value at alpha = 0
(the paper's normalisation: 1 means "the loss at the unperturbed step").

Shapes: A steps (alphas), S sigmas, M methods, n samples, D parameters, B batch.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mpigls import bounds
from mpigls.nn import models
from mpigls.numerics import noise, precision
from mpigls.objectives import losses
from mpigls.parallel import progress as progress_mod

__all__ = ["landscape", "deeppoly_gradient_direction", "plot_landscape", "run_from_checkpoint"]


def _check_inputs(alphas, sigmas, methods, num_samples) -> tuple[np.ndarray, np.ndarray, list[str]]:
    alphas = np.asarray(alphas, dtype=np.float64).reshape(-1)
    sigmas = np.asarray(sigmas, dtype=np.float64).reshape(-1)
    if alphas.size == 0 or not np.all(np.isfinite(alphas)):
        raise ValueError(f"alphas must be a non-empty list of finite steps, got {alphas.tolist()}")
    if np.any(sigmas <= 0) or not np.all(np.isfinite(sigmas)):
        raise ValueError(f"sigmas must be positive finite numbers, got {sigmas.tolist()}")
    methods = [methods] if isinstance(methods, str) else list(methods)
    if not methods:
        raise ValueError("methods must name at least one relaxation, e.g. ['ibp', 'deeppoly']")
    if not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an integer >= 2 (for a confidence interval), got {num_samples!r}")
    return alphas, sigmas, methods


@torch.no_grad()
def _losses(model, x, y, eps, method, num_rows: int, make_rows, chunk_size: int, opts: dict, report) -> torch.Tensor:
    """Certified loss of weight rows 0..num_rows-1 -> (num_rows,) float64; ``make_rows(start, stop)``
    builds one chunk (stop - start, D) at a time so all rows never sit in memory together; ``report``
    (a ``parallel.progress.Progress``) is told of every chunk done."""
    out = []
    for i in range(0, num_rows, chunk_size):
        stop = min(i + chunk_size, num_rows)
        out.append(losses.certified_loss(model, x, y, eps, method, weights=make_rows(i, stop), **opts).reshape(-1))
        report.update(stop - i)
    return torch.cat(out).to("cpu", torch.float64)


@precision.strict_fp32()
def landscape(
    model: nn.Sequential,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    direction: torch.Tensor,
    alphas: Sequence[float] | np.ndarray,
    sigmas: Sequence[float] | np.ndarray,
    methods: Sequence[str] = ("ibp", "crown-ibp", "deeppoly"),
    num_samples: int = 128,
    seed: int = 0,
    *,
    chunk_size: int = 64,
    progress: bool = False,
    **loss_opts,
) -> dict:
    """Original and smoothed certified losses along theta + alpha * direction (theta = the model's weights).

    Returns a dict: "alphas" (A,), "sigmas" (S,), "methods" [M names], "original" (M, A),
    "smoothed_mean" (M, S, A), "smoothed_ci" (M, S, A) half-width of the 95% CI,
    "num_nonfinite" (M, S, A) draws left out of the mean because their loss was not finite,
    "num_samples", "eps", "seed". Arrays are float64 numpy. ``loss_opts`` go to
    mpigls.objectives.losses.certified_loss (e.g. memory_budget_mb); ``chunk_size`` weight rows are
    evaluated per call. ``progress``: done/total losses and an ETA on stderr (``parallel.progress``).
    """
    alpha_a, sigma_a, method_l = _check_inputs(alphas, sigmas, methods, num_samples)
    theta = models.flat_params(model)  # (D,)
    num_weights = theta.numel()
    direction = torch.as_tensor(direction).detach().to(theta.device, torch.float32).reshape(-1)
    if direction.numel() != num_weights:
        raise ValueError(f"direction must have one entry per parameter ({num_weights}), got {direction.numel()}")
    alpha_t = torch.as_tensor(alpha_a, dtype=torch.float32, device=theta.device)
    line = theta + alpha_t[:, None] * direction  # (A, D)
    z = noise.noise_block(seed, 0, range(num_samples), num_weights, noise.STREAM_PGPE).to(theta.device)  # (n, D)
    shape = (len(method_l), len(sigma_a), len(alpha_a))
    original = np.empty(shape[::2])
    mean, ci, bad = np.empty(shape), np.empty(shape), np.zeros(shape, dtype=np.int64)
    num_alphas = len(alpha_a)
    total = len(method_l) * num_alphas * (1 + len(sigma_a) * num_samples)
    report = progress_mod.Progress("landscape", total, unit="losses", enabled=progress)
    for mi, method in enumerate(method_l):
        original[mi] = _losses(
            model, x, y, eps, method, num_alphas, lambda a, b: line[a:b], chunk_size, loss_opts, report
        ).numpy()
        for si, sigma in enumerate(sigma_a):
            # row k is step k // n with draw k % n: all steps of one sigma share the calls
            def rows(start, stop, sigma=float(sigma)):
                k = torch.arange(start, stop, device=theta.device)
                return line[k // num_samples] + sigma * z[k % num_samples]

            r_all = _losses(model, x, y, eps, method, num_alphas * num_samples, rows, chunk_size, loss_opts, report)
            for ai, r in enumerate(r_all.view(num_alphas, num_samples)):
                r = r[torch.isfinite(r)]
                bad[mi, si, ai] = num_samples - r.numel()
                mean[mi, si, ai] = float(r.mean()) if r.numel() else math.nan
                ci[mi, si, ai] = 1.96 * float(r.std()) / math.sqrt(r.numel()) if r.numel() > 1 else math.nan
    report.close()
    return {
        "alphas": alpha_a,
        "sigmas": sigma_a,
        "methods": method_l,
        "original": original,
        "smoothed_mean": mean,
        "smoothed_ci": ci,
        "num_nonfinite": bad,
        "num_samples": num_samples,
        "eps": float(eps),
        "seed": int(seed),
    }


@precision.strict_fp32()
def deeppoly_gradient_direction(
    model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, eps: float, method: str = "deeppoly", **loss_opts
) -> torch.Tensor:
    """Unit vector (D,) along the gradient (ascent direction) of the ``method`` robust loss at the
    model's weights, by autograd through the relaxation. The model is not modified."""
    if method in bounds.registry.RELAXATIONS and not bounds.registry.get(method).differentiable:
        raise ValueError(
            f"{method} bounds are detached (no gradient to the weights); use a differentiable "
            f"relaxation for the direction, e.g. deeppoly"
        )
    tensors = list(model.parameters())
    loss = losses.certified_loss(model, x, y, eps, method, **loss_opts)
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    flat = torch.cat([(torch.zeros_like(t) if g is None else g).reshape(-1) for t, g in zip(tensors, grads)])
    norm = float(torch.linalg.vector_norm(flat))
    if not math.isfinite(norm) or norm == 0.0:
        raise ValueError(
            f"the {method} loss gradient has norm {norm} at these weights, so it gives no direction; "
            "use another batch, a larger eps or pass an explicit direction"
        )
    return (flat / norm).detach().to(torch.float32)


def plot_landscape(result: dict, path: str | Path, *, title: str | None = None) -> Path:
    """PNG like the paper's Figure 6: panel (a) the original loss, then one panel per sigma; one
    curve per relaxation, each divided by its own value at the alpha nearest 0; shaded 95% CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas, sigmas, methods = result["alphas"], result["sigmas"], result["methods"]
    zero = int(np.argmin(np.abs(alphas)))
    fig, axes = plt.subplots(1, 1 + len(sigmas), figsize=(3.6 * (1 + len(sigmas)), 3.2), squeeze=False)
    axes = axes[0]
    for mi, method in enumerate(methods):
        curve = result["original"][mi]
        axes[0].plot(alphas, curve / _nonzero(curve[zero]), label=method)
        for si in range(len(sigmas)):
            mean, ci = result["smoothed_mean"][mi, si], result["smoothed_ci"][mi, si]
            ref = _nonzero(mean[zero])
            (line,) = axes[1 + si].plot(alphas, mean / ref, label=method)
            axes[1 + si].fill_between(alphas, (mean - ci) / ref, (mean + ci) / ref, color=line.get_color(), alpha=0.25)
    axes[0].set_title("(a) original")
    for si, sigma in enumerate(sigmas):
        axes[1 + si].set_title(f"({chr(ord('b') + si)}) smoothed, sigma={sigma:g}")
    for ax in axes:
        ax.set_xlabel("step along direction")
        ax.axvline(0.0, color="grey", lw=0.5)
    axes[0].set_ylabel("loss / loss at 0")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _nonzero(value: float) -> float:
    return value if value != 0 and math.isfinite(value) else 1.0


def run_from_checkpoint(
    model: nn.Sequential,
    theta: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    sigmas: Sequence[float],
    methods: Sequence[str] = ("ibp", "crown-ibp", "deeppoly"),
    num_samples: int = 128,
    num_points: int = 41,
    radius: float | None = None,
    seed: int = 0,
    out: str | Path = "landscape.png",
    direction_method: str = "deeppoly",
    progress: bool = False,
    **loss_opts,
) -> Path:
    """Figure 6 for weights ``theta`` (D,): DeepPoly gradient direction, num_points steps in
    [-radius, radius] (default radius: 5 * max sigma), then plot to ``out``. ``model`` is copied,
    not modified; ``progress`` as in ``landscape``. Returns the PNG path."""
    if num_points < 2:
        raise ValueError(f"num_points must be >= 2, got {num_points}")
    net = copy.deepcopy(model)
    models.load_flat_(net, torch.as_tensor(theta).reshape(-1))
    radius = 5.0 * max(float(s) for s in sigmas) if radius is None else float(radius)
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    direction = deeppoly_gradient_direction(net, x, y, eps, direction_method, **loss_opts)
    alphas = np.linspace(-radius, radius, num_points if num_points % 2 else num_points + 1)  # odd: 0 is a step
    result = landscape(
        net, x, y, eps, direction, alphas, sigmas, methods, num_samples, seed, progress=progress, **loss_opts
    )
    return plot_landscape(
        result, out, title=f"eps={eps:g}, direction: {direction_method} gradient, {num_samples} samples"
    )
