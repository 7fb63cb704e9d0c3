"""Floating-point settings of every device: true fp32 for certificates, determinism for training,
and the rounding guard of the certification rule.

Three jobs, one module (the only place that changes torch's global numeric flags):

``strict_fp32()``
    A context manager (and decorator) that switches TF32 off for cuDNN convolutions and cuBLAS
    matmuls (``torch.backends.cudnn.allow_tf32``, ``torch.backends.cuda.matmul.allow_tf32``,
    ``torch.set_float32_matmul_precision("highest")``) and restores the previous values on exit,
    also after an exception. torch enables TF32 for cuDNN by default; TF32 rounds the inputs of
    every product to a 10-bit mantissa (relative error ~5e-4), which moved GPU margin lower bounds
    *above* the CPU ones by up to 4.7e-3 on an H100. Every computation that certifies (the final
    evaluation and ``eval.json``, ``mpigls certify``, the landscape) runs inside it. On a CPU-only
    build the flags exist and are switched all the same; they change nothing there.

``training(tf32=..., deterministic=...)``
    The settings of a training run (``train.tf32``, ``train.deterministic``), entered by
    ``train.train`` and restored when it returns. ``deterministic`` turns on
    ``torch.use_deterministic_algorithms(True)`` (an op without a deterministic kernel raises
    instead of silently varying), ``cudnn.deterministic = True`` and ``cudnn.benchmark = False``.
    ``tf32=True`` is allowed because no certificate depends on training arithmetic: training
    only proposes θ; the certificate is recomputed from θ in strict fp32.

``certified(lb)``
    The certification rule: an example is certified when every margin lower bound exceeds
    ``CERTIFY_MARGIN`` (not merely 0), so that float rounding of the bound itself cannot turn a
    non-robust example into a certified one. See ``CERTIFY_MARGIN`` for the derivation.

Settings are reference counted under one lock and combined by "strictest wins": while any active
context asks for TF32 off, TF32 is off; while any asks for determinism, determinism is on; the
values found before the first context are restored when the last one exits. So contexts nest, may
exit in any order and may overlap across threads (``parallel.run_threaded`` ranks) without one
thread's exit switching TF32 back on under another thread's certificate.

cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (or ``:16:8``) in the environment *before* its
first call for reproducible matmuls; importing this module sets it when unset (every CUDA path of
mpigls imports it first), and ``training(deterministic=True)`` raises if another value is set.

Shapes: B batch, K classes.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = ["CERTIFY_MARGIN", "CUBLAS_WORKSPACE", "strict_fp32", "training", "certified", "current_settings"]

CERTIFY_MARGIN = 1e-5
"""Margin lower bounds must exceed this (absolute, logit units) to certify.

Derivation: with TF32 off, the same bounds computed on CPU and on an H100 (different summation
orders and kernels, both round-to-nearest fp32) differed by at most 3e-7 for bound magnitudes
0.2-0.5 (measured on an H100), i.e. about 5 units in the last place of the values involved; that spread is
the empirical size of the rounding error of a whole bound computation. 1e-5 is 33x the largest
measured gap, while being ~1e-4 of a typical certified margin, so it costs a negligible share of
certified accuracy (``benchmarks/bench_numerics.py`` [3] counts the examples it costs: 0 of 200 digits test
examples for ibp, crown-ibp and deeppoly after 40 GRAD generations, smallest positive bound 0.014). It is a guard, not
a proof: a rigorous alternative is directed rounding (every lower bound rounded towards -inf),
which torch cannot do (cuBLAS/cuDNN/oneDNN kernels always round to nearest and expose no rounding
mode) and which would need an a-posteriori error bound gamma_n * sum |a_i b_i| on every
back-substitution product inside the bound engine (roughly doubling its cost).
"""

CUBLAS_WORKSPACE = ":4096:8"
_DETERMINISTIC_CUBLAS = (":4096:8", ":16:8")

# cuBLAS reads its workspace configuration once, at the first call: set it before any CUDA work.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


@dataclass(frozen=True)
class _Request:
    tf32: bool | None = None  # None: no opinion
    deterministic: bool | None = None


_LOCK = threading.RLock()
_ACTIVE: list[_Request] = []
_SAVED: dict = {}  # torch's flags before the first active context (empty while none is)


def current_settings() -> dict:
    """torch's global numeric flags that this module manages, as a plain dict."""
    return {
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
    }


