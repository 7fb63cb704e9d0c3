"""An external complete verifier (Marabou) agrees with ``mpigls certify --verify`` on exported
ONNX + VNN-LIB properties (tools/marabou_check.py; skipped without maraboupy)."""

import sys
from pathlib import Path

import pytest

from mpigls import config
from mpigls.run import train

from conftest import tiny_overrides

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))


@pytest.mark.slow
def test_marabou_agrees_with_the_complete_verifier(tmp_path):
    pytest.importorskip("maraboupy", reason="pip install maraboupy")
    pytest.importorskip("onnxruntime", reason="needs the onnx extra")
    import marabou_check

    train.train(config.load_config(None, tiny_overrides()), tmp_path / "run", max_generations=4, log=lambda m: None)
    res = marabou_check.check(str(tmp_path / "run" / "latest.h5"), tmp_path / "check", 6, 0.05, 60, say=lambda m: None)
    assert res["contradictions"] == 0
    decided = [r for r in res["rows"] if r["mpigls"] in ("verified", "falsified") and r["marabou"] in ("sat", "unsat")]
    assert len(decided) == 6 and res["agree"] == 6
