"""The final evaluation of a finished run: the test-set certification in ``DIR/eval.json``.

``train(..., evaluate=True)`` runs it while rank 0 still holds the run directory's lock, so a
``--restart`` of the same directory cannot start before the last byte is written and the file
belongs to the run that wrote it. A finished run started again (nothing left to train) evaluates
again only when ``eval.json`` is missing, unreadable, or was made for other parameters (generation,
``theta_sha256``) or other evaluation settings (``settings``: the radius and the ``eval`` section).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mpigls.config import Config, to_dict
from mpigls.numerics import precision

__all__ = ["EVAL_FILE", "settings", "is_current", "evaluate", "record"]

EVAL_FILE = "eval.json"  # next to the run's checkpoints


def settings(cfg: Config) -> dict:
    """What, besides θ, decides the numbers of ``eval.json``."""
    return {"eps": cfg.bound.eps, "eval": to_dict(cfg)["eval"]}


def is_current(out_dir: str | Path, generation: int, theta_sha256: str, cfg: Config) -> bool:
    """Whether ``out_dir/eval.json`` already holds the evaluation of this θ with these settings."""
    try:
        stored = json.loads((Path(out_dir) / EVAL_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    want = json.loads(json.dumps(settings(cfg)))  # compare in the stored (JSON) form
    return (
        isinstance(stored, dict)
        and stored.get("generation") == generation
        and stored.get("theta_sha256") == theta_sha256
        and stored.get("settings") == want
    )


@precision.strict_fp32()  # eval.json is a certificate: true fp32 (certify.evaluate also enters it)
def evaluate(cfg: Config, dataset, model, theta, device, comm, say) -> dict:
    """Certify θ on the first ``eval.num_test`` test examples as configured (collective); ``model``: a
    network of the config (its own weights are not used)."""
    from mpigls.evaluation import certify

    model.to(device)  # the device training used (a GPU when the rank has one)
    n = cfg.eval.num_test or len(dataset.test_y)
    res = certify.evaluate_configured(cfg, model, theta, dataset.test_x[:n], dataset.test_y[:n], comm=comm)
    parts = [f"{k} {100 * v:.2f}%" for k, v in res.items() if k not in ("num_examples", "eps")]
    say(f"final test accuracy (eps={cfg.bound.eps}, {res['num_examples']} examples): " + ", ".join(parts))
    return res


def record(cfg: Config, generation: int, theta_sha256: str, checkpoint_path: str | None, res: dict) -> dict[str, Any]:
    """The content of ``eval.json``."""
    return {
        "generation": generation,
        "theta_sha256": theta_sha256,
        "checkpoint": checkpoint_path,
        "methods": list(cfg.eval.methods),
        "settings": settings(cfg),
        **res,
    }
