"""Evaluation of a parameter vector: natural, PGD (empirical) and bound-certified accuracy.

Certified means every margin lower bound f_y - f_i (i != y) over the l_inf box exceeds
``precision.CERTIFY_MARGIN`` (1e-5, a guard against float rounding; computed in true fp32) for
the chosen relaxation, which also implies a correct natural prediction. The test set is cut into
fixed blocks spread over the ranks; per-block counts are gathered, so the result is identical for
any number of ranks. Complete (branch-and-bound) verification is not implemented: certified
accuracies here are sound lower bounds on the true robust accuracy.

Shapes: B batch, K classes, D parameters.
"""
from __future__ import annotations

import torch

from . import attacks, bounds, dist, models, noise, precision

__all__ = ["evaluate"]


def _correct(logits: torch.Tensor, y: torch.Tensor) -> int:
    return int((logits.argmax(-1) == y).sum())


@precision.strict_fp32()  # a certificate never rests on TF32 arithmetic
def evaluate(model: torch.nn.Sequential, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, eps: float,
             methods: list[str], *, comm=None, batch_size: int = 100, pgd_steps: int = 20, seed: int = 0,
             bound_options: dict | None = None) -> dict:
    """Accuracies (fractions in [0, 1]) of ``theta`` on (x, y): natural, pgd, certified/<method>."""
    comm = comm or dist.SerialComm()
    device = next(model.parameters()).device
    models.load_flat_(model, theta.to(device))
    model.eval()
    num_blocks = -(-len(y) // batch_size)
    counts: dict[str, int] = {"natural": 0, **({"pgd": 0} if pgd_steps else {}), **{f"certified/{m}": 0 for m in methods}}
    for block in dist.my_blocks(num_blocks, comm.rank, comm.world_size):
        sl = slice(block * batch_size, min((block + 1) * batch_size, len(y)))
        xb, yb = x[sl].to(device), y[sl].to(device)
        with torch.no_grad():
            counts["natural"] += _correct(model(xb), yb)
        if pgd_steps:
            gen = noise.torch_generator(seed, noise.STREAM_ATTACK, 1 << 30, block)
            x_adv = attacks.pgd(model, xb, yb, eps, pgd_steps, 2.5 * eps / pgd_steps, generator=gen)
            with torch.no_grad():
                counts["pgd"] += _correct(model(x_adv), yb)
        for method in methods:
            with torch.no_grad() if method != "alpha-crown" else torch.enable_grad():
                lb = bounds.margin_lower_bounds(model, xb, yb, eps, method, **(bound_options or {}))
            counts[f"certified/{method}"] += int(precision.certified(lb).sum())
    gathered = comm.allgather_obj(counts)
    total = {k: sum(c[k] for c in gathered) for k in counts}
    return {k: v / len(y) for k, v in total.items()} | {"num_examples": len(y), "eps": float(eps)}
