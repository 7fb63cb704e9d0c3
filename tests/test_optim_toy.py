"""The paper's toy discontinuous loss: GLS (PGPE) crosses the jump, gradient descent is stuck."""

import importlib.util
from pathlib import Path

import numpy as np
import torch

TOOL = Path(__file__).resolve().parents[1] / "tools" / "toy_discontinuous.py"
spec = importlib.util.spec_from_file_location("toy_discontinuous", TOOL)
toy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(toy)


def test_smoothed_toy_loss_closed_form_matches_sampling():
    z = torch.from_numpy(np.random.default_rng(0).standard_normal(200_000))
    for w in (-0.4, 0.0, 0.3):
        sampled = float(toy.toy_loss(w + 0.3 * z).mean())
        assert abs(sampled - float(toy.smoothed_toy_loss(np.array(w), 0.3))) < 5e-3


def test_gls_crosses_discontinuity_gd_is_stuck():
    gd = toy.run_gd(-0.5, steps=100)
    assert np.all(gd == -0.5)  # slope 0 on w < 0: never moves
    gd_right = toy.run_gd(0.8, steps=100)
    assert gd_right[-1] <= 0  # slides over the jump, then stuck at l = 1
    for w0 in (-0.5, 0.8):
        gls = toy.run_gls(w0, steps=150, sigma=0.3, seed=1)
        tail = gls[-50:]
        assert np.all(tail > 0), tail  # on the good side of the jump
        assert float(toy.toy_loss(torch.from_numpy(tail)).mean()) < 0.5
        # close to the smoothed minimiser w* = 0.3 t, s Phi(t) = phi(t) (t ~ 0.97)
        assert abs(float(tail.mean()) - 0.29) < 0.1


def test_tool_writes_png(tmp_path):
    out = tmp_path / "toy.png"
    assert toy.main(["--out", str(out), "--steps", "40"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000
