"""Pictures of runs: training curves of one or more runs overlaid (``mpigls plot``) and
certified-accuracy-over-radius curves (``mpigls tightness``). Matplotlib with the Agg backend;
no state kept between calls.

Default panels: training loss (member mean solid, best member dashed), validation accuracy
(``val/*``: natural solid, PGD dashed, certified dotted/dash-dotted), σ of PGPE (mean, with the
min–max band), the eps and lr schedules, and seconds per generation. Colour = run. Noisy curves
(loss, time) are drawn raw and faint with a centred moving average on top.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from mpigls.analysis.runs import Run

__all__ = ["smooth", "plot_runs", "plot_tightness"]

_VAL_STYLES = {"val/natural": "-", "val/pgd": "--", "val/adversarial": "--"}
_CERT_STYLES = (":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over ``window`` points that skips NaNs (NaN where a window has none)."""
    v = np.asarray(values, dtype=np.float64)
    if window <= 1 or v.size == 0:
        return v.copy()
    ok = np.isfinite(v)
    kernel = np.ones(window)
    sums = np.convolve(np.where(ok, v, 0.0), kernel, mode="same")
    counts = np.convolve(ok.astype(np.float64), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _auto_window(n: int) -> int:
    w = max(1, n // 25)
    return w + 1 - w % 2  # odd, so the average is centred


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _line(ax, run: Run, key: str, color, style="-", window: int | None = None, label: str | None = None) -> bool:
    if key not in run.metrics:
        return False
    gens, values = run.series(key)
    if values.size == 0:
        return False
    w = _auto_window(values.size) if window is None else window
    if w >= 3 and values.size > w:
        ax.plot(gens, values, color=color, linestyle=style, alpha=0.25, linewidth=0.8)
        ax.plot(gens, smooth(values, w), color=color, linestyle=style, linewidth=1.6, label=label)
    else:
        ax.plot(
            gens,
            values,
            color=color,
            linestyle=style,
            linewidth=1.4,
            marker="." if values.size < 30 else None,
            label=label,
        )
    return True


def _style_legend(ax, entries: list[tuple[str, Any]], top: bool = False) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="0.3", linestyle=s) for _, s in entries]
    where = {"loc": "upper center", "ncol": min(len(entries), 4)} if top else {"loc": "best"}
    ax.legend(handles, [n for n, _ in entries], fontsize=7, frameon=False, handlelength=2.5, **where)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=8, color="0.4")


def _val_style(key: str, cert_keys: list[str]):
    if key in _VAL_STYLES:
        return _VAL_STYLES[key]
    return _CERT_STYLES[cert_keys.index(key) % len(_CERT_STYLES)] if key in cert_keys else "-"


def _default_panels(axes, runs: list[Run], colors, window) -> None:
    ax = axes[0]
    drawn = False
    for run, c in zip(runs, colors):
        drawn |= _line(ax, run, "loss/mean", c, "-", window)
        drawn |= _line(ax, run, "loss/min", c, "--", window)
    ax.set_title("training loss")
    if drawn:
        _style_legend(ax, [("population mean", "-"), ("best member", "--")])
        values = np.concatenate(
            [run.series(k)[1] for run in runs for k in ("loss/mean", "loss/min") if k in run.metrics]
        )
        if values.size and values.min() > 0 and values.max() / values.min() > 20:  # spans decades
            ax.set_yscale("log")

    ax = axes[1]
    val_keys = sorted(
        {k for r in runs for k in r.metrics if k.startswith("val/")}, key=lambda k: (k not in _VAL_STYLES, k)
    )
    cert_keys = [k for k in val_keys if k not in _VAL_STYLES]
    for run, c in zip(runs, colors):
        for key in val_keys:
            _line(ax, run, key, c, _val_style(key, cert_keys), window=1)
    ax.set_title("validation accuracy")
    if val_keys:
        _style_legend(ax, [(k[4:], _val_style(k, cert_keys)) for k in val_keys], top=True)
        ax.set_ylim(-0.02, 1.22)  # the band above 1 holds the legend
        ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    else:
        _empty(ax, "no val/* metrics\n(train with --set eval.every=N)")

    ax = axes[2]
    drawn = False
    for run, c in zip(runs, colors):
        if _line(ax, run, "pgpe/sigma_mean", c, "-", window=1):
            drawn = True
            if "pgpe/sigma_min" in run.metrics and "pgpe/sigma_max" in run.metrics:
                g, lo = run.series("pgpe/sigma_min")
                g2, hi = run.series("pgpe/sigma_max")
                if np.array_equal(g, g2):
                    ax.fill_between(g, lo, hi, color=c, alpha=0.15, linewidth=0)
    ax.set_title("σ (PGPE): mean, min–max band")
    if not drawn:
        _empty(ax, "no σ recorded (GRAD / RGS runs)")

    for ax, key, title, log in (
        (axes[3], "sched/eps", "eps schedule", False),
        (axes[4], "sched/lr", "learning rate", True),
        (axes[5], "time/generation_s", "seconds per generation", False),
    ):
        drawn = False
        for run, c in zip(runs, colors):
            drawn |= _line(ax, run, key, c, "-", window if key.startswith("time/") else 1)
        ax.set_title(title)
        seen = [v for run in runs if key in run.metrics for v in run.series(key)[1]]
        if drawn and log and min(seen) > 0 and max(seen) / min(seen) > 20:
            ax.set_yscale("log")
        if not drawn:
            _empty(ax, f"{key} not recorded")


