"""Architectures match the paper's Table 4; flat-vector views round-trip."""

import pytest
import torch
from torch import nn

from mpigls.nn import models


def _layers(model):
    return [type(m).__name__ for m in model]


def test_cnn3_table4():
    m = models.build("cnn3", (1, 28, 28), 10)
    convs = [l for l in m if isinstance(l, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (8, (5, 5), (2, 2), (2, 2)),
        (8, (4, 4), (2, 2), (1, 1)),
    ]
    assert _layers(m) == ["Normalize", "Conv2d", "ReLU", "Conv2d", "ReLU", "Flatten", "Linear"]
    assert m[-1].in_features == 8 * 7 * 7 and m[-1].out_features == 10


def test_cnn5_table4():
    m = models.build("cnn5", (3, 32, 32), 10)
    convs = [l for l in m if isinstance(l, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs] == [
        (16, 5, 2, 2),
        (16, 4, 2, 1),
        (32, 4, 2, 1),
    ]
    fcs = [l for l in m if isinstance(l, nn.Linear)]
    assert [(f.in_features, f.out_features) for f in fcs] == [(32 * 4 * 4, 512), (512, 10)]
    assert _layers(m)[-3:] == ["Linear", "ReLU", "Linear"]


def test_only_allowed_layers():
    for name in models.ARCHITECTURES:
        m = models.build(name, (3, 32, 32), 10)
        assert set(_layers(m)) <= {"Normalize", "Conv2d", "ReLU", "Flatten", "Linear"}
        assert isinstance(m[0], models.Normalize)


def test_affine_layer_without_bias_is_a_clear_error():
    from mpigls.nn.population import stack

    m = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3, bias=False))
    with pytest.raises(TypeError, match="bias"):
        models.unflatten(m, torch.zeros(models.num_params(m)))
    with pytest.raises(TypeError, match="bias"):
        stack(m, None, (1, 2, 2))


def test_unflatten_views_match_parameters():
    m = models.build("cnn3", (1, 8, 8), 10)
    flat = models.flat_params(m)
    assert flat.shape == (models.num_params(m),)
    stack = torch.stack([flat, 2 * flat])
    views = models.unflatten(m, stack)
    assert len(views) == len(m)
    for module, view in zip(m, views):
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            assert torch.equal(view[0][0], module.weight) and torch.equal(view[1][1], 2 * module.bias)
        else:
            assert view is None


def test_load_flat_roundtrip():
    m = models.build("mlp-tiny", (1, 4, 4), 3)
    v = torch.randn(models.num_params(m))
    models.load_flat_(m, v)
    assert torch.equal(models.flat_params(m), v)
    with pytest.raises(ValueError, match="shape"):
        models.load_flat_(m, v[:-1])


def test_normalize_layer_and_bad_input():
    m = models.build("cnn3", (3, 8, 8), 10, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(m[0](x), (x - 0.5) / 0.25)
    with pytest.raises(ValueError, match="does not fit input shape"):
        models.build("cnn5", (1, 2, 2), 10)
    with pytest.raises(ValueError, match="model.name"):
        models.build("resnet", (1, 8, 8), 10)


def test_seeded_build_is_not_disturbed_by_other_threads_using_the_global_rng():
    """Ranks run as threads share torch's global generator: a thread restoring its saved state
    (fork_rng) in the middle of another's seeded initialisation used to change that model."""
    import threading

    with models.private_rng(3):
        ref = models.flat_params(models.build("cnn3", (1, 8, 8), 10, [0.5], [0.5]))
    stop, bad = threading.Event(), []

    def disturb():
        while not stop.is_set():
            with models.private_rng():
                torch.rand(1000)

    def build():
        for _ in range(30):
            with models.private_rng(3):
                theta = models.flat_params(models.build("cnn3", (1, 8, 8), 10, [0.5], [0.5]))
            bad.append(not torch.equal(theta, ref))

    threads = [threading.Thread(target=disturb), threading.Thread(target=build)]
    for t in threads:
        t.start()
    threads[1].join()
    stop.set()
    threads[0].join()
    assert len(bad) == 30 and not any(bad)
