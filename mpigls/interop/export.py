"""``mpigls export``: a network as ONNX, plus VNN-LIB robustness properties of its test samples.

``write`` takes the network (an ``nn.Sequential`` of ``models.build`` with its weights loaded, built
by the caller from a checkpoint and its config) and the test samples, and writes the ONNX file
(``onnx_io.to_onnx``). With a properties directory, every sample gets one VNN-LIB file
(``vnnlib.write_properties``, radius ``eps``) and an ``instances.csv`` naming the ONNX file, so the
directory is a VNN-COMP benchmark that alpha-beta-CROWN, Marabou, NNV or MN-BaB can run as is.
Before anything is kept, the ONNX file is run by onnxruntime on the first ``CHECK_SAMPLES`` samples
and compared with the network's forward pass (reported).

All or nothing (``check_outputs`` first, then staging): the outputs are checked before any work
(``--onnx`` must name a file in an existing, writable directory, not a directory; ``--vnnlib`` a
directory or a new path, not a file); the ONNX file and the properties are written under
temporary names beside their targets and renamed into place only when all of them are complete,
the ONNX file last. A failure (a full disk, say) leaves neither an ONNX file nor properties behind.
This module imports nothing of ``mpigls.run``: the caller loads the checkpoint and checks that it
fits the config.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mpigls.interop import onnx_io, vnnlib
from mpigls.interop.extras import require

__all__ = ["ExportResult", "ExportError", "write", "check_outputs", "check_values", "CHECK_SAMPLES"]

CHECK_SAMPLES = 100  # test samples compared between onnxruntime and mpigls after every export
_TMP = ".tmp-"


class ExportError(ValueError):
    """An output of ``export`` that cannot be written as asked (a user error: one paragraph, exit code 2)."""


@dataclass(frozen=True)
class ExportResult:
    onnx_path: Path
    property_paths: tuple[Path, ...]
    eps: float
    checked: int  # test samples run through onnxruntime and mpigls before the files were kept
    max_abs_diff: float  # the largest |logit difference| between the two on them


def check_values(eps: float, num_test: int | None, timeout: float) -> None:
    """Refuse a radius outside [0, 1], a sample count below 1 or a non-positive timeout."""
    if not (math.isfinite(eps) and 0 <= eps <= 1):
        raise ExportError(f"--eps must lie in [0, 1] (an l_inf radius in pixel space), got {eps}")
    if num_test is not None and num_test < 1:
        raise ExportError(f"--num-test must be >= 1, got {num_test}")
    if not math.isfinite(timeout) or timeout <= 0:
        raise ExportError(f"--timeout must be a positive number of seconds, got {timeout}")


def _probe(d: Path, option: str, value: Path) -> None:
    try:
        fd, name = tempfile.mkstemp(prefix=f"{_TMP}probe-", dir=d)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise ExportError(
            f"{option} {str(value)!r}: the directory {str(d)!r} is not writable ({exc.strerror or exc}); "
            "nothing was written. Choose a writable place or fix the permissions"
        ) from None


def _existing_ancestor(p: Path) -> Path:
    probe = p
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return probe


def check_outputs(onnx_path: str | os.PathLike, vnnlib_dir: str | os.PathLike | None) -> tuple[Path, Path | None]:
    """(onnx path, properties directory) once both can be written; ExportError (or FileNotFoundError for a
    missing directory) naming the option otherwise. Writes nothing but a probe file."""
    onnx_p = Path(onnx_path)
    if str(onnx_path).strip() == "":
        raise ExportError("--onnx is empty; name the ONNX file to write, e.g. --onnx net.onnx")
    if onnx_p.is_dir():
        raise ExportError(
            f"--onnx {str(onnx_p)!r} is a directory; name the file to write in it, e.g. --onnx {onnx_p / 'net.onnx'}"
        )
    if onnx_p.exists() and not onnx_p.is_file():
        raise ExportError(f"--onnx {str(onnx_p)!r} exists and is not a regular file; name a new .onnx file")
    if not onnx_p.parent.is_dir():
        raise FileNotFoundError(f"--onnx {str(onnx_p)!r}: the directory {str(onnx_p.parent)!r} does not exist")
    _probe(onnx_p.parent, "--onnx", onnx_p)
    if vnnlib_dir is None:
        return onnx_p, None
    props = Path(vnnlib_dir)
    if str(vnnlib_dir).strip() == "":
        raise ExportError("--vnnlib is empty; name the directory for the properties, e.g. --vnnlib props")
    if props.exists() and not props.is_dir():
        raise ExportError(
            f"--vnnlib {str(props)!r} is a file, not a directory; name a directory for the properties "
            "(it is created if missing)"
        )
    anchor = _existing_ancestor(props)
    if not anchor.is_dir():
        raise ExportError(f"--vnnlib {str(props)!r} cannot be created: {str(anchor)!r} is a file, not a directory")
    if props.resolve() == onnx_p.resolve():
        raise ExportError("--vnnlib and --onnx name the same path; give the properties their own directory")
    _probe(anchor, "--vnnlib", props)
    return onnx_p, props


def write(
    model: nn.Sequential,
    in_shape: Sequence[int],
    xs: torch.Tensor,
    ys: torch.Tensor,
    num_classes: int,
    onnx_path: str | os.PathLike,
    *,
    vnnlib_dir: str | os.PathLike | None = None,
    eps: float = 0.0,
    timeout: float = 60.0,
    batch: int | None = 1,
    header: Sequence[str] = (),
) -> ExportResult:
    """Write ``model`` as ONNX and, with ``vnnlib_dir``, one property per sample of (xs (N, C, H, W), ys (N,));
    all or nothing (module docstring)."""
    onnx = require("onnx", "onnx", "ONNX export")
    check_values(eps, None, timeout)
    onnx_p, props = check_outputs(onnx_path, vnnlib_dir)
    model = model.eval()
    fd, tmp_name = tempfile.mkstemp(prefix=f"{_TMP}{onnx_p.stem}-", suffix=".onnx", dir=onnx_p.parent)
    os.close(fd)
    tmp, stage = Path(tmp_name), None
    try:
        onnx.save(onnx_io.to_onnx(model, in_shape, batch=batch), str(tmp))
        checked = min(len(xs), CHECK_SAMPLES)
        with torch.no_grad():
            ours = model(xs[:checked]).numpy()
        diff = float(np.abs(onnx_io.onnx_forward(tmp, xs[:checked].numpy()) - ours).max())
        paths: list[Path] = []
        if props is not None:
            stage = Path(tempfile.mkdtemp(prefix=f"{_TMP}vnnlib-", dir=_existing_ancestor(props.parent)))
            name = os.path.relpath(onnx_p.resolve(), props.resolve())
            staged = vnnlib.write_properties(
                stage, onnx_p, xs.numpy(), ys.numpy(), num_classes, eps, timeout=timeout, header=header, onnx_name=name
            )
            paths = _commit_properties(stage, props, staged)
            stage = None
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, onnx_p)  # last: no ONNX file without its properties
    finally:
        tmp.unlink(missing_ok=True)
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
    return ExportResult(onnx_p, tuple(paths), float(eps), checked, diff)


def _commit_properties(stage: Path, props: Path, staged: list[Path]) -> list[Path]:
    """Move the staged directory to ``props`` (one rename when it is new; else file by file, instances.csv last)."""
    if not props.exists():
        props.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(stage, 0o777 & ~_umask())  # mkdtemp made it 0700
        os.replace(stage, props)
        return [props / p.name for p in staged]
    for p in staged:
        os.replace(p, props / p.name)
    os.replace(stage / vnnlib.INSTANCES_FILE, props / vnnlib.INSTANCES_FILE)
    with contextlib.suppress(OSError):
        stage.rmdir()
    return [props / p.name for p in staged]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
