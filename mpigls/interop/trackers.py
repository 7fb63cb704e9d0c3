"""Experiment trackers: TensorBoard event files and Weights & Biases, fed from the metrics log.

Both are optional (``track.tensorboard``, ``track.wandb``; extras ``mpigls[tensorboard]`` and
``mpigls[wandb]``), off by default, and run on rank 0 only. ``Trackers`` is a sink that
``monitor.Monitor`` calls with exactly the record it appends to ``metrics.jsonl``: every finite
number of the generation's metrics (training loss, schedules, the optimizer's step and σ
statistics, ``time/generation_s``, ``val/*`` when validated) at step = generation. The run's config
is attached (TensorBoard: a text summary ``config``; W&B: the run config).

Resume continues the same run:

* TensorBoard writes to ``OUT/tensorboard``; a resumed writer is opened with ``purge_step`` =
  the checkpoint's generation + 1, so TensorBoard drops the events of generations that are being
  re-run and the step numbering continues without duplicates.
* W&B files go to ``OUT/wandb``. The run id is drawn when a run starts at generation 0 and kept in
  ``OUT/track.json``; a resumed run passes it again (``resume="allow"``), so ``wandb sync``
  (offline) or the server (online) joins the pieces into one run. Offline mode (the default)
  needs no network or account.

A tracker that fails while training (a full disk, a W&B service error) is disabled with one
warning; training goes on, ``metrics.jsonl`` and the checkpoints keep every metric.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mpigls.interop.extras import require

__all__ = ["TENSORBOARD_DIR", "WANDB_DIR", "STATE_FILE", "Trackers", "check_available", "open_trackers"]

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
STATE_FILE = "track.json"
_ID_CHARS = string.ascii_lowercase + string.digits


def _scalars(metrics: dict) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    }


class _TensorBoard:
    def __init__(self, out_dir: Path, start_generation: int, config: dict):
        require("tensorboard", "tensorboard", "track.tensorboard")
        import yaml
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out_dir / TENSORBOARD_DIR), purge_step=start_generation + 1)
        text = "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```"
        self.writer.add_text("config", text, global_step=start_generation)
        self.writer.flush()

    def log(self, generation: int, metrics: dict) -> None:
        for key, value in _scalars(metrics).items():
            self.writer.add_scalar(key, value, global_step=generation)
        self.writer.flush()  # readable while the run goes, like metrics.jsonl

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, out_dir: Path, track, config: dict, start_generation: int):
        wandb = require("wandb", "wandb", "track.wandb")
        state_path = out_dir / STATE_FILE
        state = json.loads(state_path.read_text()) if state_path.is_file() and start_generation > 0 else {}
        # a fresh id (not from the run's seed: two runs of one config are two W&B runs); a run that
        # starts at generation 0 (new, --restart, or killed before its first checkpoint) is a new run
        run_id = state.get("wandb_run_id") or "".join(secrets.choice(_ID_CHARS) for _ in range(12))
        if state.get("wandb_run_id") != run_id:
            tmp = state_path.with_name(f".tmp-{STATE_FILE}")
            tmp.write_text(json.dumps({**state, "wandb_run_id": run_id}) + "\n")
            os.replace(tmp, state_path)
        self.run = wandb.init(
            project=track.wandb_project,
            entity=track.wandb_entity,
            name=track.wandb_name or out_dir.name,
            dir=str(out_dir),  # W&B writes into DIR/wandb
            mode=track.wandb_mode,
            id=run_id,
            resume="allow",
            config=config,
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        )
        self.run_id, self._wandb = run_id, wandb

    def log(self, generation: int, metrics: dict) -> None:
        self.run.log({**_scalars(metrics), "generation": generation}, step=generation)

    def close(self) -> None:
        self.run.finish()
        # wait for W&B's service to write everything out: when training returns, OUT/wandb is complete
        # (offline: ready for `wandb sync`, readable by a resume in the same process)
        self._wandb.teardown()


class Trackers:
    """The enabled trackers of one run (rank 0); ``log`` and ``close`` never raise."""

    def __init__(self, sinks: dict[str, Any], say: Callable[[str], None]):
        self.sinks, self._say = sinks, say

    def log(self, generation: int, metrics: dict) -> None:
        for name, sink in list(self.sinks.items()):
            try:
                sink.log(generation, metrics)
            except Exception as exc:  # noqa: BLE001 - a tracker never stops training
                self._disable(name, exc)

    def _disable(self, name: str, exc: Exception) -> None:
        self._say(f"warning: {name} tracking disabled ({type(exc).__name__}: {exc}); metrics.jsonl keeps the metrics")
        sink = self.sinks.pop(name)
        try:
            sink.close()
        except Exception:  # noqa: BLE001 - already reported
            pass

    def close(self) -> None:
        for name in list(self.sinks):
            try:
                self.sinks[name].close()
            except Exception as exc:  # noqa: BLE001
                self._say(f"warning: closing the {name} tracker failed ({type(exc).__name__}: {exc})")
        self.sinks = {}


def check_available(cfg) -> None:
    """Every rank, before training: the packages of the enabled trackers import (else the
    MissingExtraError naming the extra, alike on every rank)."""
    if cfg.track.tensorboard:
        require("tensorboard", "tensorboard", "track.tensorboard")
    if cfg.track.wandb:
        require("wandb", "wandb", "track.wandb")


def open_trackers(cfg, out_dir: str | os.PathLike, start_generation: int, say: Callable[[str], None]) -> Trackers:
    """Rank 0: the trackers ``cfg.track`` enables (none: an empty sink). One that fails to start is
    left out with a warning (``check_available`` has refused missing packages on every rank)."""
    from mpigls.config import to_dict

    out, track, config = Path(out_dir), cfg.track, to_dict(cfg)
    sinks: dict[str, Any] = {}
    starts = {
        "tensorboard": lambda: _TensorBoard(out, start_generation, config),
        "wandb": lambda: _WandB(out, track, config, start_generation),
    }
    for name, start in starts.items():
        if getattr(track, name):
            try:
                sinks[name] = start()
            except Exception as exc:  # noqa: BLE001 - a tracker never stops training
                say(
                    f"warning: {name} tracking not started ({type(exc).__name__}: {exc}); metrics.jsonl keeps the metrics"
                )
    return Trackers(sinks, say)