def _apply(s: dict) -> None:
    torch.backends.cudnn.allow_tf32 = s["cudnn_allow_tf32"]
    torch.backends.cuda.matmul.allow_tf32 = s["matmul_allow_tf32"]
    torch.set_float32_matmul_precision(s["float32_matmul_precision"])
    torch.use_deterministic_algorithms(s["deterministic_algorithms"], warn_only=s["deterministic_warn_only"])
    torch.backends.cudnn.deterministic = s["cudnn_deterministic"]
    torch.backends.cudnn.benchmark = s["cudnn_benchmark"]


def _combined(saved: dict, requests: list[_Request]) -> dict:
    """The saved flags overridden by the active requests, strictest wins."""
    out = dict(saved)
    tf32 = [r.tf32 for r in requests if r.tf32 is not None]
    if tf32:
        on = all(tf32)  # one request for TF32 off (a certificate) switches it off for everyone
        out.update(cudnn_allow_tf32=on, matmul_allow_tf32=on, float32_matmul_precision="high" if on else "highest")
    det = [r.deterministic for r in requests if r.deterministic is not None]
    if det:
        on = any(det)
        out.update(
            deterministic_algorithms=on,
            deterministic_warn_only=False if on else saved["deterministic_warn_only"],
            cudnn_deterministic=on,
            cudnn_benchmark=False if on else saved["cudnn_benchmark"],
        )
    return out


@contextlib.contextmanager
def _settings(request: _Request) -> Iterator[None]:
    global _SAVED
    with _LOCK:
        if not _ACTIVE:
            _SAVED = current_settings()
        _ACTIVE.append(request)
        try:
            _apply(_combined(_SAVED, _ACTIVE))
        except BaseException:
            _leave(request)
            raise
    try:
        yield
    finally:
        with _LOCK:
            _leave(request)


def _leave(request: _Request) -> None:
    global _SAVED
    _ACTIVE.remove(request)  # equal requests are interchangeable, so any one may go
    _apply(_combined(_SAVED, _ACTIVE))
    if not _ACTIVE:
        _SAVED = {}


class strict_fp32(contextlib.ContextDecorator):
    """TF32 off for cuDNN and cuBLAS inside the block (or decorated function); restored after."""

    def __enter__(self) -> strict_fp32:
        self._cm = _settings(_Request(tf32=False))
        self._cm.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        return bool(self._cm.__exit__(*exc))

    def _recreate_cm(self) -> strict_fp32:
        return strict_fp32()  # a fresh instance per decorated call: safe under recursion and threads


def _check_cublas_config() -> None:
    value = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if value not in _DETERMINISTIC_CUBLAS:
        raise ValueError(
            f"train.deterministic is true but CUBLAS_WORKSPACE_CONFIG={value!r}, with which cuBLAS "
            f"matmuls are not reproducible on a GPU; unset it (mpigls then uses {CUBLAS_WORKSPACE!r}), "
            f"set it to one of {list(_DETERMINISTIC_CUBLAS)}, or set train.deterministic=false"
        )


@contextlib.contextmanager
def training(
    *, tf32: bool = False, deterministic: bool = True, device: torch.device | str | None = None
) -> Iterator[None]:
    """Numeric settings for a training run (``train.tf32``, ``train.deterministic``); restored on exit.

    ``device``: where training runs; the cuBLAS configuration is checked unless it is a CPU."""
    if not isinstance(tf32, bool) or not isinstance(deterministic, bool):
        raise TypeError(f"tf32 and deterministic must be booleans, got tf32={tf32!r}, deterministic={deterministic!r}")
    if deterministic and (device is None or torch.device(device).type != "cpu"):
        _check_cublas_config()
    with _settings(_Request(tf32=tf32, deterministic=deterministic)):
        yield


def certified(lb: torch.Tensor, margin: float = CERTIFY_MARGIN) -> torch.Tensor:
    """Which examples are certified: every margin lower bound > ``margin``. (..., K-1) -> (...,) bool.

    NaN bounds never certify (a comparison with NaN is false)."""
    if not margin >= 0:
        raise ValueError(f"the certification margin must be >= 0, got {margin}")
    return (lb.detach() > margin).all(dim=-1)
