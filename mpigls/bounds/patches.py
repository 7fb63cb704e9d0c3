"""Patch-mode back-substitution for rows that start at a convolutional layer.

A row of the bound of neuron (o, i, j) of conv layer k is non-zero, at every earlier layer, only
inside that neuron's receptive field: a patch (C, K, K) whose top-left corner on the layer's
grid is (i S - Q, j S - Q), with K, S, Q the receptive field's size, cumulative stride and
cumulative padding (the idea of auto_LiRPA's "patches" mode; Xu et al. 2020, arXiv 2002.12920).
Through a ReLU the patch meets the relaxation tensors cut out at the same window (unfold with
zero padding, so entries on padding positions vanish); through conv layer i (kernel k', stride
s', padding p') it becomes conv_transpose2d(patch, W_i, stride s') of size (K - 1) s' + k' with
S <- S s', Q <- Q s' + p'; at the input it is dotted with the box centre and radius windows.
This does the same arithmetic as dense back-substitution on the receptive field only.

Shapes: P population, B batch, R rows, C channels, K patch size, L window positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mpigls.bounds.common import Relax
from mpigls.nn.population import Stack

__all__ = ["geometry", "patch_numel", "backsubstitute"]


def geometry(net: Stack, k: int) -> list[tuple[int, int, int, int, int, int]]:
    """(Kh, Kw, Sh, Sw, Qh, Qw) of layer k's receptive field on the input grid of layers k, k-1, ..., 0."""
    lay = net.layers[k]
    kh, kw = lay.weight.shape[-2:]
    (sh, sw), (qh, qw) = lay.stride, lay.padding
    out = [(kh, kw, sh, sw, qh, qw)]
    for i in range(k - 1, -1, -1):
        w = net.layers[i]
        kh, kw = (kh - 1) * w.stride[0] + w.weight.shape[-2], (kw - 1) * w.stride[1] + w.weight.shape[-1]
        qh, qw = qh * w.stride[0] + w.padding[0], qw * w.stride[1] + w.padding[1]
        sh, sw = sh * w.stride[0], sw * w.stride[1]
        out.append((kh, kw, sh, sw, qh, qw))
    return out


def patch_numel(net: Stack, k: int) -> tuple[int, int]:
    """(largest patch, total patch elements over levels) of a row starting at conv layer k."""
    sizes = [net.layers[k - j].in_shape[0] * g[0] * g[1] for j, g in enumerate(geometry(net, k))]
    return max(sizes), sum(sizes)


def _windows(t: torch.Tensor, geo, out_hw) -> torch.Tensor:
    """(p, b, C, H, W) -> (p, b, L, C*Kh*Kw): the window of every output position (row-major)."""
    kh, kw, sh, sw, qh, qw = geo
    p, b, c, h, w = t.shape
    ho, wo = out_hw
    rh = max(0, (ho - 1) * sh + kh - h - qh)
    rw = max(0, (wo - 1) * sw + kw - w - qw)
    padded = F.pad(t.reshape(p * b, c, h, w), (qw, rw, qh, rh))
    cols = F.unfold(padded, (kh, kw), stride=(sh, sw))
    nh = (h + qh + rh - kh) // sh + 1
    nw = (w + qw + rw - kw) // sw + 1
    cols = cols.view(p * b, c * kh * kw, nh, nw)[:, :, :ho, :wo]
    return cols.reshape(p, b, c * kh * kw, ho * wo).transpose(2, 3)


