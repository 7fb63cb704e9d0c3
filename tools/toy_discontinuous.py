"""Gaussian Loss Smoothing on the paper's toy discontinuous loss (GLS paper, Sec. 3.1, Fig. 5a).

The DeepPoly lower bound of the one-neuron network y = ReLU(x + w) + 1 over x in [-1, 1] is
    l(w) = 1 + 1[w > 0] * (w - 1)        (= 1 for w <= 0, = w for w > 0),
which we minimise. Its infimum, 0, is approached from w > 0, right next to a jump up to 1 at w = 0.
Plain gradient descent sees slope 0 on w < 0 and never moves from there; started at w > 0 it
slides down, jumps over the discontinuity and is then stuck at loss 1. The Gaussian-smoothed loss
    L_s(w) = E l(w + s z) = Phi(-w/s) + w Phi(w/s) + s phi(w/s),   dL_s/dw = Phi(w/s) - phi(w/s)/s,
is smooth, and PGPE, which follows its gradient from loss evaluations only, crosses the
discontinuity from either side and settles near the smoothed minimiser (w = s * t with
s Phi(t) = phi(t)), where the original loss is well below 1.

Usage:  python tools/toy_discontinuous.py --out toy_discontinuous.png
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import torch

from mpigls.optim import grad as gradopt, pgpe


def toy_loss(w: torch.Tensor) -> torch.Tensor:
    """l(w) elementwise; autograd gives slope 0 for w < 0 and 1 for w > 0."""
    return torch.where(w > 0, w, torch.ones_like(w))


def smoothed_toy_loss(w: np.ndarray, sigma: float) -> np.ndarray:
    t = np.asarray(w, dtype=np.float64) / sigma
    cdf = 0.5 * (1 + np.vectorize(math.erf)(t / math.sqrt(2)))
    pdf = np.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)
    return (1 - cdf) + w * cdf + sigma * pdf


def run_gls(
    w0: float, *, steps: int = 300, sigma: float = 0.3, popsize: int = 16, lr: float = 0.05, seed: int = 0
) -> np.ndarray:
    """PGPE (Adam, fixed sigma, centered ranks) on l; returns the centre trajectory (steps + 1,)."""
    params = pgpe.PGPEParams(popsize=popsize, lr=lr, sigma_init=sigma, fixed_sigma=True, step_rule="adam")
    state = pgpe.init(params, torch.tensor([w0]))
    path = [w0]
    for _ in range(steps):
        population = pgpe.ask(state, params, seed, range(popsize // 2))
        state, _ = pgpe.tell(state, params, seed, toy_loss(population[:, 0]))
        path.append(float(state.center[0]))
    return np.array(path)


def run_gd(w0: float, *, steps: int = 300, lr: float = 0.05) -> np.ndarray:
    """Plain gradient descent on l with autograd gradients; returns the trajectory (steps + 1,)."""
    params = gradopt.GRADParams(lr=lr, step_rule="sgd", grad_clip=None)
    state = gradopt.init(params, torch.tensor([w0]))
    path = [w0]
    for _ in range(steps):
        w = state.center.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(toy_loss(w).sum(), w)
        state, _ = gradopt.tell(state, params, g)
        path.append(float(state.center[0]))
    return np.array(path)


def plot(path: str, *, steps: int, sigma: float, seed: int, starts=(-0.5, 0.8)) -> dict:
    """Write the figure; returns the final w and l(w) of every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {}
    for w0 in starts:
        runs[f"GD from w0={w0}"] = run_gd(w0, steps=steps)
        runs[f"GLS/PGPE from w0={w0}"] = run_gls(w0, steps=steps, sigma=sigma, seed=seed)
    fig, (ax_loss, ax_path) = plt.subplots(1, 2, figsize=(11, 4))
    grid = np.linspace(-1.5, 1.5, 1201)
    ax_loss.plot(grid, toy_loss(torch.from_numpy(grid)).numpy(), "k", lw=2, label="original l(w)")
    for s in sorted({0.1, sigma, 1.0}):
        ax_loss.plot(grid, smoothed_toy_loss(grid, s), label=f"smoothed, sigma={s:g}")
    for name, traj in runs.items():
        ax_loss.plot(
            traj[-1],
            float(toy_loss(torch.tensor(traj[-1]))),
            "o" if "GLS" in name else "x",
            ms=9,
            label=f"end of {name}",
        )
        ax_path.plot(traj, ls="-" if "GLS" in name else "--", label=name)
    ax_loss.set(xlabel="w", ylabel="loss", title="Original vs Gaussian-smoothed toy loss")
    ax_loss.legend(fontsize=7)
    ax_path.axhline(0.0, color="grey", lw=0.5)
    ax_path.set(xlabel="step", ylabel="w", title=f"Trajectories (PGPE sigma={sigma:g}, popsize 16)")
    ax_path.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return {name: (float(t[-1]), float(toy_loss(torch.tensor(t[-1])))) for name, t in runs.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="toy_discontinuous.png", help="PNG file to write")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--sigma", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    finals = plot(args.out, steps=args.steps, sigma=args.sigma, seed=args.seed)
    for name, (w, loss) in finals.items():
        print(f"{name:28s} final w = {w:+.4f}   l(w) = {loss:.4f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
