"""Tightness of relaxations on one network: certified accuracy over a range of radii per relaxation
and the area under that curve (Jovanović et al. 2022, "On the Paradox of Certified Training",
arXiv 2102.06700; used in the GLS paper's Fig. 1 and Sec. 2.2).

For radii 0 = r_0 < r_1 < ... < r_n, acc_m(r) is the fraction of test examples whose margin lower
bounds under relaxation m are all positive at radius r (``certify.evaluate``; rank-count
independent). The tightness of m is AUC_m = ∫_0^{r_n} acc_m(r) dr by the trapezoid rule, in units
of radius; ``auc_normalized`` = AUC_m / r_n (the mean certified accuracy over [0, r_n], in [0, 1]).
Larger is tighter. Absolute values depend on the network and on r_n: compare relaxations on the
same network and grid. At r = 0 every sound bound is exact, so acc_m(0) is the natural accuracy
(up to exact ties between logits).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from mpigls.evaluation import certify
from mpigls.parallel import progress as progress_mod

__all__ = ["SCHEMA", "DEFAULT_METHODS", "radii_grid", "auc", "tightness"]

SCHEMA = "mpigls-tightness"
DEFAULT_METHODS = ("ibp", "hbox", "crown-ibp", "deeppoly")


def radii_grid(max_eps: float, num_radii: int) -> list[float]:
    """num_radii equally spaced radii from 0 to max_eps (both included)."""
    if not max_eps > 0:
        raise ValueError(f"tightness needs a largest radius > 0, got {max_eps}; pass --max-eps, e.g. 0.2")
    if num_radii < 2:
        raise ValueError(f"tightness needs at least 2 radii (0 and --max-eps), got {num_radii}")
    return [float(r) for r in np.linspace(0.0, max_eps, num_radii)]


def auc(radii, accuracies) -> float:
    """Trapezoid-rule area under accuracy(radius)."""
    r = np.asarray(radii, dtype=np.float64)
    a = np.asarray(accuracies, dtype=np.float64)
    return float(np.sum((r[1:] - r[:-1]) * (a[1:] + a[:-1]) / 2.0))


def tightness(
    model: torch.nn.Sequential,
    theta: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    radii: list[float],
    methods: list[str],
    *,
    comm=None,
    batch_size: int = 100,
    progress: bool = False,
) -> dict:
    """Certified-accuracy curves and their areas (collective: every rank calls it). ``progress``:
    done/total radii and an ETA on rank 0's stderr (``parallel.progress``)."""
    radii = [float(r) for r in radii]
    if not radii or radii[0] != 0.0 or any(b <= a for a, b in zip(radii, radii[1:])):
        raise ValueError(f"tightness radii must start at 0 and increase, got {radii}")
    if not methods:
        raise ValueError("tightness needs at least one bound method, e.g. --methods ibp,deeppoly")
    t0 = time.perf_counter()
    curves: dict[str, list[float]] = {m: [] for m in methods}
    natural = None
    with progress_mod.for_comm(comm, "tightness", len(radii), unit="radii", quiet=not progress) as report:
        for r in radii:
            res = certify.evaluate(model, theta, x, y, r, list(methods), comm=comm, batch_size=batch_size, pgd_steps=0)
            natural = res["natural"]
            for m in methods:
                curves[m].append(float(res[f"certified/{m}"]))
            report.update(1)
    r_max = radii[-1]
    return {
        "schema": SCHEMA,
        "radii": radii,
        "natural_accuracy": natural,
        "num_examples": len(y),
        "methods": {
            m: {"certified": curves[m], "auc": auc(radii, curves[m]), "auc_normalized": auc(radii, curves[m]) / r_max}
            for m in methods
        },
        "time_s": time.perf_counter() - t0,
    }
