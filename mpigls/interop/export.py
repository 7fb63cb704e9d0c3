"""``mpigls export``: a checkpoint's network as ONNX, plus VNN-LIB robustness properties of its test set.

The network is rebuilt from the checkpoint's own config (``data.*`` may be overridden, e.g.
``data.root``), its theta loaded, and written by ``onnx_io.save_onnx``. With a properties
directory, the first ``num_test`` test samples get one VNN-LIB file each
(``vnnlib.write_properties``, radius ``eps``, default the config's ``bound.eps``) and an
``instances.csv`` naming the ONNX file, so the directory is a VNN-COMP benchmark that
alpha-beta-CROWN, Marabou, NNV or MN-BaB can run as is. After writing, the ONNX file is run by
onnxruntime on the first test samples and compared with mpigls's forward pass (reported).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from mpigls.interop import onnx_io, vnnlib
from mpigls.nn import models
from mpigls.run import checkpoint

__all__ = ["ExportResult", "export", "CHECK_SAMPLES"]

CHECK_SAMPLES = 100  # test samples compared between onnxruntime and mpigls after every export


@dataclass(frozen=True)
class ExportResult:
    onnx_path: Path
    property_paths: tuple[Path, ...]
    eps: float
    checked: int  # test samples run through onnxruntime and mpigls after writing
    max_abs_diff: float  # the largest |logit difference| between the two on them


def export(
    ckpt: checkpoint.Checkpoint,
    cfg,
    onnx_path: str | Path,
    *,
    vnnlib_dir: str | Path | None = None,
    eps: float | None = None,
    num_test: int | None = None,
    timeout: float = 60.0,
    batch: int | None = 1,
    source: str = "",
) -> ExportResult:
    """Write the ONNX file (and the properties); ``cfg`` is the checkpoint's config (``config.Config``)."""
    from mpigls.run.train import build_problem

    eps = cfg.bound.eps if eps is None else float(eps)
    if not (math.isfinite(eps) and 0 <= eps <= 1):
        raise ValueError(f"--eps must lie in [0, 1] (an l_inf radius in pixel space), got {eps}")
    if num_test is not None and num_test < 1:
        raise ValueError(f"--num-test must be >= 1, got {num_test}")
    if not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"--timeout must be a positive number of seconds, got {timeout}")
    onnx_path = Path(onnx_path)
    if not onnx_path.parent.is_dir():
        raise FileNotFoundError(f"--onnx {str(onnx_path)!r}: the directory {str(onnx_path.parent)!r} does not exist")
    dataset, model, arch = build_problem(cfg)
    checkpoint.check_compatible(ckpt, arch, advice="export with the checkpoint's own model.* and data.* settings")
    models.load_flat_(model, torch.from_numpy(ckpt.theta.copy()))
    model.eval()
    onnx_io.save_onnx(model, dataset.in_shape, onnx_path, batch=batch)
    n = min(num_test or cfg.eval.num_test or len(dataset.test_y), len(dataset.test_y))
    xs, ys = dataset.test_x[:n], dataset.test_y[:n]
    checked = min(n, CHECK_SAMPLES)
    with torch.no_grad():
        ours = model(xs[:checked]).numpy()
    diff = float(abs(onnx_io.onnx_forward(onnx_path, xs[:checked].numpy()) - ours).max())
    paths: list[Path] = []
    if vnnlib_dir is not None:
        header = [f"robustness property written by mpigls export from {source or 'a checkpoint'}"]
        header.append(f"network {onnx_path.name}: {cfg.model.name} on {cfg.data.name}, generation {ckpt.generation}")
        paths = vnnlib.write_properties(
            vnnlib_dir, onnx_path, xs.numpy(), ys.numpy(), dataset.num_classes, eps, timeout=timeout, header=header
        )
    return ExportResult(onnx_path, tuple(paths), eps, checked, diff)
