"""A checkpoint's network as a plain ``torch.nn.Module``, and a PyTorch state dict of it.

``load_network(path)`` is one call from a checkpoint (a file, or a run directory: its newest
loadable checkpoint) to the ``torch.nn.Sequential`` mpigls trained, with θ in its parameters, in
eval mode on the CPU: ``Normalize`` (the dataset's per-channel mean and std) then the Conv2d /
Linear / ReLU / Flatten layers, taking pixels in [0, 1] and giving logits. It needs no dataset:
the checkpoint's architecture record names the network, its input shape, class count and
normalisation. A network of one's own (``model.name: package.module:function``) is imported again
and must still build the layers the checkpoint was trained with.

``save_state_dict(model, path)`` writes ``model.state_dict()`` with ``torch.save`` (atomically:
a temporary file, then a rename), the ``.pt`` form that ``model.init_from`` and
``mpigls certify FILE.pt --config CONFIG`` read back (``interop.onnx_io``: the weights and biases in
order; the ``Normalize`` buffers are the dataset's and are checked against it there).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from mpigls.nn import models

__all__ = ["load_network", "network_of", "save_state_dict"]


def network_of(ckpt) -> torch.nn.Sequential:
    """The network of a loaded checkpoint (``run.checkpoint.Checkpoint``) with its θ, eval mode, CPU."""
    from mpigls.run import checkpoint

    arch = ckpt.arch
    missing = [k for k in ("name", "in_shape", "num_classes") if k not in arch]
    if missing:
        raise ValueError(f"the checkpoint's architecture record lacks {missing}; it was not written by mpigls train")
    bad = int((~np.isfinite(ckpt.theta)).sum())
    if bad:
        raise ValueError(
            f"the checkpoint holds {bad} non-finite parameter(s) (NaN/inf) out of {ckpt.theta.size}; use an "
            "earlier checkpoint of the run"
        )
    name, shape, k = arch["name"], arch["in_shape"], arch["num_classes"]
    with models.private_rng(0):  # the initial weights are overwritten by theta
        model = models.build(name, shape, k, arch.get("mean"), arch.get("std"))
    want = models.architecture_dict(name, shape, k, arch.get("mean"), arch.get("std"))
    checkpoint.check_compatible(
        ckpt,
        want,
        models.num_params(model),
        advice=f"the network {name!r} builds other layers than the checkpoint was trained with: restore the "
        "definition it was trained with",
    )
    models.load_flat_(model, torch.from_numpy(np.ascontiguousarray(ckpt.theta, dtype=np.float32)))
    return model.eval()


def load_network(path: str | os.PathLike) -> torch.nn.Sequential:
    """The network of the checkpoint at ``path`` (a file or a run directory) with its weights."""
    from mpigls.run import checkpoint, rundir

    p = Path(path)
    if p.is_dir():
        found = rundir.find_latest(p)
        if found is None:
            raise FileNotFoundError(
                f"{path} is a directory without a loadable checkpoint ({checkpoint.LATEST} or ckpt_*.h5)"
            )
        p = Path(found)
    return network_of(checkpoint.load(p))


def save_state_dict(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """``torch.save(model.state_dict(), path)`` through a temporary file beside it; returns the path."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; name the .pt file to write, e.g. {path / 'network.pt'}")
    if path.suffix not in (".pt", ".pth"):
        raise ValueError(f"{path}: a PyTorch state dict is written as .pt or .pth (that is how it is read back)")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: the directory {path.parent} does not exist; create it first")
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
