"""Peak memory of every bound method stays within 1.25 x memory_budget_mb beyond inputs and weights.

Each case runs in a fresh subprocess (torch's CPU allocations are invisible to tracemalloc): after
a tiny warm-up call (loads kernels and code pages) the peak resident set is reset through
/proc/self/clear_refs, the bound is computed, and the growth of VmHWM over the resident set just
before the call is the measured peak. A population of 8 x 256 examples at CNN3 MNIST size with a
16 MB budget needs many chunks for every method; before the fix the peaks were 1476 MB
(alpha-crown kept every chunk's autograd graph alive) and 119 MB (deeppoly: unbudgeted state).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUDGET_MB = 16.0

SCRIPT = r"""
import json, sys, torch
from mpigls.nn import models
from mpigls.bounds import margin_lower_bounds

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
method, budget = sys.argv[1], float(sys.argv[2])
opts = {"alpha_steps": 3} if method == "alpha-crown" else {}
torch.manual_seed(0)
model = models.build("cnn3", (1, 28, 28), 10, [0.13], [0.31])
theta = models.flat_params(model).detach()
params = theta + 0.01 * torch.randn(8, theta.numel())
x, y = torch.rand(256, 1, 28, 28), torch.randint(0, 10, (256,))
with torch.no_grad():
    margin_lower_bounds(model, x[:1], y[:1], 0.1, method, params[:1], memory_budget_mb=budget, **opts)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS:")
    margin_lower_bounds(model, x, y, 0.1, method, params, memory_budget_mb=budget, **opts)
    print(json.dumps({"peak_mb": status("VmHWM:") - before}))
"""


def peak_mb(method: str, budget: float) -> float:
    # a fixed mmap threshold: glibc's adaptive one would keep freed blocks of up to 32 MB resident
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, method, str(budget)], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(out.stdout.splitlines()[-1])["peak_mb"]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "deeppoly", "alpha-crown"])
def test_peak_memory_within_budget(method):
    peak = peak_mb(method, BUDGET_MB)
    assert peak <= 1.25 * BUDGET_MB, f"{method}: peak {peak:.1f} MB > 1.25 x {BUDGET_MB} MB"
