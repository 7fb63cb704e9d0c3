"""Interval bound propagation (IBP; Gowal et al. 2018, arXiv 1810.12715).

Boxes are pushed through each affine layer in centre/radius form (mid' = W mid + b,
rad' = |W| rad) and through each ReLU elementwise; the last layer is merged with the margin
matrix C (rows e_y - e_i), so the margin lower bound is C W mid - |C W| rad + C b.

On CPU a population is bounded in chunks of (member, example) pairs whose widest activation
fits ``CPU_CHUNK_BYTES`` (about one core's L2 cache): the whole-population tensors (P*B*neurons)
are memory bound, elementwise passes and grouped convolutions on cache-sized chunks are several
times faster (CNN3 MNIST, P=64, B=128, 1 thread: 0.83 s whole, 0.11-0.18 s in chunks of 2-4
members; ``benchmarks/bench_ibp_evotorch.py``). Every member and example is bounded independently, so
the result equals the unchunked one up to the float rounding of the convolution kernels.

Shapes: P population, B batch, K classes.
"""

from __future__ import annotations

import math

import torch

from mpigls.bounds.common import Problem, ibp_layer, over_pairs
from mpigls.nn.margins import other_classes

__all__ = ["activation_bounds", "bound", "chunk_shape"]

CPU_CHUNK_BYTES = 2 << 20  # widest activation of one chunk on CPU (measured: 2 members of CNN3 at B=128)


def activation_bounds(prob: Problem) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pre-activation bounds (P, B, *shape) of every hidden affine layer."""
    out = []
    lo, hi = prob.lo, prob.hi
    for layer in prob.net.layers[:-1]:
        lo, hi = ibp_layer(layer, lo, hi)
        out.append((lo, hi))
        lo, hi = lo.clamp(min=0), hi.clamp(min=0)
    return out


def chunk_shape(prob: Problem, chunk_bytes: int | None = None) -> tuple[int, int]:
    """(members, examples) per chunk: the widest activation of a chunk fits ``chunk_bytes``.

    Whole population and batch off CPU (GPU kernels want large tensors). ``chunk_bytes`` None
    reads ``CPU_CHUNK_BYTES`` at call time (benchmarks set it huge for the unchunked path)."""
    if chunk_bytes is None:
        chunk_bytes = CPU_CHUNK_BYTES
    p, batch = prob.net.num_members, prob.y.shape[0]
    if prob.x.device.type != "cpu" or batch == 0:
        return p, batch
    widest = max(math.prod(layer.out_shape) for layer in prob.net.layers) * prob.lo.element_size()
    pairs = max(1, chunk_bytes // widest)
    if pairs >= batch:
        return min(p, pairs // batch), batch
    return 1, pairs


def bound(prob: Problem, chunk_bytes: int | None = None) -> torch.Tensor:
    """Margin lower bounds (P, B, K-1), chunked over (member, example) pairs (``chunk_shape``, ``common.over_pairs``)."""
    members, examples = chunk_shape(prob, chunk_bytes)
    p, batch = prob.net.num_members, prob.y.shape[0]
    if members >= p and examples >= batch:
        return _bound(prob)
    return over_pairs(prob, members, examples, lambda sub, *_: _bound(sub))


def _bound(prob: Problem) -> torch.Tensor:
    """Margin lower bounds (P, B, K-1) in one pass.

    C W mid + C b is read off the logits of the box centre; |C W| rad uses the K x K table of
    |w_y - w_i| per member (P, K*K, I), so no (P, B, K-1, I) merged matrix is built.
    """
    net = prob.net
    if len(net.layers) > 1:
        lo, hi = activation_bounds(prob)[-1]
        lo, hi = lo.clamp(min=0), hi.clamp(min=0)
    else:
        lo, hi = prob.lo, prob.hi
    last = net.layers[-1]
    w, b = last.weight, last.bias  # (P, K, I), (P, K)
    p, k = w.shape[:2]
    batch = prob.y.shape[0]
    mid = ((hi + lo) / 2).reshape(lo.shape[0], batch, -1)
    rad = ((hi - lo) / 2).reshape(lo.shape[0], batch, -1)
    z = torch.matmul(mid, w.transpose(1, 2)) + b.unsqueeze(1)  # (P, B, K)
    dabs = (w.unsqueeze(2) - w.unsqueeze(1)).abs().reshape(p, k * k, -1)  # [y*K + i] = |w_y - w_i|
    spread = torch.matmul(rad, dabs.transpose(1, 2))  # (P, B, K*K)
    others = other_classes(prob.y, k)  # (B, K-1)
    z_y = z.gather(2, prob.y.view(1, batch, 1).expand(p, batch, 1))
    z_o = z.gather(2, others.unsqueeze(0).expand(p, -1, -1))
    pair = (prob.y.unsqueeze(1) * k + others).unsqueeze(0).expand(p, -1, -1)
    return z_y - z_o - spread.gather(2, pair)
