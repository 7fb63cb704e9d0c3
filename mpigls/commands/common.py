"""What several commands share: the ``--set`` option, reading a checkpoint a command may use, and the
network, data and test examples of a checkpoint (written once here, used by certify, tightness,
landscape and ``report --certify``).

Nothing heavy is imported at module level: ``mpigls --version`` and ``mpigls config`` import this
module without torch.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

__all__ = [
    "CERTIFY_ARCH_ADVICE",
    "Problem",
    "add_overrides",
    "checkpoint_file",
    "checkpoint_problem",
    "load_usable",
    "png_path",
]

CERTIFY_ARCH_ADVICE = (
    "the checkpoint's own config describes its model and data: drop the --set overrides that "
    "change model.* or data.* (data.root may change), or pass the checkpoint of that model"
)


def add_overrides(parser: argparse.ArgumentParser, text: str) -> None:
    """``--set SECTION.KEY=VALUE`` (repeatable) into ``args.overrides``."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help=text)


def checkpoint_file(path: str) -> str:
    """A checkpoint file as given, or for a run directory its newest loadable checkpoint (as ``plot`` and
    ``report`` take run directories)."""
    from mpigls.run import checkpoint, rundir

    p = Path(path)
    if not p.is_dir():
        return path
    found = rundir.find_latest(p)
    if found is None:
        raise FileNotFoundError(
            f"{path} is a directory without a loadable checkpoint ({checkpoint.LATEST} or ckpt_*.h5); give a "
            "checkpoint file or the --out directory of a run that has written one"
        )
    return str(found)


def load_usable(path: str):
    """A checkpoint whose stored config is a mapping (trimmed by ``config.stored_config``) and whose
    parameters are finite."""
    import numpy as np

    from mpigls import config as config_mod
    from mpigls.run import checkpoint

    ckpt = checkpoint.load(path)
    if not isinstance(ckpt.config, dict):
        raise ValueError(
            f"{path} stores a config that is a {type(ckpt.config).__name__}, not a mapping of "
            "sections; it was not written by `mpigls train` or was edited; use a checkpoint from a run"
        )
    ckpt.config = config_mod.stored_config(ckpt.config)  # older files hold every optimizer's keys
    bad = int((~np.isfinite(ckpt.theta)).sum())
    if bad:
        raise ValueError(
            f"{path} holds {bad} non-finite parameter(s) (NaN/inf) out of {ckpt.theta.size}; its "
            "accuracies would be meaningless; use an earlier checkpoint of the run"
        )
    return ckpt


@dataclasses.dataclass
class Problem:
    """A checkpoint ready to evaluate: its config, dataset, network (on this rank's device) and θ."""

    ckpt: Any
    cfg: Any
    dataset: Any
    model: Any
    theta: Any  # torch.Tensor (D,) float32 on the CPU
    device: Any

    def test_examples(self, num_test: int | None = None):
        """The first ``num_test`` test examples (default: the config's eval.num_test, else all)."""
        n = num_test or self.cfg.eval.num_test or len(self.dataset.test_y)
        return self.dataset.test_x[:n], self.dataset.test_y[:n]


def checkpoint_problem(ckpt, cfg, comm, *, advice: str | None = None) -> Problem:
    """The dataset and network of ``cfg`` with ``ckpt``'s parameters, the network moved to the device this
    rank is bound to (train.device); refuses a checkpoint of another architecture."""
    import torch

    from mpigls import parallel
    from mpigls.run import checkpoint, train as train_mod

    dataset, model, arch = train_mod.build_problem(cfg)
    if advice:
        checkpoint.check_compatible(ckpt, arch, advice=advice)
    else:
        checkpoint.check_compatible(ckpt, arch)
    device = parallel.bind_device(comm, cfg.train.device, cfg.train.threads)
    model.to(device)
    return Problem(ckpt, cfg, dataset, model, torch.from_numpy(ckpt.theta.copy()), device)


def stored_problem(path: str, comm, overrides: list[str] | None = None, *, advice: str | None = None) -> Problem:
    """``checkpoint_problem`` of the checkpoint at ``path`` with its own config (plus ``--set`` overrides)."""
    from mpigls import config as config_mod

    ckpt = load_usable(path)
    cfg = config_mod.from_dict(config_mod.apply_overrides(ckpt.config, overrides) if overrides else ckpt.config)
    return checkpoint_problem(ckpt, cfg, comm, advice=advice)


def png_path(out: str, default_name: str, *, inputs: Any = ()) -> Path:
    """Where a figure goes: into a directory as default_name, else the path (``.png`` added if it has
    no suffix, as matplotlib does), so that the "wrote" line names the real file. Refuses a path that
    is a checkpoint, a run's own file or one of the command's ``inputs`` (``rundir.refuse_output``)."""
    from mpigls.run import rundir

    path = Path(out)
    if str(out).strip() == "":
        raise ValueError(f"--out is empty; name a PNG file, e.g. --out {default_name}")
    if path.is_dir():
        return rundir.refuse_output(path / default_name, "--out", inputs=list(inputs))
    if not path.suffix:
        path = path.with_suffix(".png")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--out {out!r}: the directory {str(path.parent)!r} does not exist; create it first")
    return rundir.refuse_output(path, "--out", inputs=list(inputs))
