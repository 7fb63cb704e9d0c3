"""Cross-check against the reference implementation: auto_LiRPA's IBP, CROWN-IBP and CROWN give
the same margin lower bounds as our ibp, crown-ibp and deeppoly (skipped where auto_LiRPA is not
installed; tools/setup_env.sh installs it)."""

import zlib

import pytest
import torch

from benchmarks import auto_lirpa_compat
from mpigls.bounds import margin_lower_bounds
from mpigls.nn import models

pytestmark = pytest.mark.skipif(auto_lirpa_compat.load() is None, reason="auto_LiRPA is not installed")

CASES = [
    ("cnn3", (1, 28, 28), 0.02, 6),
    ("cnn3", (3, 32, 32), 2 / 255, 4),
    ("cnn5", (1, 28, 28), 0.01, 2),
    ("mlp", (1, 8, 8), 0.05, 16),
]


@pytest.mark.parametrize("name,shape,eps,batch", CASES)
@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "deeppoly"])
def test_same_bounds_as_auto_lirpa(name, shape, eps, batch, method):
    torch.manual_seed(zlib.crc32(f"{name}{shape}{method}".encode()))
    model = models.build(name, shape, 10, [0.0] * shape[0], [1.0] * shape[0]).eval()
    x = torch.rand(batch, *shape)
    y = torch.randint(0, 10, (batch,))
    ours = margin_lower_bounds(model, x, y, eps, method).detach()
    ref = auto_lirpa_compat.crown_margin_lower_bounds(model, x, y, eps, method).detach()
    scale = ref.abs().max().item()
    assert ours.shape == ref.shape
    # float32 both sides, different summation orders: agreement to float precision of the scale
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=2e-6 * max(scale, 1.0))
