"""PGPE: Policy Gradients with Parameter-based Exploration on the Gaussian-smoothed loss.

Sehnke et al. 2010, "Parameter-exploring policy gradients" (Neural Networks 23(4)); used as the
zeroth-order Gaussian Loss Smoothing optimizer in Balauca, Müller, Mao, Baader, Fischer and Vechev,
"Gaussian Loss Smoothing Enables Certified Training with Tight Convex Relaxations" (arXiv 2403.07095,
Sec. 3.1, Eq. for grad_theta / grad_sigma). We MINIMISE the loss L; L_sigma(theta) = E_z L(theta + sigma*z).

One generation with n = popsize/2 antithetic pairs j, z_j ~ N(0, I_D) and eps_j = sigma * z_j:
    r+_j = L(theta + eps_j),   r-_j = L(theta - eps_j)          losses ordered [+0,-0,+1,-1,...]
    u = shaping(r)  (centered ranks / normalized / raw, over the valid members)
    g_theta = 1/n * sum_j (u+_j - u-_j) / (2 sigma) * z_j         (raw: unbiased for grad L_sigma)
    g_sigma = 1/n * sum_j ((u+_j + u-_j)/2 - b) * (z_j^2 - 1) / sigma,   b = mean of all u
The centre takes a step-rule step (Adam or ClipUp) along g_theta, plus decoupled weight decay.
sigma takes the paper's step sigma <- sigma - sigma_lr * sum_j (...)(eps_j^2 - sigma^2)/sigma / n,
which equals sigma - sigma_lr * sigma^2 * g_sigma: the scale-free (natural-gradient-like) form of
the paper and EvoTorch, so that sigma_lr means a relative change whatever the size of sigma. The
relative change per step is bounded by sigma_max_change (EvoTorch: 0.2), then sigma is clamped
to [sigma_min, sigma_max].

Control variate (optimizer.control_variate, default "none"). For any vector g that does not depend on
this generation's noise,
    g_theta = g + 1/n * sum_j z_j [ (r+_j - r-_j)/2 - eps_j . g ] / sigma        (eps_j = sigma * z_j)
has the same expectation as the raw estimate, grad L_sigma(theta): E[z_j (eps_j . g)] / sigma
= E[z z^T] (sigma g) / sigma = g per coordinate, so the subtracted term has mean g exactly. Its
variance comes only from what g does not predict of the antithetic difference: third and higher
order curvature and the jumps of a discontinuous bound, which the smoothing is for; so it stays an
estimate of the SMOOTHED gradient (RGS misses the jump terms), while its smooth part is nearly exact
at any popsize. g is one of
    "grad"      the backpropagated gradient of the loss at theta on the generation's batch (one backward
                pass; needs a differentiable bound);
    "previous"  the previous generation's estimate (zeroth order: any bound, alpha-CROWN included);
    "running"   a running average of past estimates, m <- (1 - a) m + a g_theta (zeroth order), a =
                optimizer.cv_rate or n/(n + D). Why that gain: with m's error e = grad - m and
                A = 1/n sum_j z_j z_j^T, the error after a step is (I - a A) e, whose squared norm has
                expectation (1 - 2a + a^2 (1 + (D + 1)/n)) |e|^2 (Gaussian z): smallest at a ~ n/(n + D),
                and growing for a > 2n/(n + D). So "previous" (a = 1) diverges when n < D: the
                previous estimate's own noise, D/n times its signal, enters the next one.
The subtraction is linear in the losses, and fitness shaping (centered ranks, normalisation by this
generation's spread) is not, so a control variate requires fitness_shaping "raw": the estimate is then
unbiased, and the step rule (Adam, ClipUp) provides the scale normalisation that shaping would (Adam's
step is invariant to a positive rescaling of the gradient). The per-pair scalars c_j = eps_j . g are
computed where the noise is, exactly (``cv_products``: fixed-point products summed as integers), so
they, the weights w'_j = w_j - c_j and the update are the same bits for any number of ranks. sigma's
update keeps the plain weights. "previous"/"running" keep g in the state (``PGPEState.cv``, float64,
checkpointed); it starts at zero (the first generation is plain raw PGPE).

Non-finite losses (an overflowing bound): a pair with a non-finite member gets zero weight in
both gradients and is left out of the shaping, the baseline and the 1/n normalisation (n counts
the valid pairs). The count is reported as "pgpe/num_nonfinite". If no pair is valid the step
is skipped ("pgpe/skipped" = 1): centre, sigma and optimizer moments stay, but the generation
still advances, so the next call draws fresh noise and generation == number of tell calls.

Identical bits for any number of ranks, any blocking and any device: the sums over pairs
S_c = sum_j w_j z_j and S_s = sum_j v_j (z_j^2 - 1) (w, v the shaped weights below) are exact
fixed-point sums. Every pair's contribution is scaled by 2**(FRACTION_BITS - e) with a shared
exponent e >= log2(max_j |w_j| * max_j |z_j|) (and likewise for the sigma term), rounded to int64
(IEEE float64 multiply and round-half-even, the same on CPU and GPU) and added as integers, which
is associative. So a rank can sum the pairs it evaluated (``partial_sums``, reusing their noise),
the ranks add their int64 vectors (one allreduce of 2 D integers), and ``tell(..., summed=...)``
turns the total into the gradients: O(P D / N) work per rank instead of O(P D). Called without
``summed``, ``tell`` regenerates all the noise itself (the serial path) and gives the same bits.
Precision: each contribution is quantised with absolute error <= 2**(e - FRACTION_BITS - 1), i.e.
relative 2**-41 of the largest contribution; the float32 centre step does not see it.

Shapes: P population (popsize), n pairs (P/2), D parameters.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mpigls.numerics import noise
from mpigls.optim import shaping, steprules
from mpigls.optim.params import CONTROL_VARIATES, PGPEParams

__all__ = [
    "NOISE_CHUNK",
    "FRACTION_BITS",
    "PGPEParams",
    "PGPEState",
    "Weights",
    "init",
    "ask",
    "pair_noise",
    "population",
    "weights",
    "exponents",
    "partial_sums",
    "from_sums",
    "max_abs_noise",
    "full_sums",
    "gradients",
    "tell",
    "state_to_dict",
    "state_from_dict",
    "CONTROL_VARIATES",
    "cv_products",
    "cv_weights",
    "control_variate",
]

CV_FRACTION_BITS = 30  # fixed-point bits of the exact products eps_j . g (D < 2**33 terms fit int64)

NOISE_CHUNK = 64  # pairs regenerated at once by the serial path (never changes the bits)
FRACTION_BITS = 40  # fixed-point bits below the largest contribution; n <= 2**22 pairs fit int64
_MAX_ROWS_EXACT = 1 << (52 - FRACTION_BITS)  # integer terms a float64 sum adds without rounding


@dataclass(frozen=True)
class PGPEState:
    center: torch.Tensor  # (D,) float32, theta
    sigma: torch.Tensor  # (D,) float32
    step_state: steprules.StepState
    generation: int
    cv: torch.Tensor | None = None  # (D,) float64: g of a zeroth-order control variate (previous/running)


def _keeps_cv(params: PGPEParams) -> bool:
    return params.control_variate in ("previous", "running")


def init(params: PGPEParams, center: torch.Tensor) -> PGPEState:
    """Initial state around ``center`` (D,) (copied, float32)."""
    if center.ndim != 1 or center.numel() == 0:
        raise ValueError(f"PGPE centre must be a non-empty flat vector (D,), got shape {tuple(center.shape)}")
    center = center.detach().to(torch.float32).clone()
    cv = torch.zeros(center.shape, dtype=torch.float64, device=center.device) if _keeps_cv(params) else None
    return PGPEState(
        center, torch.full_like(center, params.sigma_init), steprules.init(params.step_rule, center), 0, cv
    )


def _check_losses(losses: torch.Tensor, params: PGPEParams) -> torch.Tensor:
    losses = torch.as_tensor(losses)
    if losses.shape != (params.popsize,):
        raise ValueError(f"PGPE tell needs one loss per member, shape ({params.popsize},), got {tuple(losses.shape)}")
    return losses.detach().to("cpu", torch.float64)


@dataclass(frozen=True)
class Weights:
    """Shaped per-pair weights of one generation (float64 CPU, zero for invalid pairs).

    center: (n,) (u+_j - u-_j) / 2;  sigma: (n,) (u+_j + u-_j) / 2 - b;  num_valid: valid pairs.
    """

    center: torch.Tensor
    sigma: torch.Tensor
    num_valid: int
    valid: torch.Tensor | None = None  # (n,) bool: both losses of the pair finite


def weights(params: PGPEParams, losses: torch.Tensor) -> Weights:
    """Fitness-shaped pair weights from the full population's losses (P,) [+0,-0,+1,-1,...]."""
    r = _check_losses(losses, params)
    valid = torch.isfinite(r[0::2]) & torch.isfinite(r[1::2])  # (n,)
    num_valid = int(valid.sum())
    zero = torch.zeros((), dtype=torch.float64)
    if num_valid == 0:
        z = torch.zeros(params.popsize // 2, dtype=torch.float64)
        return Weights(z, z.clone(), 0, valid)
    member_valid = valid.repeat_interleave(2)  # (P,)
    u = torch.zeros_like(r)
    u[member_valid] = shaping.shape(r[member_valid], params.fitness_shaping).to(torch.float64)
    baseline = u[member_valid].mean()
    w_center = torch.where(valid, (u[0::2] - u[1::2]) / 2, zero)
    w_sigma = torch.where(valid, (u[0::2] + u[1::2]) / 2 - baseline, zero)
    return Weights(w_center, w_sigma, num_valid, valid)


# ----------------------------------------------------------------------------- control variate


def control_variate(state: PGPEState, params: PGPEParams, grad_at_center: torch.Tensor | None = None):
    """g of this generation: (D,) float64 on the state's device, or None without a control variate.
    ``grad_at_center``: the backpropagated gradient at theta on the batch (needed for "grad")."""
    kind = params.control_variate
    if kind == "none":
        return None
    if kind == "grad":
        if grad_at_center is None:
            raise ValueError('optimizer.control_variate="grad" needs the gradient at theta')
        return grad_at_center.detach().to(state.center.device, torch.float64).reshape(-1)
    if state.cv is None:  # a state from before the control variate: start at zero
        return torch.zeros(state.center.shape, dtype=torch.float64, device=state.center.device)
    return state.cv


def cv_scaled(state: PGPEState, g: torch.Tensor) -> torch.Tensor:
    """h = sigma * g (D,) float64: eps_j . g = z_j . h."""
    return state.sigma.detach().to(g.device, torch.float64) * g


def cv_products(z: torch.Tensor, h: torch.Tensor, column_chunk: int = 1 << 15) -> torch.Tensor:
    """c_j = z_j . h for the rows of z (M, D): (M,) float64 on the CPU, the same bits whatever rows are
    computed together and on any device: each product z_jd h_d is one float64 rounding, scaled by a
    power of two chosen from the row's own max |z_j| and max |h|, rounded to an integer and summed as
    int64 (exact); the error is below D * 2**-31 of max |z_j| max |h|."""
    num_rows = z.shape[0]
    if num_rows == 0:
        return torch.zeros(0, dtype=torch.float64)
    h = h.to(z.device, torch.float64)
    top_h = float(h.abs().max()) if h.numel() else 0.0
    if top_h == 0.0:
        return torch.zeros(num_rows, dtype=torch.float64)
    row_max = z.abs().amax(dim=1).to(torch.float64).cpu()
    exps = [math.frexp(float(m) * top_h)[1] if m > 0 else 0 for m in row_max.tolist()]
    shift = torch.tensor([float(CV_FRACTION_BITS - e) for e in exps], dtype=torch.float64, device=z.device)
    total = torch.zeros(num_rows, dtype=torch.int64, device=z.device)
    for lo in range(0, z.shape[1], column_chunk):
        prod = z[:, lo : lo + column_chunk].to(torch.float64) * h[lo : lo + column_chunk]
        total += torch.ldexp(prod, shift[:, None]).round_().to(torch.int64).sum(dim=1)
    back = torch.tensor([float(e - CV_FRACTION_BITS) for e in exps], dtype=torch.float64)
    return torch.ldexp(total.cpu().to(torch.float64), back)


def cv_weights(w: Weights, pairs: Sequence[int], c: torch.Tensor) -> Weights:
    """``w`` with the centre weights of ``pairs`` replaced by w_j - c_j (valid pairs only)."""
    center = w.center.clone()
    idx = torch.tensor([int(j) for j in pairs], dtype=torch.long)
    if idx.numel():
        valid = w.valid[idx] if w.valid is not None else torch.ones(idx.numel(), dtype=torch.bool)
        center[idx] = torch.where(valid, center[idx] - c.to(torch.float64).cpu(), center[idx])
    return dataclasses.replace(w, center=center)


def pair_noise(
    seed: int,
    generation: int,
    pairs: Sequence[int],
    num_params: int,
    scheme: str = "host",
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """z_j of a generation for the given pairs: (len(pairs), D) float32 (counter-based, mpigls.numerics.noise),
    on ``device`` (host scheme: drawn on the CPU and moved there; device scheme: generated there).

    It does not depend on the state, so the next generation's noise can be prepared in advance.
    """
    return noise.noise_block(seed, generation, [int(j) for j in pairs], num_params, noise.STREAM_PGPE, scheme, device)


def population(state: PGPEState, z: torch.Tensor) -> torch.Tensor:
    """Rows [theta + sigma z_j, theta - sigma z_j] per pair: (2 M, D) on the device of the state."""
    eps = state.sigma * z.to(state.center.device)
    return torch.stack([state.center + eps, state.center - eps], dim=1).reshape(-1, state.center.numel())


def _check_pairs(params: PGPEParams, pairs: Sequence[int]) -> list[int]:
    pairs = [int(j) for j in pairs]
    bad = [j for j in pairs if not 0 <= j < params.popsize // 2]
    if bad:
        raise ValueError(f"PGPE pair indices must be in [0, {params.popsize // 2}), got {bad[:5]}")
    return pairs


def ask(state: PGPEState, params: PGPEParams, seed: int, pairs: Sequence[int]) -> torch.Tensor:
    """Population rows for the given pairs: (2*len(pairs), D), rows [theta+eps_j, theta-eps_j] per j."""
    pairs = _check_pairs(params, pairs)
    return population(
        state, pair_noise(seed, state.generation, pairs, state.center.numel(), params.noise, state.center.device)
    )


def exponents(w: Weights, max_abs_z: float, max_abs_c: float = 0.0) -> tuple[int, int]:
    """Shared fixed-point exponents (e_center, e_sigma) bounding every pair's contribution.

    ``max_abs_z`` is max |z_j| over ALL pairs of the generation (every rank must pass the same value);
    ``max_abs_c`` max |c_j| of the control variate over all pairs (0 without one): the centre weights
    w_j - c_j are bounded by max |w| + max |c|.
    """
    if not math.isfinite(max_abs_z) or max_abs_z < 0:
        raise ValueError(f"max |z| must be finite and >= 0, got {max_abs_z}")
    if not math.isfinite(max_abs_c) or max_abs_c < 0:
        raise ValueError(f"max |eps . g| must be finite and >= 0, got {max_abs_c}; is the control variate finite?")
    bound_c = (float(w.center.abs().max()) + max_abs_c) * max_abs_z if w.center.numel() else 0.0
    bound_s = float(w.sigma.abs().max()) * max(max_abs_z * max_abs_z, 1.0) if w.sigma.numel() else 0.0
    e_c, e_s = (math.frexp(b)[1] if b > 0 else 0 for b in (bound_c, bound_s))
    return e_c, e_s


def _quantised_sum(rows: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """sum_i round(scale_i * rows_i) (D,) float64, exact: every term is an integer of magnitude
    <= 2**FRACTION_BITS and at most _MAX_ROWS_EXACT of them stay below 2**53, so neither the order
    nor the grouping of the additions can round. ``rows`` (float64) is overwritten."""
    return rows.mul_(scale[:, None]).round_().sum(dim=0)


def partial_sums(
    w: Weights,
    pairs: Sequence[int],
    z: torch.Tensor,
    exps: tuple[int, int],
    with_sigma: bool = True,
    column_chunk: int | None = None,
) -> torch.Tensor:
    """Fixed-point partial sums over ``pairs`` with their noise z (M, D): int64 (2, D) on z's device.

    Row 0 sums round(w_j 2**(F - e_c) z_j), row 1 round(v_j 2**(F - e_s) (z_j^2 - 1)) (zeros when
    not ``with_sigma``). Integer sums: any split of the pairs into calls gives the same total.
    ``column_chunk`` (columns per step; default: cache-sized on CPU) never changes the result.
    """
    pairs = [int(j) for j in pairs]
    if z.shape[0] != len(pairs):
        raise ValueError(f"partial_sums: {len(pairs)} pairs but noise of shape {tuple(z.shape)}")
    num_params = z.shape[1]
    out = torch.zeros((2, num_params), dtype=torch.int64, device=z.device)
    idx = torch.tensor(pairs, dtype=torch.long)
    keep = ((w.center[idx] != 0) | (w.sigma[idx] != 0)).nonzero().flatten()
    if keep.numel() == 0:
        return out
    if keep.numel() > _MAX_ROWS_EXACT:
        for lo in range(0, keep.numel(), _MAX_ROWS_EXACT):
            part = keep[lo : lo + _MAX_ROWS_EXACT]
            out += partial_sums(
                w, [pairs[i] for i in part.tolist()], z[part.to(z.device)], exps, with_sigma, column_chunk
            )
        return out
    # w * 2**k is exact in float64 (a power of two), so (w 2**k) z == 2**k (w z) bit for bit
    shift_c = torch.tensor(float(FRACTION_BITS - exps[0]), dtype=torch.float64)
    shift_s = torch.tensor(float(FRACTION_BITS - exps[1]), dtype=torch.float64)
    scale_c = torch.ldexp(w.center[idx[keep]], shift_c).to(z.device)
    scale_s = torch.ldexp(w.sigma[idx[keep]], shift_s).to(z.device)
    rows = z if keep.numel() == len(pairs) else z[keep.to(z.device)]
    if column_chunk is None:  # keep the (M, chunk) float64 temporaries in cache on a CPU
        column_chunk = max(1024, (1 << 17) // rows.shape[0]) if z.device.type == "cpu" else 1 << 22
    for lo in range(0, num_params, column_chunk):
        cols = rows[:, lo : lo + column_chunk]
        out[0, lo : lo + column_chunk] = _quantised_sum(cols.to(torch.float64, copy=True), scale_c).to(torch.int64)
        if with_sigma:
            sq = cols.to(torch.float64, copy=True)
            out[1, lo : lo + column_chunk] = _quantised_sum(sq.mul_(sq).sub_(1.0), scale_s).to(torch.int64)
    return out


def from_sums(
    summed: torch.Tensor, exps: tuple[int, int], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 (2, D) fixed-point totals -> (S_c, S_s) float64 on ``device`` (exact scalings by powers
    of two: the same bits on any device)."""
    summed = summed.to(device)

    def back(i: int, e: int) -> torch.Tensor:
        # x * 2**k is exactly ldexp(x, k) while 2**k is a normal float64 (always, for real exponents)
        if e - FRACTION_BITS > -1000:
            return summed[i].to(torch.float64).mul_(math.ldexp(1.0, e - FRACTION_BITS))
        return torch.ldexp(summed[i].to(torch.float64), torch.tensor(float(e - FRACTION_BITS), dtype=torch.float64))

    return back(0, exps[0]), back(1, exps[1])


def max_abs_noise(z: torch.Tensor) -> float:
    """max |z| of a noise block (0 for an empty one)."""
    return float(z.abs().max()) if z.numel() else 0.0


def full_sums(
    state: PGPEState,
    params: PGPEParams,
    seed: int,
    w: Weights,
    with_sigma: bool = True,
    g: torch.Tensor | None = None,
):
    """Serial path: (int64 (2, D) totals, exponents) over ALL pairs, regenerating their noise.

    Two passes over chunks of NOISE_CHUNK pairs (max |z| and the control variate's c_j first, then
    the sums) to bound memory. ``g``: the control variate (centre weights w_j - c_j), or None.
    """
    num_pairs = params.popsize // 2
    chunks = [range(s, min(num_pairs, s + NOISE_CHUNK)) for s in range(0, num_pairs, NOISE_CHUNK)]
    D, gen, dev = state.center.numel(), state.generation, state.center.device
    h = None if g is None else cv_scaled(state, g)
    max_z, max_c, cs = 0.0, 0.0, []
    for c in chunks:
        z = pair_noise(seed, gen, c, D, params.noise, dev)
        max_z = max(max_z, max_abs_noise(z))
        if h is not None:
            cs.append(cv_products(z, h))
            max_c = max(max_c, float(cs[-1].abs().max()))
    exps = exponents(w, max_z, max_c)
    total = torch.zeros((2, D), dtype=torch.int64, device=dev)
    for i, c in enumerate(chunks):
        wc = w if h is None else cv_weights(w, c, cs[i])
        total += partial_sums(wc, c, pair_noise(seed, gen, c, D, params.noise, dev), exps, with_sigma)
    return total, exps


def gradients(
    state: PGPEState,
    params: PGPEParams,
    seed: int,
    losses: torch.Tensor,
    with_sigma: bool = True,
    summed: tuple | None = None,
    g: torch.Tensor | None = None,
):
    """Estimates (g_theta (D,), g_sigma (D,), num_valid_pairs) as float64 tensors on the state's
    device (IEEE-exact scalings and one division: the same bits on any device).

    With fitness_shaping="raw", g_theta is an unbiased estimate of grad L_sigma(theta) and g_sigma
    one of dL_sigma/dsigma (up to the O(1/n) effect of the sample-mean baseline). Returns
    (None, None, 0) when no pair has two finite losses; g_sigma is None when not ``with_sigma``.
    ``summed``: (int64 (2, D) totals of ``partial_sums`` over all pairs, exponents[, the Weights of
    ``losses`` they were formed with: not computed again]), e.g. from an allreduce over ranks
    (``pgpe_unit.reduce_sums``); without it the noise of all pairs is regenerated here.
    ``g``: the control variate (module docstring), (D,) float64; the totals must then have been
    formed with the weights w_j - eps_j . g (``cv_weights``), and g is added back here.
    """
    w = summed[2] if summed is not None and len(summed) == 3 else weights(params, losses)
    if w.num_valid == 0:
        return None, None, 0
    total, exps = full_sums(state, params, seed, w, with_sigma, g) if summed is None else summed[:2]
    sum_c, sum_s = from_sums(total, exps, state.center.device)
    denom = state.sigma.detach().to(torch.float64).mul_(w.num_valid)  # n * sigma
    grad = sum_c.div_(denom)
    if g is not None:
        grad = grad.add_(g.to(grad.device, torch.float64))
    return (grad, sum_s.div_(denom) if with_sigma else None, w.num_valid)


def _sigma_step(sigma: torch.Tensor, grad_sigma: torch.Tensor, params: PGPEParams):
    """New sigma (float64) and the number of entries held by the relative-change bound (a 0-d
    tensor on sigma's device: read with the other metrics in one synchronisation)."""
    # sigma - ((lr sigma) sigma) g, in place (a - b == a + (-b) exactly)
    proposed = (params.sigma_lr * sigma).mul_(sigma).mul_(grad_sigma).neg_().add_(sigma)
    clipped = torch.zeros((), dtype=torch.int64, device=sigma.device)
    if params.sigma_max_change is not None:
        low = sigma * (1.0 - params.sigma_max_change)
        high = sigma * (1.0 + params.sigma_max_change)
        clipped = ((proposed < low) | (proposed > high)).sum()
        proposed = proposed.clamp_(min=low, max=high)
    return proposed.clamp_(min=params.sigma_min, max=params.sigma_max), clipped


def tell(
    state: PGPEState,
    params: PGPEParams,
    seed: int,
    losses: torch.Tensor,
    lr: float | None = None,
    summed: tuple | None = None,
    g: torch.Tensor | None = None,
) -> tuple[PGPEState, dict]:
    """Update from the full population's losses (P,) ordered [+0,-0,+1,-1,...].

    ``lr`` overrides params.lr (schedules). ``summed``: the fixed-point totals over all pairs and
    their exponents (see ``gradients``); without it the noise is regenerated here (serial path).
    ``g``: this generation's control variate (``control_variate``; for "previous"/"running" it is
    taken from the state when not given). Returns (new state, metrics); inputs are not mutated.
    """
    if g is None and params.control_variate != "none":
        g = control_variate(state, params)
    r = _check_losses(losses, params)
    lr = params.lr if lr is None else float(lr)
    finite = r[torch.isfinite(r)]
    metrics = {
        "pgpe/num_nonfinite": int(r.numel() - finite.numel()),
        "pgpe/lr": lr,
        "pgpe/loss_mean": float(finite.mean()) if finite.numel() else math.nan,
        "pgpe/loss_min": float(finite.min()) if finite.numel() else math.nan,
    }
    grad_center, grad_sigma, num_valid = gradients(
        state, params, seed, r, with_sigma=not params.fixed_sigma, summed=summed, g=g
    )
    metrics["pgpe/num_valid_pairs"] = num_valid
    if num_valid == 0:
        metrics.update(
            {
                "pgpe/skipped": 1,
                "pgpe/grad_norm": math.nan,
                "pgpe/grad_sigma_norm": math.nan,
                "pgpe/step_norm": 0.0,
                "pgpe/sigma_clipped_frac": 0.0,
                **_sigma_metrics(state.sigma),
            }
        )
        return dataclasses.replace(state, generation=state.generation + 1), metrics
    device = state.center.device
    grad = grad_center.to(device, torch.float32)
    delta, step_state = steprules.step(params, state.step_state, grad, lr)
    center = steprules.decay(state.center, delta, lr, params.weight_decay)
    sigma, clipped = state.sigma, torch.zeros((), dtype=torch.int64, device=device)
    if not params.fixed_sigma:
        new_sigma, clipped = _sigma_step(state.sigma.detach().to(torch.float64), grad_sigma, params)
        sigma = new_sigma.to(torch.float32)
    cv = state.cv
    if _keeps_cv(params):  # the memory of a zeroth-order control variate (float64, exact on every rank)
        n, num_params = params.popsize // 2, state.center.numel()
        rate = 1.0 if params.control_variate == "previous" else params.cv_rate or n / (n + num_params)
        old = control_variate(state, params)
        cv = grad_center.clone() if rate == 1.0 else old * (1.0 - rate) + grad_center * rate
    norm_sigma = clipped if grad_sigma is None else torch.linalg.vector_norm(grad_sigma)  # placeholder: nan below
    norm_cv = [torch.linalg.vector_norm(cv)] if _keeps_cv(params) else []
    # one device -> host copy (one synchronisation on a GPU) for all of them; float32 -> float64 is exact
    (grad_norm, sigma_norm, step_norm, num_clipped, *cv_norm), sigma_stats = _read(
        [torch.linalg.vector_norm(grad), norm_sigma, torch.linalg.vector_norm(delta), clipped, *norm_cv], sigma
    )
    metrics.update(
        {
            "pgpe/skipped": 0,
            "pgpe/grad_norm": grad_norm,
            "pgpe/grad_sigma_norm": math.nan if grad_sigma is None else sigma_norm,
            "pgpe/step_norm": step_norm,
            "pgpe/sigma_clipped_frac": num_clipped / max(1, sigma.numel()),
            **sigma_stats,
            **({"pgpe/cv_norm": cv_norm[0]} if cv_norm else {}),
        }
    )
    return PGPEState(center, sigma, step_state, state.generation + 1, cv), metrics


def _read(scalars: list[torch.Tensor], sigma: torch.Tensor) -> tuple[list[float], dict]:
    """The 0-d ``scalars`` and sigma's mean/min/max as Python floats, in one device -> host copy."""
    stats = [sigma.mean(), sigma.min(), sigma.max()]
    values = torch.stack([t.to(torch.float64) for t in [*scalars, *stats]]).tolist()
    mean, lo, hi = values[len(scalars) :]
    return values[: len(scalars)], {"pgpe/sigma_mean": mean, "pgpe/sigma_min": lo, "pgpe/sigma_max": hi}


def _sigma_metrics(sigma: torch.Tensor) -> dict:
    return _read([], sigma)[1]


def state_to_dict(state: PGPEState) -> dict:
    """Flat dict of numpy arrays and Python scalars (for the HDF5 checkpoint)."""
    return {
        "center": state.center.detach().cpu().numpy().copy(),
        "sigma": state.sigma.detach().cpu().numpy().copy(),
        "generation": int(state.generation),
        **steprules.state_to_dict(state.step_state),
        **({} if state.cv is None else {"cv": state.cv.detach().cpu().numpy().copy()}),
    }


def state_from_dict(d: dict, device: torch.device | str = "cpu") -> PGPEState:
    """Inverse of state_to_dict; tensors are placed on ``device``."""
    missing = {"center", "sigma", "generation", *steprules.STATE_KEYS} - set(d)
    if missing:
        raise ValueError(f"PGPE state dict lacks keys {sorted(missing)}; was it written by a different optimizer?")
    return PGPEState(
        torch.as_tensor(np.asarray(d["center"], dtype=np.float32)).to(device),
        torch.as_tensor(np.asarray(d["sigma"], dtype=np.float32)).to(device),
        steprules.state_from_dict(d, device=device),
        int(d["generation"]),
        None if d.get("cv") is None else torch.as_tensor(np.asarray(d["cv"], dtype=np.float64)).to(device),
    )
