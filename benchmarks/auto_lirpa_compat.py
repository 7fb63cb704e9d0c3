"""Load auto_LiRPA 0.3 (the reference CROWN implementation) on numpy 2 / torch 2.x, for cross-checks.

auto_LiRPA 0.3, the newest on PyPI, was written for torch < 1.13 and numpy < 2; three small
shims let it import and trace our networks. They only touch symbols that moved, never its
bounding code. Used by tests/test_bounds_auto_lirpa.py and benchmarks/bench_bounds.py; mpigls itself
never imports auto_LiRPA. Install it without its pinned dependencies:

    pip install --no-deps auto_LiRPA==0.3 appdirs
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

__all__ = ["load", "margin_matrix", "bounder", "crown_margin_lower_bounds"]

_METHODS = {"ibp": "IBP", "crown-ibp": "CROWN-IBP", "deeppoly": "CROWN", "crown": "CROWN"}


def _shim() -> None:
    if "numpy.lib.arraysetops" not in sys.modules:  # removed in numpy 2
        mod = types.ModuleType("numpy.lib.arraysetops")
        mod.isin = np.isin
        sys.modules["numpy.lib.arraysetops"] = mod
    import torch.onnx.symbolic_helper as helper

    if not hasattr(helper, "_set_opset_version"):  # moved into the torchscript exporter's globals

        def _set_opset_version(version: int) -> None:
            from torch.onnx._internal.torchscript_exporter import _globals

            _globals.GLOBALS.export_onnx_opset_version = version

        helper._set_opset_version = _set_opset_version
    if not hasattr(torch._C.Node, "__getitem__"):  # node["attr"] was removed from the JIT IR
        torch._C.Node.__getitem__ = lambda node, key: getattr(node, node.kindOf(key))(key)


def load():
    """The auto_LiRPA module, or None when it is not installed or cannot be loaded."""
    try:
        _shim()
        import auto_LiRPA
    except Exception:  # noqa: BLE001 - any failure means: no reference available
        return None
    return auto_LiRPA


def margin_matrix(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """C (B, K-1, K) with rows e_y - e_i, i != y ascending: the margins mpigls bounds."""
    c = torch.zeros(len(y), num_classes - 1, num_classes)
    for b, label in enumerate(y.tolist()):
        others = [i for i in range(num_classes) if i != label]
        c[b, torch.arange(num_classes - 1), label] = 1.0
        c[b, torch.arange(num_classes - 1), others] = -1.0
    return c


def bounder(
    model: nn.Sequential, example_x: torch.Tensor, method: str = "deeppoly", conv_mode: str = "patches"
) -> Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]:
    """Trace ``model`` once into an auto_LiRPA BoundedModule; returns f(x, y, eps) -> lower bounds
    (B, K-1) of the margins over [x-eps, x+eps] ∩ [0, 1] by IBP, CROWN-IBP or CROWN.

    ``model`` must start with our Normalize layer with mean 0 and std 1 (an identity), which is
    dropped: auto_LiRPA 0.3's patches mode rejects the division it traces to.
    """
    lirpa = load()
    if lirpa is None:
        raise RuntimeError("auto_LiRPA is not available: pip install --no-deps auto_LiRPA==0.3 appdirs")
    norm = model[0]
    if not (torch.all(norm.mean == 0) and torch.all(norm.std == 1)):
        raise ValueError("give a model built with mean 0 and std 1 (its Normalize layer is an identity)")
    num_classes = model[-1].out_features
    bounded = lirpa.BoundedModule(
        model[1:].eval(), torch.zeros_like(example_x), bound_opts={"conv_mode": conv_mode}, device=str(example_x.device)
    )

    def bound(x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
        ptb = lirpa.PerturbationLpNorm(norm=float("inf"), x_L=(x - eps).clamp(0, 1), x_U=(x + eps).clamp(0, 1))
        lb, _ = bounded.compute_bounds(
            x=(lirpa.BoundedTensor(x, ptb),),
            method=_METHODS[method],
            C=margin_matrix(y, num_classes).to(x.device),
            bound_upper=False,
        )
        return lb

    return bound


def crown_margin_lower_bounds(
    model: nn.Sequential,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    method: str = "deeppoly",
    conv_mode: str = "patches",
) -> torch.Tensor:
    """auto_LiRPA's lower bounds (B, K-1) of the margins (see ``bounder``)."""
    return bounder(model, x, method, conv_mode)(x, y, eps)