def _pick(win: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
    """Windows (p|1, b, L, E) at row locations loc (p, b, r) -> (p, b, r, E)."""
    p, b, r = loc.shape
    win = win.expand(p, b, *win.shape[2:])
    return torch.gather(win, 2, loc.unsqueeze(-1).expand(p, b, r, win.shape[-1]))


# Below this many entries the patch-to-patch map is applied as a small dense matrix (one bmm):
# oneDNN's transposed convolution is slow on many tiny images (measured 6x on CNN3's first layer).
_PATCH_MATRIX_MAX = 2**17


def _conv_t(a: torch.Tensor, weight: torch.Tensor, stride) -> torch.Tensor:
    """Per-member transposed conv of patches: (p, m, O, K, K), weight (p, O, C, k, k) -> (p, m, C, K', K')."""
    p, m, o = a.shape[:3]
    c, kh, kw = weight.shape[2:]
    k_in = a.shape[3:]
    k_out = ((k_in[0] - 1) * stride[0] + kh, (k_in[1] - 1) * stride[1] + kw)
    n_in, n_out = o * k_in[0] * k_in[1], c * k_out[0] * k_out[1]
    if n_in * n_out <= _PATCH_MATRIX_MAX:
        eye = torch.eye(n_in, dtype=a.dtype, device=a.device).view(1, n_in, o, *k_in).expand(p, n_in, o, *k_in)
        mat = _conv_t_plain(eye, weight, stride).reshape(p, n_in, n_out)
        return torch.matmul(a.reshape(p, m, n_in), mat).view(p, m, c, *k_out)
    return _conv_t_plain(a, weight, stride)


def _conv_t_plain(a: torch.Tensor, weight: torch.Tensor, stride) -> torch.Tensor:
    p, m, o = a.shape[:3]
    c, kh, kw = weight.shape[2:]
    a_m = a[0] if p == 1 else a.transpose(0, 1).reshape(m, p * o, *a.shape[3:])
    out = F.conv_transpose2d(
        a_m.contiguous(memory_format=torch.channels_last), weight.reshape(p * o, c, kh, kw), None, stride, 0, groups=p
    )
    return out.view(m, p, c, *out.shape[2:]).transpose(0, 1)


def backsubstitute(
    net: Stack, k: int, idx: torch.Tensor, sign: torch.Tensor, relax: list[Relax], lo: torch.Tensor, hi: torch.Tensor
) -> torch.Tensor:
    """Lower bounds (p, b, r) of sign * h_k[idx] for flat neuron indices idx (p, b, r) of conv layer k."""
    lay = net.layers[k]
    p, b, r = idx.shape
    out_c, out_h, out_w = lay.out_shape
    chan, loc = idx // (out_h * out_w), idx % (out_h * out_w)
    wflat = lay.weight.reshape(p, 1, out_c, -1).expand(p, b, out_c, lay.weight[0, 0].numel())
    a = torch.gather(wflat, 2, chan.unsqueeze(-1).expand(p, b, r, wflat.shape[-1])) * sign[:, None]
    const = torch.gather(lay.bias.unsqueeze(1).expand(p, b, out_c), 2, chan) * sign
    geos = geometry(net, k)
    for j, i in enumerate(range(k - 1, -1, -1)):
        geo, rel = geos[j], relax[i]
        alpha, slope, shift = (
            _pick(_windows(t.squeeze(2), geo, (out_h, out_w)), loc) for t in (rel.alpha, rel.slope, rel.shift)
        )
        neg = a.clamp(max=0)
        const = const + (neg * shift).sum(-1)
        a = torch.addcmul(a * alpha, neg, slope - alpha)
        layer = net.layers[i]
        c_in = layer.out_shape[0]
        patch = a.reshape(p, b * r, c_in, geo[0], geo[1])
        const = const + torch.matmul(patch.sum((-1, -2)).view(p, b * r, c_in), layer.bias.unsqueeze(-1)).view(p, b, r)
        a = _conv_t(patch, layer.weight, layer.stride).reshape(p, b, r, -1)
    mid, rad = (hi + lo) / 2, (hi - lo) / 2
    mid, rad = (_pick(_windows(t, geos[-1], (out_h, out_w)), loc) for t in (mid, rad))
    return const + (a * mid).sum(-1) - (a.abs() * rad).sum(-1)