def plot_runs(
    runs: list[Run],
    out: str | os.PathLike,
    keys: list[str] | None = None,
    window: int | None = None,
    title: str | None = None,
) -> Path:
    """Draw ``runs`` overlaid into ``out`` (see the module docstring); ``keys`` draws one panel per
    metric instead of the default panels; ``window`` fixes the moving-average length (1: none).
    Returns the path written."""
    if not runs:
        raise ValueError("plot needs at least one run directory or checkpoint")
    if keys:
        available = sorted({k for r in runs for k in r.metrics})
        missing = [k for k in keys if not any(k in r.metrics for r in runs)]
        if missing:
            raise ValueError(f"metric key(s) {missing} not recorded in any of the runs; available: {available}")
    plt = _pyplot()
    n_panels = len(keys) if keys else 6
    ncols = 2 if n_panels > 1 else 1
    nrows = -(-n_panels // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 2.7 * nrows + 0.5), squeeze=False)
    flat = list(axes.ravel())
    colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(runs))]
    if keys:
        for ax, key in zip(flat, keys):
            for run, c in zip(runs, colors):
                _line(ax, run, key, c, "-", window)
            ax.set_title(key)
    else:
        _default_panels(flat, runs, colors, window)
    for ax in flat[n_panels:]:
        ax.set_visible(False)
    for ax in flat[:n_panels]:
        ax.set_xlabel("generation", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.title.set_fontsize(9)
    from matplotlib.lines import Line2D

    fig.legend(
        [Line2D([], [], color=c, linewidth=2) for c in colors],
        [f"{r.label} (gen {int(r.generations[-1]) if r.generations.size else 0})" for r in runs],
        loc="upper center",
        ncol=min(len(runs), 3),
        fontsize=8,
        frameon=False,
    )
    if title:
        fig.suptitle(title, y=0.995, fontsize=10)
    top = 1 - (0.15 + 0.2 * ((len(runs) + 2) // 3) + (0.2 if title else 0)) / (2.7 * nrows + 0.5)
    fig.tight_layout(rect=(0, 0, 1, top))
    path = Path(out)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_tightness(result: dict, out: str | os.PathLike, eps: float | None = None, title: str | None = None) -> Path:
    """Certified accuracy over radius per relaxation (AUC in the legend) into ``out``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    radii = result["radii"]
    for method, curve in result["methods"].items():
        ax.plot(
            radii,
            curve["certified"],
            marker="o",
            markersize=3,
            label=f"{method} (AUC {curve['auc']:.4g}, mean {100 * curve['auc_normalized']:.1f}%)",
        )
    if eps is not None and radii[0] <= eps <= radii[-1]:
        ax.axvline(eps, color="0.5", linestyle=":", linewidth=1, label=f"training eps {eps:g}")
    ax.set_xlabel("radius (l_inf, pixel space)")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(-0.02, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, frameon=False)
    ax.set_title(title or f"tightness: certified accuracy over radius ({result['num_examples']} examples)", fontsize=9)
    fig.tight_layout()
    path = Path(out)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
