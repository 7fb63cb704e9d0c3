"""Evaluation of a parameter vector: natural, PGD (empirical) and bound-certified accuracy.

Certified means every margin lower bound f_y - f_i (i != y) over the l_inf box exceeds
``precision.CERTIFY_MARGIN`` (1e-5, a guard against float rounding; computed in true fp32) for
the chosen relaxation, which also implies a correct natural prediction. The test set is cut into
fixed blocks spread over the ranks; per-block counts are gathered, so the result is identical for
any number of ranks. ``evaluate`` gives the accuracies only (training's final evaluation);
``certify`` gives per-sample results: natural, PGD with restarts, every bound method's certificate,
their union, and optionally the complete verifier (``mpigls.evaluation.verify``: verified / falsified /
unknown). ``is_certified`` is the one place that turns margin lower bounds into a certificate.

Shapes: B batch, K classes, D parameters.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from mpigls import bounds, parallel
from mpigls.nn import attacks, models
from mpigls.numerics import noise, precision

__all__ = ["evaluate", "certify", "is_certified", "partial_key", "RESULTS_SCHEMA", "RESULTS_VERSION", "results_path"]

RESULTS_SCHEMA = "mpigls-certify"
RESULTS_VERSION = 1


def is_certified(lb: torch.Tensor) -> torch.Tensor:
    """(..., K-1) margin lower bounds -> (...) bool: every margin provably positive.

    The single place that decides ``lb > 0`` for ``certify``: ``precision.certified`` (every
    margin above ``precision.CERTIFY_MARGIN``, a guard against float32 rounding).
    """
    return precision.certified(lb.detach())


def _check_methods(methods: list[str]) -> None:
    """Only bounds that are sound over the whole eps box may certify."""
    bad = [m for m in methods if m not in bounds.SOUND_METHODS]
    if bad:
        raise ValueError(
            f"cannot certify with {bad}: certification needs a bound that is sound over the whole "
            f"eps box, one of {list(bounds.SOUND_METHODS)} (sabr bounds only a small box around a PGD "
            "point: a training loss, not a certificate)"
        )


def _correct(logits: torch.Tensor, y: torch.Tensor) -> int:
    return int((logits.argmax(-1) == y).sum())


@precision.strict_fp32()  # a certificate never rests on TF32 arithmetic
def evaluate(
    model: torch.nn.Sequential,
    theta: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    methods: list[str],
    *,
    comm=None,
    batch_size: int = 100,
    pgd_steps: int = 20,
    seed: int = 0,
    bound_options: dict | None = None,
) -> dict:
    """Accuracies (fractions in [0, 1]) of ``theta`` on (x, y): natural, pgd, certified/<method>."""
    _check_methods(methods)
    comm = comm or parallel.SerialComm()
    device = next(model.parameters()).device
    models.load_flat_(model, theta.to(device))
    model.eval()
    num_blocks = -(-len(y) // batch_size)
    counts: dict[str, int] = {
        "natural": 0,
        **({"pgd": 0} if pgd_steps else {}),
        **{f"certified/{m}": 0 for m in methods},
    }
    for block in parallel.my_blocks(num_blocks, comm.rank, comm.world_size):
        sl = slice(block * batch_size, min((block + 1) * batch_size, len(y)))
        xb, yb = x[sl].to(device), y[sl].to(device)
        with torch.no_grad():
            counts["natural"] += _correct(model(xb), yb)
        if pgd_steps:
            counts["pgd"] += int(_pgd_robust(model, xb, yb, eps, pgd_steps, 1, seed, block).sum())
        for method in methods:
            with torch.no_grad() if method != "alpha-crown" else torch.enable_grad():
                lb = bounds.margin_lower_bounds(model, xb, yb, eps, method, **(bound_options or {}))
            counts[f"certified/{method}"] += int(precision.certified(lb).sum())
    gathered = comm.allgather_obj(counts)
    total = {k: sum(c[k] for c in gathered) for k in counts}
    return {k: v / len(y) for k, v in total.items()} | {"num_examples": len(y), "eps": float(eps)}


def evaluate_configured(
    cfg, model: torch.nn.Sequential, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, comm=None
) -> dict:
    """``evaluate`` with a run's settings (bound.eps, eval.methods/batch_size/pgd_steps, train.seed):
    the one place the final ``eval.json``, the live val/* metrics and a run's certify take them from."""
    ev = cfg.eval
    return evaluate(
        model,
        theta,
        x,
        y,
        cfg.bound.eps,
        list(ev.methods),
        comm=comm,
        batch_size=ev.batch_size,
        pgd_steps=ev.pgd_steps,
        seed=cfg.train.seed,
    )


def _pgd_robust(model, xb, yb, eps, steps, restarts, seed, block) -> torch.Tensor:
    """(B,) bool: still correct after every PGD restart (restart r keyed by seed, r and the block)."""
    robust = torch.ones(len(yb), dtype=torch.bool, device=yb.device)
    for r in range(restarts):
        gen = noise.torch_generator(seed, noise.STREAM_ATTACK, (1 << 30) + r, block)
        loss = "ce" if r % 2 == 0 else "margin"
        x_adv = attacks.pgd(model, xb, yb, eps, steps, attacks.default_step_size(eps, steps), generator=gen, loss=loss)
        with torch.no_grad():
            robust &= model(x_adv).argmax(-1) == yb
    return robust


@precision.strict_fp32()  # a certificate never rests on TF32 arithmetic
def certify(
    model: torch.nn.Sequential,
    theta: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    methods: list[str],
    *,
    comm=None,
    batch_size: int = 100,
    pgd_steps: int = 20,
    pgd_restarts: int = 1,
    seed: int = 0,
    bound_options: dict | None = None,
    verify: bool = False,
    verify_time_limit: float | None = 60.0,
    verify_max_domains: int | None = None,
    progress: bool = False,
    partial=None,
) -> tuple[dict, dict]:
    """Per-sample certification of ``theta`` on (x, y); returns (summary, samples).

    ``samples`` maps column names to lists of length N (test order): ``index``, ``label``,
    ``natural``, ``adversarial`` (left out when ``pgd_steps`` or ``pgd_restarts`` is 0: no attack ran,
    so there is no adversarial accuracy), ``certified/<method>``, ``margin/<method>`` (the smallest margin
    lower bound), ``certified`` (union of every method's certificate), and with ``verify``:
    ``verified`` ("verified" / "falsified" / "unknown"), ``verify/reason``, ``verify/time_s``,
    ``verify/domains``, ``verify/lps``. A sample certified by a bound is ``verified`` with reason
    ``certificate`` (the verifier is not run); every other sample goes through ``verify.verify``.
    Blocks of ``batch_size`` test examples are spread over the ranks; PGD randomness is keyed by
    the block and the verifier's by the global index, so the result does not depend on the number
    of ranks (with ``verify_time_limit=None`` and ``verify_max_domains`` it is fully deterministic).

    ``progress``: report done/total examples and an ETA on rank 0 (``parallel.progress``; never changes
    a result). ``partial``: a ``partial.PartialResults`` of this evaluation (``partial_key``): verifier
    results it holds are reused instead of recomputed, and every new one is appended to it at once,
    so an interrupted run keeps what it finished.
    """
    from mpigls.parallel import progress as progress_mod

    t0 = time.perf_counter()
    _check_methods(methods)
    comm = comm or parallel.SerialComm()
    models.load_flat_(model, theta.to(next(model.parameters()).device))
    model.eval()
    n = len(y)
    num_blocks = -(-n // batch_size)
    cols: dict[str, list] = {}
    mine = list(parallel.my_blocks(num_blocks, comm.rank, comm.world_size))
    what = "certify --verify" if verify else "certify"
    share = sum(min((b + 1) * batch_size, n) - b * batch_size for b in mine)
    verifier = _Verifier(model, x, y, eps, verify_time_limit, verify_max_domains, pgd_restarts, seed, partial)
    with progress_mod.for_comm(comm, what, share, unit="examples", quiet=not progress) as report:
        for block in mine:
            sl = slice(block * batch_size, min((block + 1) * batch_size, n))
            part = _bound_block(model, x, y, sl, block, eps, methods, pgd_steps, pgd_restarts, seed, bound_options)
            if verify:
                part |= verifier(part["index"], part["certified"], report)
            else:
                report.update(len(part["index"]))
            for key, value in part.items():
                cols.setdefault(key, []).extend(value)
    gathered = comm.allgather_obj(cols)
    samples: dict[str, list] = {}
    for part in gathered:  # ranks own contiguous runs of blocks in rank order
        for key, value in part.items():
            samples.setdefault(key, []).extend(value)
    if samples.get("index", []) != list(range(n)):
        raise RuntimeError("certify: gathered samples are not in test order")
    summary = _summarise(samples, methods, verify, n) | {
        "eps": float(eps),
        "num_examples": n,
        "time_s": time.perf_counter() - t0,
    }
    if not (pgd_steps and pgd_restarts):  # no attack ran: there is no adversarial accuracy to report
        summary.pop("adversarial")
        samples.pop("adversarial")
    return summary, samples


def _bound_block(
    model, x, y, sl: slice, block: int, eps, methods, pgd_steps, pgd_restarts, seed, bound_options
) -> dict:
    """Natural, PGD and every bound's certificate of the examples ``sl`` (block ``block``): columns."""
    device = next(model.parameters()).device
    xb, yb = x[sl].to(device), y[sl].to(device)
    part: dict[str, list] = {"index": list(range(sl.start, sl.stop)), "label": yb.tolist()}
    with torch.no_grad():
        natural = model(xb).argmax(-1) == yb
    part["natural"] = natural.tolist()
    adversarial = (
        natural & _pgd_robust(model, xb, yb, eps, pgd_steps, pgd_restarts, seed, block)
        if pgd_steps and pgd_restarts
        else natural
    )
    part["adversarial"] = adversarial.tolist()
    union = torch.zeros_like(natural)
    for method in methods:
        with torch.no_grad() if method != "alpha-crown" else torch.enable_grad():
            lb = bounds.margin_lower_bounds(model, xb, yb, eps, method, **(bound_options or {})).detach()
        cert = is_certified(lb)
        union |= cert
        part[f"certified/{method}"] = cert.tolist()
        part[f"margin/{method}"] = lb.min(dim=-1).values.double().tolist()
    part["certified"] = union.tolist()
    return part


_VERIFY_COLUMNS = ("verified", "verify/reason", "verify/time_s", "verify/domains", "verify/lps")


class _Verifier:
    """The complete verifier over the examples no bound certifies, with kept rows reused (``partial``)."""

    def __init__(self, model, x, y, eps, time_limit, max_domains, pgd_restarts, seed, partial):
        self.model, self.x, self.y, self.eps = model, x, y, eps
        self.time_limit, self.max_domains, self.pgd_restarts, self.seed = time_limit, max_domains, pgd_restarts, seed
        self.partial = partial
        self.net = self.model64 = None

    def one(self, idx: int) -> tuple:
        from mpigls.evaluation import verify as verify_mod

        kept = self.partial.get(idx) if self.partial is not None else None
        if kept is not None:
            return kept
        if self.net is None:
            self.net = verify_mod.dense_network(self.model, tuple(self.x.shape[1:]))
            self.model64 = verify_mod._model64(self.model)
        res = verify_mod.verify(
            self.model,
            self.x[idx],
            int(self.y[idx]),
            self.eps,
            net=self.net,
            model64=self.model64,
            time_limit=self.time_limit,
            max_domains=self.max_domains,
            pgd_restarts=max(self.pgd_restarts, 1),
            seed=self.seed,
            index=idx,
        )
        row = (res.status, res.reason, res.time_s, res.domains, res.lps)
        if self.partial is not None:
            self.partial.put(idx, row)
        return row

    def __call__(self, indices: list[int], certified: list[bool], report) -> dict[str, list]:
        cols: dict[str, list] = {k: [] for k in _VERIFY_COLUMNS}
        for idx, cert in zip(indices, certified):
            row = ("verified", "certificate", 0.0, 0, 0) if cert else self.one(idx)
            for key, value in zip(_VERIFY_COLUMNS, row):
                cols[key].append(value)
            report.update(1)
        return cols


def partial_key(model, theta, x, y, eps, methods, **settings) -> str:
    """The ``partial.evaluation_key`` of a ``certify`` call: θ, the network, the examples, eps, the
    methods and the other keyword settings of ``certify`` (batch size, PGD, seed, verifier limits)."""
    from mpigls.evaluation import partial

    return partial.evaluation_key(model, theta, x, y, {"eps": float(eps), "methods": list(methods), **settings})


def _summarise(samples: dict, methods: list[str], verify: bool, n: int) -> dict:
    def frac(key):
        return float(np.mean(samples[key])) if n else 0.0

    out = {"natural": frac("natural"), "adversarial": frac("adversarial"), "certified": frac("certified")}
    out |= {f"certified/{m}": frac(f"certified/{m}") for m in methods}
    if verify:
        status = samples["verified"]
        out["verified"] = status.count("verified") / n if n else 0.0
        out["unknown"] = status.count("unknown")
        out["falsified"] = status.count("falsified")
        searched = [t for t, r in zip(samples["verify/time_s"], samples["verify/reason"]) if r != "certificate"]
        out["verify/searched"] = len(searched)
        out["verify/mean_time_s"] = float(np.mean(searched)) if searched else 0.0
    return out


def results_path(checkpoint_path, eps: float):
    """Where ``mpigls certify`` stores the per-sample results of a checkpoint: beside it."""
    from pathlib import Path

    p = Path(checkpoint_path)
    return p.with_name(f"{p.stem}.certify-eps{eps:g}.json")
